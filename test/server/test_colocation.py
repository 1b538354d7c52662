"""Co-location on the real server: training runs beside a decode load, and decode does not notice."""

from helpers.jobs import PROMPTS, job_spec, wait_for
from helpers.streams import LOAD_ROUNDS, MAX_NEW, decode_load


def test_training_beside_decode_changes_no_token(server):
    reference = decode_load(server)
    assert all(len(ids) == MAX_NEW for client in reference for ids in client)
    before = server.get("/harli/stats").json()["colocation"]["policy"]

    resp = server.post(
        "/harli/jobs", job_spec("beside", {"records": [{"text": p} for p in PROMPTS]}, epochs=1000)
    )
    assert resp.status_code == 201, resp.text
    wait_for(server, "beside", lambda s: s["step"] >= 1)

    assert decode_load(server) == reference  # every request completed, token for token the same
    stats = server.get("/harli/stats").json()
    job = server.post("/harli/jobs/beside/cancel", {}).json()
    assert job["state"] == "cancelled" and job["tokens_trained"] > 0

    colocation = stats["colocation"]
    assert colocation["policy"]["name"] == "harli"
    # it really co-ran: units were admitted between decode steps, not only while idle
    assert colocation["policy"]["admitted_units"] > before["admitted_units"]
    assert colocation["token_intervals"]["count"] > 0
    # both SLO measures: every streamed request's TPOT was kept by the server's ledger, per request
    assert colocation["slo_metric"] == "tpot" and colocation["requests"]["count"] >= 8 * LOAD_ROUNDS
    assert any(step[4] > 0 for step in colocation["recent_steps"])  # [at, batch, pred, obs, units, split]
    # clients sent their next prompt as one finished, while units ran: with no TTFT objective (the
    # default) none of those prefills waited for a decode step (test_ttft sets one: then they do)
    assert stats["prefills_deferred"] == 0 and colocation["prefill"]["held"] == 0
    assert colocation["prefill"]["ttft"]["count"] >= 8 * LOAD_ROUNDS
    predictor = colocation["predictor"]
    assert predictor["solo"]["samples"] > 0 and predictor["solo"]["mape_overall"] is not None
    assert predictor["corun"]["shared"]["mape_overall"] is not None
    assert set(predictor["units"]) == {"forward", "backward", "loss", "optimizer"}
    assert stats["finetune"]["profile"]["state"] in ("profiled", "cached")
    # its activations lived in lent KV pages (poisoned when lent, checked when returned)
    memory = stats["finetune"]["memory"]
    assert memory["enabled"] and memory["activations"]["placed_total"] > 0
    assert memory["poison_violations"] == 0
    after = server.get("/harli/stats").json()["finetune"]["memory"]
    assert after["lent_tokens"] == 0  # cancelling the job gave every page back

    metrics = server.get("/metrics").text
    admitted = [
        line
        for line in metrics.splitlines()
        if line.startswith("harli:finetune_units_total") and 'when="decode"' in line
    ]
    assert admitted and float(admitted[0].rsplit(" ", 1)[1]) > 0
    assert "harli:predictor_mape" in metrics and "harli:token_interval_seconds_bucket" in metrics
    assert "harli:request_tpot_seconds_bucket" in metrics and "harli:request_slo_attainment" in metrics
    assert "harli:kv_lent_tokens" in metrics and "harli:activation_bytes{" in metrics
