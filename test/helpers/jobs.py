"""Finetune job data and the HTTP helpers the server tests share: records that teach a tiny model codes,
a job spec, waiting for a job, greedy generation."""

import random
import time

WORDS = (
    "amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lumen maple nectar onyx pylon"
).split()
_rng = random.Random(0)
RECORDS = [
    {"prompt": f"Code {i:02d}:", "completion": " " + " ".join(_rng.sample(WORDS, 3))} for i in range(16)
]
PROMPTS = [r["prompt"] for r in RECORDS]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW = 16


def job_spec(name, dataset, epochs=40, **training):
    return {
        "name": name,
        "dataset": dataset,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ALL_MODULES},
        "training": {
            "epochs": epochs,
            "learning_rate": 0.01,
            "micro_batch_size": 4,
            "max_seq_len": 64,
            **training,
        },
        "publish": {"every_steps": 50},
    }


def wait_for(server, name, until, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get(f"/harli/jobs/{name}").json()
        if until(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {name} stuck: {status}")


def finished(status):
    return status["state"] in ("completed", "failed", "cancelled")


def generate(server, prompts, lora_path=None):
    body = {"text": prompts, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}}
    if lora_path:
        body["lora_path"] = [lora_path] * len(prompts)
    resp = server.post("/generate", body)
    assert resp.status_code == 200, resp.text
    return resp.json()
