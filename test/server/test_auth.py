"""``/harli/*`` honours SGLang's --api-key and --admin-api-key the way SGLang's own routes do."""

import requests

from sglang_harli.server_process import ServerProcess

USER = {"Authorization": "Bearer sk-user"}
ADMIN = {"Authorization": "Bearer sk-admin"}
JOB = {"name": "guarded", "dataset": {"records": [{"prompt": "a", "completion": " b"}]}}


def test_harli_routes_follow_sglang_auth(tmp_path, tiny_model_dir):
    args = ["--api-key", "sk-user", "--admin-api-key", "sk-admin"]  # and no --enable-lora
    with ServerProcess(args, tmp_path / "server.log") as srv:
        # Reading is a normal route: the API key opens it.
        assert requests.get(srv.url + "/harli/stats", timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(srv.url + "/harli/stats", headers=wrong, timeout=30).status_code == 401
        ok = requests.get(srv.url + "/harli/stats", headers=USER, timeout=30)
        assert ok.status_code == 200 and ok.json()["config"]["tpot_slo_ms"] == 100.0
        assert requests.get(srv.url + "/harli/jobs", headers=USER, timeout=30).json() == []
        # SGLang's own route behaves the same way, which is the point.
        assert requests.post(srv.url + "/generate", json={"text": "a"}, timeout=30).status_code == 401

        # Creating and cancelling jobs are admin actions, like SGLang's /load_lora_adapter.
        for path in ("/harli/jobs", "/load_lora_adapter"):
            assert requests.post(srv.url + path, json=JOB, headers=USER, timeout=30).status_code == 401, path
        assert (
            requests.post(srv.url + "/harli/jobs/guarded/cancel", headers=USER, timeout=30).status_code == 401
        )
        # With the admin key the request gets through, and is refused for what it is: LoRA is off here.
        resp = requests.post(srv.url + "/harli/jobs", json=JOB, headers=ADMIN, timeout=30)
        assert resp.status_code == 400 and "--enable-lora" in resp.json()["error"], resp.text
        assert (
            requests.post(srv.url + "/harli/jobs/guarded/cancel", headers=ADMIN, timeout=30).status_code
            == 404
        )
