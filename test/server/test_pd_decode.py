"""Co-located training on a PD-disaggregated *decode* instance (SGLang's ``fake`` transfer backend).

On a decode instance requests arrive with their KV from a prefill instance: SGLang pre-allocates KV pages
for each arriving request, the transfer backend writes into them, and the request joins the running batch
without a prefill. The lending must hold up there too: pages are taken back before the pre-allocation
queue would wait for them, a lent page is never handed to a transfer (``--harli-kv-poison`` checks every
allocation and every lent byte), and finetune units run between the decode steps of the arrivals.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers.jobs import RECORDS, finished, job_spec, wait_for
from helpers.lending import POOL, lending_server, memory, metric
from helpers.servers import FAKE_BOOTSTRAP, PD_DECODE_ARGS

pytestmark = pytest.mark.server

BURST, BURST_NEW = 12, 560  # with the instance's per-request decode reserve, most of the pool


@pytest.fixture(scope="module")
def decode_server(tmp_path_factory):
    """test_lending's small-pool, small-budget, poisoned server, as a PD decode instance."""
    with lending_server(tmp_path_factory.mktemp("pd_lending"), *PD_DECODE_ARGS) as srv:
        yield srv


def _units(server, when: str) -> float:
    total = 0.0
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("harli:finetune_units_total{") and f'when="{when}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _burst(server, count: int = BURST, new_tokens: int = BURST_NEW, room: int = 1000) -> list[int]:
    def one(index):
        body = {
            "text": f"Burst {index:02d}:",
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
            **FAKE_BOOTSTRAP,
            "bootstrap_room": room + index,
        }
        resp = requests.post(server.url + "/generate", json=body, timeout=600)
        assert resp.status_code == 200, resp.text
        return resp.json()["meta_info"]["completion_tokens"]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_a_decode_instance_lends_trains_and_takes_its_pages_back(decode_server):
    srv = decode_server
    assert memory(srv)["enabled"] is True, memory(srv)["reason"]
    assert srv.post("/harli/jobs", job_spec("pd", {"records": RECORDS}, epochs=12)).status_code == 201
    wait_for(srv, "pd", lambda s: s["step"] >= 2)
    assert memory(srv)["lent_tokens"] > POOL // 4  # training borrowed a real share of the pool

    # Light load: the arrivals join decode without a prefill, and training runs in their token intervals.
    assert _burst(srv, count=2, new_tokens=64, room=500) == [64, 64]
    assert _units(srv, "decode") > 0

    assert _burst(srv) == [BURST_NEW] * BURST  # every transferred request decoded to its last token
    during = memory(srv)
    assert during["reclaims"] >= 1  # the pages came back for the arrivals ...
    assert during["lent_allocations"] == 0  # ... and no pre-allocation ever got a lent page
    assert during["poison_violations"] == 0  # nothing but the trainer wrote a lent byte
    assert metric(srv, "sglang:num_retracted_requests_total") == 0

    status = wait_for(srv, "pd", finished)
    assert status["state"] == "completed", status
    out = srv.post(
        "/generate",
        {"text": "Hi", "sampling_params": {"max_new_tokens": 4}, **FAKE_BOOTSTRAP, "bootstrap_room": 7},
    )
    assert out.status_code == 200 and len(out.json()["output_ids"]) == 4


def test_every_page_comes_back_on_the_decode_instance(decode_server):
    deadline = time.monotonic() + 30
    while (stats := memory(decode_server))["free_tokens"] + stats["cached_tokens"] < POOL:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["lent_tokens"] == 0
    log = decode_server.log_path.read_text()
    assert "memory leak" not in log and "Traceback" not in log
