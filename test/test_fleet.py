"""A fleet of two Harli instances (``--harli-peers``): a job trained on one serves hot on both, a late
joiner catches up before it reports healthy, a dead peer is reported and skipped, and peer calls need
the admin key. Each instance runs with one thread (two torch processes on two cores)."""

import subprocess
import sys
import time

import msgspec
import pytest
import requests

from sglang_harli.core.errors import SpecError, SpecInvalid
from sglang_harli.core.fleet import AdapterBundle, bundle_digest, decode_bundle, parse_peers, write_bundle
from sglang_harli.server_process import ServerProcess, free_port
from test_jobs import PROMPTS, job_spec, wait_for

KEY = "fleet-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_peers_parse_and_bad_ones_are_named():
    assert parse_peers("http://a:1, http://b:2/,http://a:1,") == ["http://a:1", "http://b:2"]
    for bad in ("a:1", "ftp://a:1", "http://a:1/v1"):
        with pytest.raises(ValueError, match="base URL"):
            parse_peers(bad)


def _prepared(*argv: str) -> str:
    """``prepare(argv)`` in a process of its own (it sets SGLang's process-wide state, which would leak
    into later tests' in-process references): the peers it keeps, or its usage error."""
    code = (
        "import sys\nfrom sglang_harli.launch_server import UsageError, prepare\n"
        "try:\n    print(prepare(sys.argv[1:])._harli_config.peers)\n"
        "except UsageError as exc:\n    print(f'UsageError: {exc}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_launcher_refuses_a_fleet_without_an_admin_key():
    assert _prepared("--harli-peers", "http://127.0.0.1:1").startswith(
        "UsageError: argument --harli-peers: needs --admin-api-key"
    )
    assert _prepared("--harli-peers", "nowhere", "--admin-api-key", KEY).startswith(
        "UsageError: argument --harli-peers"
    )
    assert _prepared("--harli-peers", "http://10.0.0.2:30000", "--admin-api-key", KEY) == "http://10.0.0.2:30000"


def test_a_bundle_is_checked_before_anything_is_written(tmp_path):
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 16}
    bundle = AdapterBundle(name="job", version=3, files=files, digest=bundle_digest(files))
    path = write_bundle(tmp_path, decode_bundle(msgspec.msgpack.encode(bundle)))
    assert path == tmp_path / "job" / "v0003"
    assert (path / "adapter_model.safetensors").read_bytes() == b"\0" * 16
    tampered = msgspec.structs.replace(bundle, files={**files, "adapter_config.json": b'{"r": 64}'})
    with pytest.raises(SpecError, match="digest"):
        decode_bundle(msgspec.msgpack.encode(tampered))
    planted = {"../../etc/cron.d/x": b"", **files}
    with pytest.raises(SpecError, match="not a file of an adapter"):
        decode_bundle(msgspec.msgpack.encode(msgspec.structs.replace(bundle, files=planted)))
    outside = msgspec.msgpack.encode({**msgspec.to_builtins(bundle), "name": "../x"})
    with pytest.raises(SpecInvalid) as refused:
        decode_bundle(outside)
    assert refused.value.field == "name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]  # nothing else was written


def _instance(tmp_path, tiny_model_dir, name, port, peers):
    args = [
        "--model-path", str(tiny_model_dir), "--enable-lora", "--max-lora-rank", "16",
        "--lora-target-modules", "all", "--admin-api-key", KEY, "--harli-peers", peers,
        "--harli-output-dir", str(tmp_path / name / "adapters"),
    ]  # fmt: skip
    return ServerProcess(args, tmp_path / f"{name}.log", port=port, env={"OMP_NUM_THREADS": "1"})


def _generate(server, adapter):
    body = {
        "text": PROMPTS[0],
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    resp = requests.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def test_a_version_published_on_one_instance_serves_on_every_instance(tmp_path, tiny_model_dir):
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    urls = {p: f"http://127.0.0.1:{p}" for p in (port_a, port_b, port_c)}
    with (
        _instance(tmp_path, tiny_model_dir, "a", port_a, f"{urls[port_b]},{urls[port_c]}") as a,
        _instance(tmp_path, tiny_model_dir, "b", port_b, f"{urls[port_a]},{urls[port_c]}") as b,
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
        with _instance(tmp_path, tiny_model_dir, "c", port_c, f"{urls[port_a]},{urls[port_b]}") as c:
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
