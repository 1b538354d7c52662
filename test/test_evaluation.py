"""Evaluation units score what plain transformers + PEFT score: eval loss, token accuracy, greedy answers."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from sglang_harli.core.jobs.book import EvalRecord
from sglang_harli.core.jobs.data import DatasetError, Example
from sglang_harli.core.jobs.eval_data import EvalData, Probe, split_examples
from sglang_harli.core.jobs.evaluation import EvalPass, EvalTracker
from sglang_harli.core.jobs.spec import LoraSpec, SpecError, TrainingSpec, decode_spec
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.models.builtin import materialize

PROMPTS = ["The river town", "Code 01:", "A long time ago, in the hills"]


def _trainer(path, layers_per_unit):
    config = AutoConfig.from_pretrained(path)
    served = {n: t.float() for n, t in load_file(str(path / "model.safetensors")).items()}
    if config.tie_word_embeddings:
        served["lm_head.weight"] = served["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = [
        Example(input_ids=ids, loss_mask=[i > 2 for i in range(len(ids))])
        for ids in (tokenizer(p + " and more words here").input_ids for p in PROMPTS)
    ]
    lora = LoraSpec(r=4, target_modules=["q_proj", "v_proj"])
    trainer = LoraTrainer(
        build_bound_model(config, served),
        examples,
        lora,
        TrainingSpec(learning_rate=1e-2, epochs=2),
        layers_per_unit=layers_per_unit,
    )
    for _ in range(3 * trainer.units_per_micro_batch):  # some training, so the adapter is not zero
        trainer.run_unit()
    return trainer, tokenizer, examples


def _run(trainer, data, tokenizer):
    evaluation = EvalPass(
        trainer,
        data,
        step=trainer.step,
        micro_batch_size=2,
        eos_ids={tokenizer.eos_token_id},
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )
    planned = evaluation.peek(100_000)
    units = 0
    while not evaluation.done:
        evaluation.run_unit()
        units += 1
    assert units <= len(planned)
    return evaluation, evaluation.result()


# The real model's case is marked ``server``: it is a download, and the engine-free tier needs no network.
@pytest.mark.parametrize(
    "preset, layers_per_unit", [("tiny", 1), pytest.param("smollm2-135m", 7, marks=pytest.mark.server)]
)
def test_eval_pass_equals_the_peft_model_scored_whole(preset, layers_per_unit):
    path = materialize(preset)
    trainer, tokenizer, examples = _trainer(path, layers_per_unit)
    probes = [Probe(input_ids=tokenizer(p).input_ids, expect="x") for p in PROMPTS]
    evaluation, record = _run(
        trainer, EvalData(examples=examples, probes=probes, max_new_tokens=8), tokenizer
    )

    model = trainer.model
    model.eval()
    loss_sum, correct, targets = 0.0, 0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(e.input_ids[1:])
            mask = torch.tensor(e.loss_mask[1:])
            loss_sum += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
            targets += int(mask.sum())
        expected = []
        for p in probes:  # one at a time: no padding in the reference
            ids = torch.tensor([p.input_ids])
            out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
            expected.append([t for t in out[0, ids.shape[1] :].tolist() if t != tokenizer.eos_token_id])
    model.train()
    assert record.loss == pytest.approx(loss_sum / targets, rel=1e-4)
    assert record.accuracy == correct / targets
    assert evaluation._answers == expected
    assert record.retention_total == 3 and record.retention_kept is not None


def test_tracker_keeps_the_best_weights_and_stops_after_patience():
    tracker = EvalTracker(patience=2, min_delta=0.0, keep_best=True)
    weights = {"w": torch.zeros(2)}
    for step, loss in enumerate([3.0, 2.0, 2.5, 1.9, 2.0, 2.1], start=1):
        weights["w"] += 1
        tracker.observe(EvalRecord(step=step, loss=loss), lambda: weights)
    assert tracker.best_step == 4 and tracker.best_loss == 1.9
    assert torch.equal(tracker.best_weights["w"], torch.full((2,), 4.0))
    assert tracker.should_stop


def test_split_holds_out_a_seeded_fraction_and_refuses_an_empty_side():
    examples = [Example(input_ids=[1, i], loss_mask=[False, True]) for i in range(10)]
    train, held = split_examples(examples, 0.2, seed=5)
    assert len(held) == 2 and len(train) == 8 and not set(map(id, held)) & set(map(id, train))
    assert split_examples(examples, 0.2, seed=5) == (train, held)
    with pytest.raises(DatasetError, match="eval.split"):
        split_examples(examples[:1], 0.5, seed=0)


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"eval": {"records": [], "split": 0.1}}, "eval.split"),
        ({"eval": {}}, "eval"),
        ({"eval": {"split": 1.5}}, "eval.split"),
        ({"eval": {"retention": [{"prompt": "a", "messages": [], "expect": "b"}]}}, "eval.retention[0]"),
        ({"training": {"early_stopping": {"patience": 2}}}, "training.early_stopping"),
        ({"publish": "best", "eval": {"retention": [{"prompt": "a", "expect": "b"}]}}, "publish"),
        ({"publish": "worst"}, "publish"),
    ],
)
def test_bad_eval_specs_are_422_naming_the_field(extra, field):
    import json

    body = {"name": "j", "dataset": {"records": [{"text": "x"}]}, **extra}
    with pytest.raises(SpecError) as caught:
        decode_spec(json.dumps(body).encode())
    assert caught.value.status == 422 and caught.value.field == field, caught.value


def test_the_cli_progress_line_and_summary_show_the_latest_evaluation():
    from sglang_harli.jobs import progress_fields, summary

    status = {
        "name": "a", "state": "completed", "step": 3, "total_steps": 9, "epoch": 1, "epochs": 3,
        "examples": 4, "tokens_trained": 9, "loss": 1.2, "tokens_per_s": 3.0, "eval_loss": 1.5,
        "eval_accuracy": 0.5, "retention_kept": 7, "retention_total": 8, "evals": [{}], "best_step": 2,
        "stopped_early": True,
    }  # fmt: skip
    assert progress_fields(status) == {
        "loss": "1.2000", "tok/s": "3", "eval": "1.5000", "acc": "0.500", "kept": "7/8"
    }  # fmt: skip
    assert "eval loss 1.5000, accuracy 0.500, retention kept 7/8, best at step 2 (stopped early)" in summary(
        status
    )


def test_a_durable_job_keeps_its_eval_data(tmp_path):
    from sglang_harli.core.jobs.book import JobStatus
    from sglang_harli.core.jobs.staging import stage_examples
    from sglang_harli.core.jobs.store import JobStore

    store = JobStore(tmp_path)
    examples = [Example(input_ids=[1, 2, 3], loss_mask=[False, True, True])]
    data = EvalData(examples=examples, probes=[Probe(input_ids=[1, 5], expect="Paris")], max_new_tokens=7)
    store.add(JobStatus(name="kept"), stage_examples(tmp_path, examples), data)
    store.flush()
    assert JobStore(tmp_path).evaluation("kept") == data
    store.finished(JobStatus(name="kept", state="completed"))
    store.flush()
    assert not (tmp_path / "jobs" / "kept" / "eval.msgpack").exists()
