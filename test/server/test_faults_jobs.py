"""A job that blows up mid-run fails alone: its reason is reported, its lent pages come back, decode goes on
(and returns exactly what it returns with no job at all)."""

import threading

import pytest

from helpers.jobs import ALL_MODULES, PROMPTS, RECORDS, finished, generate, wait_for

pytestmark = pytest.mark.server


def test_a_diverging_job_fails_with_its_reason_and_decode_never_notices(server):
    base = [o["output_ids"] for o in generate(server, PROMPTS)]
    diverging = {
        "name": "diverges",
        "dataset": {"records": RECORDS},
        # A learning rate this large, with no clipping, drives the loss to NaN within a few steps.
        "lora": {"r": 16, "alpha": 1024, "target_modules": ALL_MODULES},
        "training": {"epochs": 50, "learning_rate": 1.0, "max_grad_norm": 0, "max_seq_len": 64},
    }
    outputs, errors = [], []

    def decode_load(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                outputs.append([o["output_ids"] for o in generate(server, PROMPTS)])
            except AssertionError as exc:  # generate() asserts a 200
                errors.append(str(exc))

    stop = threading.Event()
    load = threading.Thread(target=decode_load, args=(stop,))
    load.start()
    try:
        assert server.post("/harli/jobs", diverging).status_code == 201
        status = wait_for(server, "diverges", finished)
    finally:
        stop.set()
        load.join()
    assert status["state"] == "failed" and "loss is nan" in status["error"], status
    assert 0 < status["step"] < status["total_steps"]  # it got somewhere before it diverged
    assert status["published"] == []  # nothing a NaN touched was served

    memory = server.get("/harli/stats").json()["finetune"]["memory"]
    assert memory["lent_tokens"] == 0 and memory["poison_violations"] == 0
    assert not errors and outputs and all(o == base for o in outputs)
    # The name is free again: the client can fix the job and resubmit it.
    diverging["training"]["learning_rate"] = 0.01
    diverging["training"]["epochs"] = 1
    assert server.post("/harli/jobs", diverging).status_code == 201
    assert wait_for(server, "diverges", finished)["state"] == "completed"
