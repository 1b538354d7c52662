"""Co-located training on a PD-disaggregated *decode* instance (SGLang's ``fake`` transfer backend), and its
admission guard: a request without bootstrap fields is a 400, not a dead server.

On a decode instance requests arrive with their KV from a prefill instance: SGLang pre-allocates KV pages
for each arriving request, the transfer backend writes into them, and the request joins the running batch
without a prefill. The lending must hold up there too: pages are taken back before the pre-allocation
queue would wait for them, a lent page is never handed to a transfer (``--harli-kv-poison`` checks every
allocation and every lent byte), and finetune units run between the decode steps of the arrivals.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers.jobs import RECORDS, finished, job_spec, wait_for
from helpers.lending import POOL, lending_server, memory, metric
from helpers.servers import FAKE_BOOTSTRAP, PD_DECODE_ARGS
from sglang_harli.server_process import ServerProcess

pytestmark = pytest.mark.server

SAMPLING = {"max_new_tokens": 4, "temperature": 0}
BURST, BURST_NEW = 12, 560  # with the instance's per-request decode reserve, most of the pool


@pytest.fixture(scope="module")
def decode_server(tmp_path_factory):
    """test_lending's small-pool, small-budget, poisoned server, as a PD decode instance."""
    with lending_server(tmp_path_factory.mktemp("pd_lending"), *PD_DECODE_ARGS) as srv:
        yield srv


def _error_message(resp: requests.Response) -> str:
    body = resp.json()
    error = body.get("error", body)  # native: {"error": {"message"}}; OpenAI: {"object": "error", "message"}
    return error["message"]


def _refused(resp: requests.Response, field: str) -> str:
    assert resp.status_code == 400, resp.text
    message = _error_message(resp)
    assert field in message
    return message


def _alive(srv: ServerProcess) -> None:
    assert srv.proc.poll() is None, srv.log_tail()
    assert srv.get("/health").status_code == 200


def test_pd_decode_request_without_bootstrap_fields_is_a_400(decode_server):
    srv = decode_server
    _refused(srv.post("/generate", {"text": "Hello", "sampling_params": SAMPLING}), "bootstrap_host")
    _alive(srv)  # stock SGLang 0.5.23: the scheduler died on this request and took the server down
    body = {"text": "Hello", "sampling_params": SAMPLING, "bootstrap_host": "2.2.2.2"}
    _refused(srv.post("/generate", body), "bootstrap_room")

    # A batch: the item without a host is named.
    batch = {
        "text": ["Hello", "World"],
        "sampling_params": SAMPLING,
        "bootstrap_host": ["2.2.2.2", None],
        "bootstrap_room": [1, 2],
    }
    assert "item(s) [1]" in _refused(srv.post("/generate", batch), "bootstrap_host")

    # The OpenAI routes carry the same fields (PDRoutingFields) and get the same answer.
    completion = {"model": "harli-tiny", "prompt": "Hello", "max_tokens": 4}
    _refused(srv.post("/v1/completions", completion), "bootstrap_host")
    _refused(srv.post("/v1/completions", {**completion, "stream": True}), "bootstrap_host")
    chat = {"model": "harli-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    _refused(srv.post("/v1/chat/completions", chat), "bootstrap_host")

    # A streaming native /generate has already said 200 when SGLang validates; it reports the refusal as an
    # SSE error event, as it does for every invalid streaming request.
    resp = srv.post("/generate", {"text": "Hello", "stream": True, "sampling_params": SAMPLING})
    events = [line[len(b"data: ") :] for line in resp.content.splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    error = json.loads(events[0])["error"]
    assert error["code"] == 400 and "bootstrap_host" in error["message"]

    _alive(srv)
    _refused(srv.post("/generate", {"text": "again", "sampling_params": SAMPLING}), "bootstrap_host")


def test_pd_decode_request_with_fake_bootstrap_fields_generates(decode_server):
    srv = decode_server
    one = srv.post(
        "/generate", {"text": "Hello", "sampling_params": SAMPLING, **FAKE_BOOTSTRAP, "bootstrap_room": 7}
    )
    assert one.status_code == 200, one.text
    assert len(one.json()["output_ids"]) == 4

    # A scalar room is spread over the batch (room, room + 1, ...) by SGLang.
    batch = {"text": ["Hello", "World"], "sampling_params": SAMPLING, **FAKE_BOOTSTRAP, "bootstrap_room": 100}
    out = srv.post("/generate", batch)
    assert out.status_code == 200, out.text
    assert [len(item["output_ids"]) for item in out.json()] == [4, 4]

    completion = {
        "model": "harli-tiny",
        "prompt": "Hello",
        "max_tokens": 4,
        **FAKE_BOOTSTRAP,
        "bootstrap_room": 9,
    }
    resp = srv.post("/v1/completions", completion)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4

    time.sleep(2.5)  # SGLang's stream abort task runs 2 s after a response, refused ones included
    _alive(srv)
    assert "Exception in ASGI application" not in srv.log_path.read_text(errors="replace")


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
