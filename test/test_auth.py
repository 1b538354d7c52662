"""``/harli/*`` honours SGLang's --api-key like SGLang's own routes."""

import requests

from sglang_harli.server_process import ServerProcess


def test_stats_need_the_api_key(tmp_path, tiny_model_dir):
    with ServerProcess(["--api-key", "sk-test"], tmp_path / "server.log") as srv:
        assert requests.get(srv.url + "/harli/stats", timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(srv.url + "/harli/stats", headers=wrong, timeout=30).status_code == 401
        ok = requests.get(srv.url + "/harli/stats", headers={"Authorization": "Bearer sk-test"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["config"]["tpot_slo_ms"] == 100.0
        # SGLang's own route behaves the same way, which is the point.
        assert requests.post(srv.url + "/generate", json={"text": "a"}, timeout=30).status_code == 401
