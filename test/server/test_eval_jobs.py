"""Evaluation in finetune jobs through the real server: eval loss, accuracy and retention while a job runs,
early stopping, and ``publish: "best"`` serving the adapter that scored best."""

import re

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.jobs import ALL_MODULES, RECORDS, finished, generate, wait_for

TRAIN, HELD_OUT = RECORDS[:8], RECORDS[8:12]


def spec(name, **overrides):
    body = {
        "name": name,
        "dataset": {"records": TRAIN},
        "lora": {"r": 16, "alpha": 32, "target_modules": ALL_MODULES},
        "training": {"epochs": 30, "learning_rate": 0.01, "micro_batch_size": 4, "max_seq_len": 64},
    }
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return body


def eval_loss(model_dir, adapter_dir, records) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = tokenizer(r["prompt"]).input_ids
            ids = prompt + tokenizer(r["completion"], add_special_tokens=False).input_ids
            ids.append(tokenizer.eos_token_id)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(ids[1:])[len(prompt) - 1 :]
            total += float(F.cross_entropy(logits[len(prompt) - 1 :], targets, reduction="sum"))
            count += len(targets)
    return total / count


def test_a_job_reports_eval_loss_accuracy_and_retention_while_it_runs(server):
    base = [o["text"] for o in generate(server, [TRAIN[0]["prompt"], HELD_OUT[0]["prompt"]])]
    probes = [  # the base model's own greedy answers: kept by definition at step 0
        {"prompt": TRAIN[0]["prompt"], "expect": base[0].split()[0]},
        {"prompt": HELD_OUT[0]["prompt"], "expect": base[1].split()[0]},
    ]
    # retention reported only (a floor of 0): the floor itself is test_forgetting's
    evaluation = {"records": HELD_OUT, "every_steps": 4, "retention": probes, "retention_floor": 0.0}
    body = spec("evaluated", eval=evaluation)
    assert server.post("/harli/jobs", body).status_code == 201
    running = wait_for(server, "evaluated", lambda s: s["evals"] or finished(s))
    assert running["state"] == "running" and running["evals"][0]["step"] == 4
    done = wait_for(server, "evaluated", finished)
    assert done["state"] == "completed", done
    steps = [e["step"] for e in done["evals"]]
    assert steps == [*range(4, done["total_steps"] + 1, 4), done["total_steps"]][: len(steps)]
    assert steps[-1] == done["total_steps"]
    last = done["evals"][-1]
    assert done["eval_loss"] == last["loss"] and 0 <= done["eval_accuracy"] <= 1
    assert done["retention_total"] == 2 and done["retention_kept"] == 2 - len(last["lost"])
    # The probe on a trained prompt is lost (the adapter answers its completion now): forgetting shows.
    assert 0 in last["lost"], done["evals"]
    # The reported eval loss is the served adapter's, scored by plain transformers + PEFT.
    model_dir = server.get("/get_model_info").json()["model_path"]
    assert last["loss"] == pytest.approx(eval_loss(model_dir, done["adapter_path"], HELD_OUT), rel=1e-3)
    metrics = server.get("/metrics").text
    assert re.search(r'harli:finetune_eval_loss\{[^}]*job="evaluated"[^}]*\} [0-9.]+', metrics), metrics[
        -2000:
    ]
    assert re.search(r'harli:finetune_retention_probes\{[^}]*probes="total"[^}]*\} 2\.0', metrics)


def test_only_versions_that_keep_the_retention_floor_are_published_and_breaches_are_counted(server):
    base = generate(server, [TRAIN[0]["prompt"]])[0]["text"]
    probe = {"prompt": TRAIN[0]["prompt"], "expect": base.split()[0]}  # lost once its completion is learnt
    evaluation = {"records": HELD_OUT, "every_steps": 2, "retention": [probe]}
    body = spec("floored", training={"epochs": 6}, eval=evaluation, publish={"every_steps": 2})
    assert server.post("/harli/jobs", body).status_code == 201
    done = wait_for(server, "floored", finished)
    kept = {e["step"] for e in done["evals"] if e["kept_floor"]}
    assert done["floor_breaches"] == len(done["evals"]) - len(kept) >= 1, done["evals"]
    assert {v["step"] for v in done["published"]} <= kept  # no version below the floor
    assert all(v["retention_kept"] == v["retention_total"] == 1 for v in done["published"])
    if not kept:
        assert done["state"] == "failed" and done["published"] == [] and done["unpublished_path"]
    metrics = server.get("/metrics").text
    assert re.search(r'harli:retention_floor_breaches_total\{[^}]*job="floored"[^}]*\} [1-9]', metrics)


def test_early_stopping_publishes_the_best_adapter(server):
    body = spec(
        "stopped",
        training={"epochs": 200, "learning_rate": 0.02, "early_stopping": {"patience": 2}},
        eval={"records": HELD_OUT, "every_steps": 2},
        publish="best",
    )
    assert server.post("/harli/jobs", body).status_code == 201
    done = wait_for(server, "stopped", finished, timeout=600)
    assert done["state"] == "completed" and done["stopped_early"], done
    assert done["step"] < done["total_steps"]
    losses = {e["step"]: e["loss"] for e in done["evals"]}
    best = min(losses, key=losses.get)
    assert done["best_step"] == best and done["published"][-1]["step"] == best
    assert max(s for s in losses if s > best) >= best + 4  # patience: two evaluations without improvement
    model_dir = server.get("/get_model_info").json()["model_path"]
    served = eval_loss(model_dir, done["adapter_path"], HELD_OUT)
    assert served == pytest.approx(losses[best], rel=1e-3) and served < losses[done["step"]]
    out = generate(server, [HELD_OUT[0]["prompt"]], lora_path="stopped")
    assert out[0]["output_ids"]  # the best adapter is served under the job's name


@pytest.mark.parametrize(
    "overrides, status, field",
    [
        ({"eval": {"records": [{"text": ""}]}}, 400, "eval.records[0]"),
        ({"eval": {"retention": "builtin"}}, 400, "eval.retention"),
        ({"eval": {"split": 0.99}}, 400, "eval.split"),
        ({"eval": {"every_steps": -1, "split": 0.2}}, 422, "eval.every_steps"),
        ({"publish": "best"}, 422, "publish"),
        (
            {"eval": {"retention": [{"prompt": "a", "expect": "b"}], "retention_floor": 1.5}},
            422,
            "eval.retention_floor",
        ),
        ({"rehearsal": {"prompts": []}}, 422, "rehearsal.prompts"),
        ({"rehearsal": {"prompts": ["fine", ""]}}, 422, "rehearsal.prompts[1]"),
        ({"rehearsal": {"prompts": "builtin"}}, 400, "rehearsal.prompts"),  # the tiny model ships no set
    ],
)
def test_bad_eval_specs_are_refused_naming_the_field(server, overrides, status, field):
    response = server.post("/harli/jobs", spec("refused", **overrides))
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
