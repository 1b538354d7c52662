"""A fleet of two Harli instances (``--harli-peers``): a job trained on one serves hot on both, a late
joiner catches up before it reports healthy, a dead peer is reported and skipped, and peer calls need
the admin key. Each instance runs with one thread (two torch processes on two cores)."""

import time

import requests

from helpers.fleet import AUTH, instance
from helpers.jobs import PROMPTS, job_spec, wait_for
from sglang_harli.server_process import free_port


def _generate(server, adapter):
    body = {
        "text": PROMPTS[0],
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    resp = requests.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def test_a_version_published_on_one_instance_serves_on_everyinstance(tmp_path, tiny_model_dir):
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    urls = {p: f"http://127.0.0.1:{p}" for p in (port_a, port_b, port_c)}
    with (
        instance(tmp_path, tiny_model_dir, "a", port_a, f"{urls[port_b]},{urls[port_c]}") as a,
        instance(tmp_path, tiny_model_dir, "b", port_b, f"{urls[port_a]},{urls[port_c]}") as b,
    ):
        # peer calls need the admin key
        assert requests.get(f"{a.url}/harli/fleet/adapters", timeout=10).status_code in (401, 403)
        assert requests.get(f"{a.url}/harli/fleet/adapters", headers=AUTH, timeout=10).json() == []
        spec = job_spec("fleet-job", {"records": [{"text": p} for p in PROMPTS]}, epochs=3)
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
        stats = a.get("/harli/stats", headers=AUTH).json()["fleet"]
        by_url = {p["url"]: p for p in stats["peers"]}
        assert by_url[urls[port_b]]["alive"] and by_url[urls[port_b]]["adapters_pushed"] >= 1
        assert not by_url[urls[port_c]]["alive"] and by_url[urls[port_c]]["error"]  # dead: skipped
        assert b.get("/harli/stats", headers=AUTH).json()["fleet"]["adapters_received"] >= 1

        # a late joiner serves the fleet's adapters before it reports healthy
        with instance(tmp_path, tiny_model_dir, "c", port_c, f"{urls[port_a]},{urls[port_b]}") as c:
            adapters = requests.get(f"{c.url}/harli/fleet/adapters", headers=AUTH, timeout=10).json()
            assert {"name": "fleet-job", "version": newest} in adapters
            assert _generate(c, "fleet-job") == _generate(a, "fleet-job")


def _wait(predicate, what, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
