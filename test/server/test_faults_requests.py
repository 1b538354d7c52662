"""Abandoned requests cost the server nothing: a client that disconnects mid-stream has its request aborted
and its KV freed (a PD-decode request without bootstrap fields is ``test_pd_decode``'s)."""

from __future__ import annotations

import time

import pytest
import requests

from sglang_harli.server_process import ServerProcess

pytestmark = pytest.mark.server


def _load(srv: ServerProcess) -> dict:
    """Live counts: running requests and the tokens they hold, from SGLang and from our scheduler."""
    load = srv.get("/v1/loads").json()["loads"][0]
    stats = srv.get("/harli/stats").json()
    mem = stats["finetune"]["memory"]
    return {
        "running": load["num_running_reqs"],
        "used_tokens": load["num_used_tokens"],
        # Pool tokens not free, not in the radix cache (evictable), not lent to training: held by requests.
        "held_tokens": mem["pool_tokens"] - mem["free_tokens"] - mem["cached_tokens"] - mem["lent_tokens"],
        "decode_tokens": stats["decode_tokens"],
    }


def _wait(srv: ServerProcess, done, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        load = _load(srv)
        if done(load) or time.monotonic() > deadline:
            return load
        time.sleep(0.2)


def test_client_disconnect_mid_stream_aborts_and_frees_kv(server):
    before = _wait(server, lambda s: s["running"] == 0 and s["held_tokens"] == 0, 30)
    assert before["running"] == 0 and before["held_tokens"] == 0, before

    body = {
        "text": "Once upon a time",
        "stream": True,
        "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0},
    }
    with requests.Session() as session:
        resp = session.post(server.url + "/generate", json=body, stream=True, timeout=60)
        assert resp.status_code == 200
        # Keep the iterator: dropping it would already close the connection (urllib3 cleans up on GC).
        lines = resp.iter_lines()
        chunks = 0
        for line in lines:
            if line.startswith(b"data: {"):
                chunks += 1
                if chunks == 5:
                    break
        during = _wait(server, lambda s: s["running"] == 1 and s["held_tokens"] > 0, 10)
        assert during["running"] == 1 and during["used_tokens"] > 0 and during["held_tokens"] > 0, during
        resp.close()  # the client goes away mid-stream
        del lines

    closed = time.monotonic()
    after = _wait(server, lambda s: s["running"] == 0 and s["used_tokens"] == 0 and s["held_tokens"] == 0, 10)
    assert after["running"] == 0 and after["used_tokens"] == 0 and after["held_tokens"] == 0, after
    assert time.monotonic() - closed < 10

    # Aborted, not merely hidden: decoding stopped long before 2000 tokens and does not resume.
    time.sleep(1.0)
    later = _load(server)
    assert later["decode_tokens"] == after["decode_tokens"]
    assert later["decode_tokens"] - before["decode_tokens"] < 1500
