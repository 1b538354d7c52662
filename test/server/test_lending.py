"""KV lending on a real server with a small pool: decode never pays for it, training never changes by it.
(Without lent pages, a micro-batch over the trainer budget fails its job naming the flag:
``test_job_lifecycle``; the flag that turns lending off reaches the scheduler: ``test_auth``.)"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from safetensors.torch import load_file

from helpers.jobs import RECORDS, finished, job_spec, wait_for
from helpers.lending import BUDGET_MB, BURST, BURST_NEW, POOL, memory, metric


@pytest.fixture
def server(small_server):
    """The shared small server (``conftest.py``): lending is tested on its pool and trainer budget."""
    return small_server


def burst(server):
    """Requests that need nearly the whole pool, all at once, each streamed to its last token."""

    def one(index):
        body = {
            "text": f"Burst {index:02d}:",
            "sampling_params": {"max_new_tokens": BURST_NEW, "temperature": 0, "ignore_eos": True},
        }
        resp = requests.post(server.url + "/generate", json=body, timeout=600)
        assert resp.status_code == 200, resp.text
        return resp.json()["meta_info"]["completion_tokens"]

    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(one, range(BURST)))


def adapter(status):
    return load_file(status["published"][-1]["path"] + "/adapter_model.safetensors")


def test_a_burst_takes_the_pool_back_and_the_adapter_is_the_one_without_it(server):
    spec = job_spec("burst", {"records": RECORDS}, epochs=8)
    assert server.post("/harli/jobs", spec).status_code == 201
    wait_for(server, "burst", lambda s: s["step"] >= 2)
    lent = memory(server)
    assert lent["lent_tokens"] > POOL // 4, lent  # the trainer borrowed a real share of the pool
    assert burst(server) == [BURST_NEW] * BURST  # every request ran to its last token
    during = memory(server)
    with_burst = wait_for(server, "burst", finished)
    assert with_burst["state"] == "completed", with_burst
    assert during["reclaims"] >= 1  # decode took the pages back ...
    assert during["waits"] + during["replayed_micro_batches"] + during["spilled_micro_batches"] > 0
    assert metric(server, "sglang:num_retracted_requests_total") == 0  # ... before it had to retract

    spec["name"] = "quiet"
    assert server.post("/harli/jobs", spec).status_code == 201
    quiet = wait_for(server, "quiet", finished)
    assert quiet["state"] == "completed", quiet
    trained, reference = adapter(with_burst), adapter(quiet)
    assert trained.keys() == reference.keys()
    assert all((trained[k] == reference[k]).all() for k in reference)  # bit for bit


def test_a_budget_below_one_micro_batch_trains_on_lent_pages(server):
    stats = memory(server)
    activations = stats["activations"]
    assert activations["budget_bytes"] == BUDGET_MB * 2**20
    assert activations["last_micro_batch_bytes"] > activations["budget_bytes"]
    assert activations["placed_total"] > 0
    assert activations["peak_ordinary_bytes"] <= activations["budget_bytes"]
    assert stats["poison_violations"] == 0


def test_every_page_comes_back_and_the_leak_check_stays_quiet(server):
    deadline = time.monotonic() + 30
    while sum((stats := memory(server))[k] for k in ("free_tokens", "cached_tokens")) < POOL:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["lent_tokens"] == 0
    assert stats["free_tokens"] + stats["cached_tokens"] == POOL
    log = server.log_path.read_text()
    assert "memory leak" not in log and "Traceback" not in log
