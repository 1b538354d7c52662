"""``/harli/*`` honours SGLang's --api-key and --admin-api-key the way SGLang's own routes do (on the shared
keyed server; the Tinker routes' keys are ``test_tinker_cookbook``'s)."""

import requests

from helpers.servers import ADMIN_KEY, USER_KEY

USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JOB = {"name": "guarded", "dataset": {"records": [{"prompt": "a", "completion": " b"}]}}


def test_harli_routes_follow_sglang_auth(keyed_server):
    srv = keyed_server
    # Reading is a normal route: the API key opens it.
    assert requests.get(srv.url + "/harli/stats", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(srv.url + "/harli/stats", headers=wrong, timeout=30).status_code == 401
    ok = requests.get(srv.url + "/harli/stats", headers=USER, timeout=30)
    assert ok.status_code == 200 and ok.json()["config"]["tpot_slo_ms"] == 100.0
    memory = ok.json()["finetune"]["memory"]  # this server runs with --harli-kv-lending off
    assert memory["enabled"] is False and memory["reason"] == "--harli-kv-lending off"
    assert requests.get(srv.url + "/harli/jobs", headers=USER, timeout=30).json() == []
    # SGLang's own route behaves the same way, which is the point.
    assert requests.post(srv.url + "/generate", json={"text": "a"}, timeout=30).status_code == 401

    # Creating and cancelling jobs are admin actions, like SGLang's /load_lora_adapter.
    for path in ("/harli/jobs", "/load_lora_adapter"):
        assert requests.post(srv.url + path, json=JOB, headers=USER, timeout=30).status_code == 401, path
    assert requests.post(srv.url + "/harli/jobs/guarded/cancel", headers=USER, timeout=30).status_code == 401
    # With the admin key the request gets through, and is refused for what it is: a rank this server's
    # LoRA pool cannot hold (a server without LoRA refuses naming --enable-lora: test_job_lifecycle).
    too_large = {**JOB, "lora": {"r": 64}}
    resp = requests.post(srv.url + "/harli/jobs", json=too_large, headers=ADMIN, timeout=30)
    assert resp.status_code == 400 and "--max-lora-rank" in resp.json()["error"], resp.text
    assert requests.post(srv.url + "/harli/jobs/guarded/cancel", headers=ADMIN, timeout=30).status_code == 404
