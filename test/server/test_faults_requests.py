"""Bad or abandoned requests cost the server nothing: a PD-decode request without bootstrap fields is a
400 (not a dead server), and a client that disconnects mid-stream has its request aborted and its KV freed."""

from __future__ import annotations

import json
import time

import pytest
import requests

from helpers.servers import FAKE_BOOTSTRAP, PD_DECODE_ARGS, SERVER_ARGS
from sglang_harli.server_process import ServerProcess

pytestmark = pytest.mark.server

SAMPLING = {"max_new_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def decode_server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pd_decode")
    args = [
        *SERVER_ARGS,
        *PD_DECODE_ARGS,
    ]
    with ServerProcess(args, run_dir / "server.log") as srv:
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
