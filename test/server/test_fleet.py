"""A fleet of Harli instances (``--harli-peers``), one module on one fleet: a version trained on one serves
hot on every instance, a late joiner catches up before it reports healthy, a dead peer is reported and
skipped, and peer calls need the admin key; one submission is placed by slack or by name, seen and cancelled
from any instance, names unique across the fleet; a job trained on two instances (local SGD) learns as well as
one trained on one, answers through SGLang's router on both, and finishes on the survivor when one instance
is killed mid-job. Every instance runs with one thread (two torch processes on two cores)."""

import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest
import requests

from helpers.fleet import AUTH, instance
from helpers.jobs import PROMPTS, RECORDS, job_spec, wait_for
from sglang_harli.core.jobs.spec import FinetuneJobSpec
from sglang_harli.core.wire.control import SubmitJob
from sglang_harli.server_process import ServerProcess, free_port

TEXTS = [r["prompt"] + r["completion"] for r in RECORDS]


class Fleet(NamedTuple):
    a: ServerProcess
    b: ServerProcess
    c_port: int
    c_url: str
    root: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    """Instances A and B of a fleet of three, peers up: C is in their peer lists but down until the first
    test starts it, late, and stops it again. The last test of the module kills B."""
    root = tmp_path_factory.mktemp("fleet")
    ports = free_port(), free_port(), free_port()
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    a = instance(root, tiny_model_dir, "a", ports[0], f"{urls[1]},{urls[2]}")
    b = instance(root, tiny_model_dir, "b", ports[1], f"{urls[0]},{urls[2]}")
    with a, b:
        _peers_up(a, b)
        yield Fleet(a, b, ports[2], urls[2], root)


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
            lambda s=server, o=other: any(
                p["alive"] and p["url"] == o.url for p in s.get("/harli/stats").json()["fleet"]["peers"]
            ),
            f"{server.url} to see {other.url}",
            60,
        )


def _entries(server, name):
    return [job for job in server.get("/harli/jobs").json() if job["name"] == name]


def _generate(server, adapter):
    body = {
        "text": PROMPTS[0],
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    resp = requests.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def _wait(predicate, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_version_published_on_one_instance_serves_on_every_instance(fleet, tiny_model_dir):
    """First in the module: C is down until it joins, late, here."""
    a, b = fleet.a, fleet.b
    # peer calls need the admin key
    assert requests.get(f"{a.url}/harli/fleet/adapters", timeout=10).status_code in (401, 403)
    assert requests.get(f"{a.url}/harli/fleet/adapters", headers=AUTH, timeout=10).json() == []
    spec = job_spec("fleet-job", {"records": [{"text": p} for p in PROMPTS]}, epochs=3)
    spec["placement"] = a.url  # trained on A (by slack it could go to B just as well)
    resp = requests.post(f"{a.url}/harli/jobs", json=spec, headers=AUTH, timeout=120)
    assert resp.status_code == 201, resp.text
    job = wait_for(a, "fleet-job", lambda s: s["state"] == "completed", timeout=300)
    newest = max(v["version"] for v in job["published"])

    def served_on_b():
        adapters = requests.get(f"{b.url}/harli/fleet/adapters", headers=AUTH, timeout=10).json()
        return {"name": "fleet-job", "version": newest} in adapters

    _wait(served_on_b, "the newest version to reach the peer")
    assert _generate(b, "fleet-job") == _generate(a, "fleet-job")  # the same adapter on both
    assert _generate(b, "fleet-job") != _generate(b, None)

    def peers_of_a():
        return {p["url"]: p for p in a.get("/harli/stats", headers=AUTH).json()["fleet"]["peers"]}

    # B serves the version a moment before A hears B's answer to the push and counts it
    _wait(lambda: peers_of_a()[b.url]["adapters_pushed"] >= 1, "A to count its push", 10)
    by_url = peers_of_a()
    assert by_url[b.url]["alive"] and by_url[b.url]["adapters_pushed"] >= 1
    assert not by_url[fleet.c_url]["alive"] and by_url[fleet.c_url]["error"]  # dead: skipped
    assert b.get("/harli/stats", headers=AUTH).json()["fleet"]["adapters_received"] >= 1

    # a late joiner serves the fleet's adapters before it reports healthy
    with instance(fleet.root, tiny_model_dir, "c", fleet.c_port, f"{a.url},{b.url}") as c:
        adapters = requests.get(f"{c.url}/harli/fleet/adapters", headers=AUTH, timeout=10).json()
        assert {"name": "fleet-job", "version": newest} in adapters
        assert _generate(c, "fleet-job") == _generate(a, "fleet-job")


def test_a_job_is_placed_seen_and_cancelled_from_any_instance(fleet):
    a, b = fleet.a, fleet.b
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


def test_a_job_trained_on_two_instances_serves_through_the_router_and_survives_a_kill(fleet, tmp_path):
    """Last in the module: it kills instance B."""
    a, b = fleet.a, fleet.b
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
        long = {**duo, "name": "duo-long", "training": {**duo["training"], "epochs": 20}}
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
