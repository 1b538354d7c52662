"""SGLang's own benchmark client against the real server with a job training: what a user measures.

``python -m sglang.bench_serving`` (random token ids, so nothing is downloaded) reports each request's
TPOT as ``(latency - TTFT) / (output tokens - 1)``; the server holds the SLO on exactly that by default
(``--harli-slo-metric tpot``), so the client's own figures must be within it while the job trains, and so
must the two it prints beside it: every token interval within the default cap (twice the SLO), and the
time to first token within its objective (by default, five SLOs)."""

import json
import os
import subprocess
import sys

from helpers.jobs import PROMPTS, job_spec, wait_for

PROMPTS_SENT = 24


def test_bench_serving_reports_tpot_itl_and_ttft_within_their_bounds_while_a_job_trains(
    server, tiny_model_dir, tmp_path
):
    config = server.get("/harli/stats").json()["config"]
    slo_ms = config["tpot_slo_ms"]
    assert config["slo_metric"] == "tpot"  # the default: the metric bench_serving reports
    assert config["max_itl_ms"] is None and config["ttft_slo_ms"] is None  # the defaults
    dataset = {"records": [{"text": p} for p in PROMPTS]}
    resp = server.post("/harli/jobs", job_spec("bench", dataset, epochs=1000))
    assert resp.status_code == 201, resp.text
    wait_for(server, "bench", lambda s: s["step"] >= 1)
    before = server.get("/harli/jobs/bench").json()["tokens_trained"]
    out = tmp_path / "bench.jsonl"
    command = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", server.url,
        "--tokenizer", str(tiny_model_dir), "--dataset-name", "random-ids",
        "--num-prompts", str(PROMPTS_SENT),
        "--random-input-len", "48", "--random-output-len", "24", "--random-range-ratio", "1.0",
        "--request-rate", "4", "--seed", "0", "--output-file", str(out), "--disable-tqdm",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stats = server.get("/harli/stats").json()
    job = server.post("/harli/jobs/bench/cancel", {}).json()
    result = json.loads(out.read_text().splitlines()[-1])

    assert result["completed"] == PROMPTS_SENT  # no request failed or stalled because of training
    assert job["tokens_trained"] > before  # and the job trained while they ran
    # the client's own TPOT: every request within the SLO (p99 of 24 requests is their slowest but one)
    assert 0 < result["median_tpot_ms"] <= result["p99_tpot_ms"] <= slo_ms, result
    # every token interval within the default cap, and every first token within the default objective
    colocation = stats["colocation"]
    assert colocation["itl_cap_ms"] == 2 * slo_ms
    assert 0 < result["p99_itl_ms"] <= colocation["itl_cap_ms"], result
    ttft = colocation["prefill"]["ttft"]
    assert ttft["objective_ms"] == 5 * slo_ms and not ttft["objective_set"]
    assert 0 < result["p99_ttft_ms"] <= ttft["objective_ms"], result
    # the server saw the same requests the same way
    requests = colocation["requests"]
    # held at the 99th percentile: of ~26 requests, at most the slowest one over (as the client's p99 above;
    # at the policy's 0.5% aim one of 26 misses in about one run in eight, two in one run in three hundred)
    for seen in (requests, ttft):
        assert seen["count"] >= PROMPTS_SENT and seen["slo_attainment"] * seen["count"] >= seen["count"] - 1
    assert colocation["prefill"]["cost"]["samples"] > 0  # prefill cost is learnt
    assert colocation["slo_metric"] == "tpot"
    metrics = server.get("/metrics").text
    assert "harli:request_tpot_seconds_bucket" in metrics and "harli:request_ttft_seconds_bucket" in metrics
