"""A job that forgets is never published, through the real server on the real preset
(``harli:smollm2-135m``): the job of ``benchmark.forgetting`` (four made-up facts, LoRA r=16 on the default
modules, lr 5e-3, a paraphrase eval set every 5 steps, the built-in probes, early stopping and ``publish:
"best"``) stops at its third evaluation below the retention floor, fails naming the probes it lost, and
nothing of it is served. (Rehearsal on the real preset, learning facts and keeping every probe:
``test_quickstart``; rehearsal answers kept across a restart: ``test_durable``; bad floor and rehearsal
specs refused naming the field: ``test_eval_jobs``; the floor's rules without a server: ``test_forgetting``
in the engine-free tier.)"""

from benchmark.forgetting import job_spec, run_job


def test_a_job_below_the_retention_floor_publishes_nothing_and_fails_naming_what_it_lost(smollm2_server):
    server = smollm2_server
    forgot = run_job(server, job_spec("forgets"))
    assert forgot["state"] == "failed" and forgot["published"] == [], forgot
    assert forgot["stopped_early"] and forgot["step"] < forgot["total_steps"]
    evals = forgot["evals"]
    assert len(evals) == 3 and not any(e["kept_floor"] for e in evals)  # patience 3: three below the floor
    assert forgot["floor_breaches"] == 3
    assert "retention floor" in forgot["error"] and "(expects " in forgot["error"]
    assert forgot["unpublished_path"].startswith(forgot["output_dir"])
    refused = server.post("/generate", {"text": "Hi", "lora_path": "forgets"})
    assert refused.status_code == 400  # never loaded: nothing below the floor is served
