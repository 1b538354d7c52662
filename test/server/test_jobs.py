"""Finetune jobs through a real server's HTTP API: it learns, serves what it learned, decode holds."""

import json
import time

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.jobs import MAX_NEW, PROMPTS, RECORDS, finished, generate, job_spec, wait_for


@pytest.fixture(scope="module")
def base_outputs(server):
    """Greedy base-model outputs before any job exists on this server."""
    return [o["output_ids"] for o in generate(server, PROMPTS)]


@pytest.fixture(scope="module")
def trained(server, base_outputs):
    resp = server.post("/harli/jobs", job_spec("codes", {"records": RECORDS}))
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "queued" and resp.json()["total_steps"] == 160
    status = wait_for(server, "codes", finished)
    assert status["state"] == "completed", status
    return status


def test_job_learns_and_serves_what_it_learned(server, trained, tiny_model_dir):
    assert trained["step"] == trained["total_steps"] == 160 and trained["epoch"] == 40
    assert trained["tokens_trained"] > 0 and trained["tokens_per_s"] > 0
    assert trained["loss"] < 0.05
    versions = trained["published"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4] and [v["step"] for v in versions] == [
        50,
        100,
        150,
        160,
    ]
    assert all(v["loaded"] and v["error"] is None for v in versions)
    assert trained["adapter_path"] == versions[-1]["path"]

    lora_out = generate(server, PROMPTS, "codes")
    learnt = sum(o["text"].startswith(r["completion"]) for o, r in zip(lora_out, RECORDS, strict=True))
    assert learnt >= 15, [o["text"] for o in lora_out]
    base_out = generate(server, PROMPTS)
    assert sum(o["text"].startswith(r["completion"]) for o, r in zip(base_out, RECORDS, strict=True)) <= 1

    # The adapter on disk is a plain PEFT adapter, and PEFT generates exactly what the server served.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, trained["adapter_path"]).eval()
    for prompt, out in list(zip(PROMPTS, lora_out, strict=True))[:6]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = peft_model.generate(input_ids=ids, max_new_tokens=MAX_NEW, do_sample=False)
        assert out["output_ids"] == ref[0, ids.shape[1] :].tolist(), prompt

    models = [m["id"] for m in server.get("/v1/models").json()["data"]]
    assert "codes" in models or any(m.endswith(":codes") for m in models), models


def test_trainer_shares_the_served_weights(server, trained):
    finetune = server.get("/harli/stats").json()["finetune"]
    weights = finetune["base_weights"]
    assert weights["params"] > 0 and weights["shared_with_server"] == weights["params"]
    assert finetune["jobs"]["completed"] >= 1


def test_decode_is_untouched_while_a_job_trains(server, trained, base_outputs, data_dir):
    lora_before = [o["output_ids"] for o in generate(server, PROMPTS[:4], "codes")]
    (data_dir / "chat.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["completion"]},
                    ]
                }
            )
            for r in RECORDS
        )
    )
    resp = server.post("/harli/jobs", job_spec("long", {"path": "chat.jsonl"}, epochs=1000))
    assert resp.status_code == 201, resp.text
    first = wait_for(server, "long", lambda s: s["step"] >= 2)
    assert first["state"] == "running"

    for _ in range(3):
        assert [o["output_ids"] for o in generate(server, PROMPTS)] == base_outputs
        assert [o["output_ids"] for o in generate(server, PROMPTS[:4], "codes")] == lora_before
    during = server.get("/harli/jobs/long").json()
    assert during["state"] == "running" and during["step"] > first["step"]  # it really trained alongside

    resp = server.post("/harli/jobs/long/cancel", {})
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled", resp.text
    step = resp.json()["step"]
    time.sleep(0.5)
    assert server.get("/harli/jobs/long").json()["step"] == step  # stopped for good
    assert server.post("/harli/jobs/long/cancel", {}).status_code == 409
    assert [o["output_ids"] for o in generate(server, PROMPTS)] == base_outputs
    listed = {j["name"]: j["state"] for j in server.get("/harli/jobs").json()}
    assert listed["codes"] == "completed" and listed["long"] == "cancelled"


def _refused(server, body, status, *needles):
    resp = server.post("/harli/jobs", body)
    assert resp.status_code == status, resp.text
    text = resp.text
    for needle in needles:
        assert needle in text, text
    return resp.json()


def test_bad_jobs_are_refused_and_serving_goes_on(server, trained, data_dir):
    records = {"records": RECORDS[:2]}
    spec = job_spec("bad", records)

    def with_(section, **values):
        return {**spec, section: {**spec[section], **values}}

    _refused(server, with_("lora", r=64), 400, "lora.r", "--max-lora-rank 16")
    _refused(server, with_("lora", target_modules=["lm_head"]), 400, "lora.target_modules")
    _refused(server, with_("training", epochs=0), 422, "training.epochs")
    _refused(server, with_("training", learning_rate="fast"), 422, "training.learning_rate")
    _refused(server, {**spec, "unexpected": 1}, 422, "unexpected")
    _refused(server, {**spec, "name": "no spaces please"}, 422, "name")
    _refused(server, {**spec, "name": "codes"}, 409, "codes")
    _refused(server, {**spec, "dataset": {"records": RECORDS[:1], "path": "x.jsonl"}}, 400, "dataset")
    _refused(
        server, {**spec, "dataset": {"records": [{"prompt": "only a prompt"}]}}, 400, "dataset.records[0]"
    )
    _refused(server, {**spec, "dataset": {"path": "../outside.jsonl"}}, 400, "dataset.path", "outside")
    _refused(server, {**spec, "dataset": {"path": "/etc/hostname"}}, 400, "dataset.path")
    _refused(server, {**spec, "dataset": {"path": "missing.jsonl"}}, 400, "dataset.path", "missing.jsonl")
    (data_dir / "broken.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    _refused(server, {**spec, "dataset": {"path": "broken.jsonl"}}, 400, "line 2")
    resp = server.post("/harli/jobs", None, data=b"{oops", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.text

    assert server.get("/harli/jobs/nobody").status_code == 404
    assert server.post("/harli/jobs/nobody/cancel", {}).status_code == 404
    assert "bad" not in {j["name"] for j in server.get("/harli/jobs").json()}
    assert generate(server, PROMPTS[:2])[0]["output_ids"]


def _greedy_ignoring_eos(model, ids: list[int], steps: int) -> list[int]:
    """What SGLang's greedy decode with ignore_eos produces: argmax, step after step, through EOS."""
    out, past, step_ids = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            result = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            step_ids = torch.tensor([[out[-1]]])
    return out


def test_a_new_version_serves_new_requests_while_old_requests_finish_on_theirs(server, tiny_model_dir):
    spec = job_spec("swap", {"records": RECORDS}, epochs=4)
    spec["publish"] = {"every_steps": 2}
    assert server.post("/harli/jobs", spec).status_code == 201
    wait_for(server, "swap", lambda s: s["published"] and s["published"][0]["loaded"])

    steps = 96
    body = {
        "text": PROMPTS[0],
        "lora_path": "swap",
        "stream": True,
        "sampling_params": {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True},
    }

    def loaded():
        return sum(v["loaded"] for v in server.get("/harli/jobs/swap").json()["published"])

    # Request after request until one sees a version go live while it streams (the job trains beside
    # decode, so one of them will; how many it takes depends on the machine, the outcome does not).
    streamed_runs, straddled = [], False
    while not straddled and not finished(server.get("/harli/jobs/swap").json()):
        before = loaded()
        with requests.post(server.url + "/generate", json=body, stream=True, timeout=300) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: {")]
        streamed_runs.append(chunks[-1]["output_ids"])
        straddled = loaded() > before
    assert straddled, "no new version went live while a request ran"

    final = wait_for(server, "swap", finished)
    assert final["state"] == "completed" and len(final["published"]) == 8
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = tokenizer(PROMPTS[0]).input_ids
    per_version = []
    for version in final["published"]:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, version["path"]).eval()
        per_version.append(_greedy_ignoring_eos(model, prompt_ids, steps))
    assert len({tuple(ids) for ids in per_version}) > 1  # the versions really differ
    for streamed in streamed_runs:
        assert streamed in per_version  # one version from first token to last, never a mix
    after = server.post("/generate", {**body, "stream": False}).json()
    assert after["output_ids"] == per_version[-1]  # new requests get the newest version
