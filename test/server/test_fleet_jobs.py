"""A fleet's jobs (``--harli-peers``): one submission placed by slack or by name, seen and cancelled from
any instance, names unique across the fleet; a job trained on two instances (local SGD) that learns as
well as one trained on one, answers through SGLang's router on both, and finishes on the survivor when
one instance is killed mid-job. Every instance runs with one thread (two torch processes on two cores)."""

import subprocess
import sys
import time

import msgspec
import pytest
import requests

from helpers.fleet import AUTH, instance
from helpers.jobs import RECORDS, job_spec
from sglang_harli.core.jobs.spec import FinetuneJobSpec
from sglang_harli.core.wire.control import SubmitJob
from sglang_harli.server_process import free_port

TEXTS = [r["prompt"] + r["completion"] for r in RECORDS]


def _pair(tmp_path, tiny_model_dir):
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    a = instance(tmp_path, tiny_model_dir, "a", port_a, url_b)
    b = instance(tmp_path, tiny_model_dir, "b", port_b, url_a)
    return a, b


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """One fleet of two instances for the module, peers up (the last test kills B)."""
    a, b = _pair(tmp_path_factory.mktemp("fleet"), tiny_model_dir)
    with a, b:
        _peers_up(a, b)
        yield a, b


def _submit(server, spec):
    return requests.post(f"{server.url}/harli/jobs", json=spec, headers=AUTH, timeout=120)


def _job(server, name):
    resp = requests.get(f"{server.url}/harli/jobs/{name}", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _until(predicate, what, timeout_s=300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _peers_up(a, b):
    for server, other in ((a, b), (b, a)):
        _until(
            lambda s=server, o=other: all(p["alive"] for p in s.get("/harli/stats").json()["fleet"]["peers"]),
            f"{server.url} to see {other.url}",
            60,
        )


def _entries(server, name):
    return [job for job in server.get("/harli/jobs").json() if job["name"] == name]


def test_a_job_is_placed_seen_and_cancelled_from_anyinstance(pair):
    a, b = pair
    # peer routes need the admin key, and a peer cannot name a path on this instance's disk
    assert requests.get(f"{a.url}/harli/fleet/capacity", timeout=10).status_code in (401, 403)
    assert requests.post(f"{a.url}/harli/fleet/jobs", data=b"", timeout=10).status_code in (401, 403)
    spec = msgspec.convert(job_spec("sneaky", {"records": RECORDS[:2]}, epochs=1), FinetuneJobSpec)
    staged = {"dir": "/etc", "count": 1, "digest": "x"}
    body = {**msgspec.to_builtins(SubmitJob(spec=spec, count=1)), "staged": staged}
    resp = requests.post(f"{a.url}/harli/fleet/jobs", data=msgspec.msgpack.encode(body), headers=AUTH)
    assert resp.status_code in (400, 422) and resp.json()["field"].startswith("staged"), resp.text

    # placed by name: submitted to A, trained on B, seen from A
    resp = _submit(a, {**job_spec("on-b", {"records": RECORDS}, epochs=2), "placement": b.url})
    assert resp.status_code == 201, resp.text
    assert resp.json()["instance"] == b.url
    done = _until(lambda: (j := _job(a, "on-b"))["state"] == "completed" and j, "on-b to complete")
    assert done["instance"] == b.url
    assert [j["instance"] for j in _entries(a, "on-b")] == [b.url]
    assert [j["instance"] for j in _entries(b, "on-b")] == [b.url]
    # names are unique across the fleet
    resp = _submit(a, job_spec("on-b", {"records": RECORDS}, epochs=1))
    assert resp.status_code == 409 and resp.json()["field"] == "name", resp.text
    resp = _submit(a, {**job_spec("nowhere", {"records": RECORDS}), "placement": "http://127.0.0.1:1"})
    assert resp.status_code == 503 and resp.json()["field"] == "placement", resp.text

    # placed by slack: A has a job of its own, so the next goes to B
    long = {**job_spec("long-a", {"records": RECORDS}, epochs=1000), "placement": a.url}
    assert _submit(a, long).status_code == 201
    _until(lambda: _job(b, "long-a")["state"] == "running", "long-a to run on A")
    resp = _submit(a, job_spec("auto", {"records": RECORDS}, epochs=1))
    assert resp.status_code == 201, resp.text
    assert resp.json()["instance"] == b.url
    # cancelled from the other instance
    resp = requests.post(f"{b.url}/harli/jobs/long-a/cancel", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    assert [(j["instance"], j["state"]) for j in _entries(a, "long-a")] == [(a.url, "cancelled")]
    missing = requests.post(f"{b.url}/harli/jobs/ghost/cancel", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and missing.json()["field"] == "name"


def _training_loss(server, adapter):
    """Mean next-token loss of the adapter on the training texts, from the server's own logprobs."""
    body = {
        "text": TEXTS, "lora_path": [adapter] * len(TEXTS), "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
    }  # fmt: skip
    resp = requests.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    logprobs = [lp for out in resp.json() for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    return -sum(logprobs) / len(logprobs)


def _greedy(url, adapter):
    body = {
        "text": RECORDS[0]["prompt"], "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
    }  # fmt: skip
    resp = requests.post(f"{url}/generate", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def _router(port, workers, log):
    command = [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-port", str(free_port()), "--policy", "round_robin", "--worker-urls", *workers,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def test_a_job_trained_on_two_instances_serves_through_the_router_and_survives_a_kill(pair, tmp_path):
    """Last in the module: it kills instance B of the shared pair."""
    a, b = pair
    router_port = free_port()
    with open(tmp_path / "router.log", "w") as log:
        spec = job_spec("solo", {"records": [{"text": t} for t in TEXTS]}, epochs=30)
        spec["publish"] = {"every_steps": 0}
        assert _submit(a, {**spec, "placement": a.url}).status_code == 201
        duo = {**spec, "name": "duo", "training": {**spec["training"], "instances": 2, "average_every": 2}}
        resp = _submit(a, duo)
        assert resp.status_code == 201, resp.text
        assert sorted(resp.json()["group"]["assignment"]["members"]) == sorted([a.url, b.url])
        for name in ("solo", "duo"):
            _until(
                lambda n=name: all(j["state"] == "completed" for j in _entries(a, n)), f"{name} to complete"
            )
        members = _entries(a, "duo")
        assert sorted(j["instance"] for j in members) == sorted([a.url, b.url])
        for member in members:
            contributions = member["group"]["contributions"]
            assert sorted(contributions) == sorted([a.url, b.url])
            assert all(
                c["steps"] > 0 and c["tokens_trained"] > 0 and c["examples"] == 8
                for c in contributions.values()
            )
        base, solo, group = (_training_loss(a, name) for name in (None, "solo", "duo"))
        assert solo < 0.8 * base  # it learned
        assert abs(group - solo) <= 0.05 * solo, (base, solo, group)

        router = _router(router_port, [a.url, b.url], log)
        try:
            router_url = f"http://127.0.0.1:{router_port}"
            _until(lambda: _router_has(router_url, 2), "the router to register both instances", 120)
            direct = _greedy(a.url, "duo")
            assert _greedy(b.url, "duo") == direct
            assert [_greedy(router_url, "duo") for _ in range(4)] == [direct] * 4  # round robin: both answer
        finally:
            router.terminate()
            router.wait(timeout=30)

        # one instance killed mid-job: the survivor finishes it alone and serves it
        long = {**duo, "name": "duo-long", "training": {**duo["training"], "epochs": 60}}
        assert _submit(a, long).status_code == 201
        _until(lambda: _job(a, "duo-long")["group"]["averages"] >= 2, "two averages", 300)
        b.kill()
        done = _until(
            lambda: (j := _job(a, "duo-long"))["state"] in ("completed", "failed") and j, "duo-long"
        )
        assert done["state"] == "completed", done
        assert done["group"]["generation"] >= 1
        assert not done["group"]["contributions"][b.url]["alive"]
        assert done["step"] == done["total_steps"]
        assert _greedy(a.url, "duo-long") != _greedy(a.url, None)


def _router_has(url, count):
    """The router lists ``count`` workers and reports ready (it registers them in the background)."""
    try:
        listed = requests.get(f"{url}/workers", timeout=5).json()["total"]
        return listed == count and requests.get(f"{url}/readiness", timeout=5).status_code == 200
    except (requests.RequestException, ValueError, KeyError):
        return False
