"""A job that forgets is never published, and rehearsal is trained on as the spec says: the retention
floor (``core.jobs.evaluation.EvalTracker``), rehearsal in the step plan (``core.training.trainer``), and a
job's life with both on the scheduler side, over the fake scheduler (no server; the answers the base model
gives through the server are the fake's inputs here, and ``test/server/test_retention_floor.py`` asks them of
the real one)."""

import math
from pathlib import Path

import msgspec
import pytest
import torch

from helpers.fake_scheduler import FakeScheduler
from helpers.jobs import ALL_MODULES, RECORDS
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.jobs.book import EvalRecord
from sglang_harli.core.jobs.data import Example
from sglang_harli.core.jobs.evaluation import EvalTracker
from sglang_harli.core.jobs.spec import TrainingSpec, decode_spec
from sglang_harli.core.training.trainer import StepPlan, plan_steps

TRAIN = RECORDS[:8]


def examples(count: int, offset: int = 0) -> list[Example]:
    return [Example([offset + i, offset + i + 1, offset + i + 2], [False, True, True]) for i in range(count)]


def test_each_epoch_trains_every_example_and_the_next_rehearsal_answers_in_turn():
    training = TrainingSpec(epochs=5, micro_batch_size=3, seed=4)
    train, pool = examples(4), examples(10, offset=100)
    plan = StepPlan(train, training, rehearsal=pool, rehearsal_ratio=0.5)  # 2 answers an epoch
    assert plan.total_steps == 5 * math.ceil(6 / 3)
    seen = []
    for epoch in range(5):
        members = [i for step in range(2 * epoch, 2 * epoch + 2) for mb in plan.step(step) for i in mb]
        assert sorted(i for i in members if i < 4) == [0, 1, 2, 3]  # every training example, once
        rehearsed = [i for i in members if i >= 4]
        assert len(rehearsed) == 2
        seen += rehearsed
    assert sorted(seen) == list(range(4, 14))  # the ten answers, each once over five epochs
    # a ratio past the pool takes the whole pool each epoch, never an answer twice in one epoch
    whole = StepPlan(train, training, rehearsal=pool[:3], rehearsal_ratio=4.0)
    assert whole.total_steps == plan_steps(7, training)
    assert sorted(i for mb in whole.step(0) + whole.step(1) + whole.step(2) for i in mb) == list(range(7))
    # without rehearsal each epoch is the plain seeded shuffle it always was
    plain, bare = StepPlan(train, training), StepPlan(train, training, rehearsal=pool, rehearsal_ratio=0)
    assert [plain.step(s) for s in range(10)] == [bare.step(s) for s in range(10)]
    order = torch.randperm(4, generator=torch.Generator().manual_seed(4 * 100_003 + 2)).tolist()
    assert plain.step(4) == [order[:3]] and plain.step(5) == [order[3:]]  # epoch 2: the seed's shuffle


def record(step, loss, lost, total=4) -> EvalRecord:
    return EvalRecord(
        step=step, loss=loss, retention_kept=total - len(lost), retention_total=total, lost=lost
    )


def test_best_is_the_lowest_eval_loss_among_evaluations_that_keep_the_floor():
    tracker = EvalTracker(patience=3, min_delta=0.0, keep_best=True, floor=1.0)
    history = [record(5, 2.0, []), record(10, 1.0, [2]), record(15, 1.5, []), record(20, 0.5, [0, 1])]
    for r in history:
        tracker.observe(r, lambda r=r: {"w": torch.tensor(float(r.step))})  # the weights of that step
    assert [r.kept_floor for r in history] == [True, False, True, False]
    assert tracker.best_step == 15 and tracker.best_weights["w"].item() == 15  # not step 10's lower loss
    assert tracker.last_kept_step == 15 and tracker.breaches == 2 and tracker.below_floor == 1
    assert not tracker.should_stop
    for step in (25, 30):
        tracker.observe(record(step, 0.1, [3]), dict)
    assert tracker.should_stop and "below the floor for 3 evaluations" in tracker.stop_reason
    # a floor of one half keeps two of four
    half = EvalTracker(patience=None, min_delta=0.0, keep_best=False, floor=0.5)
    half.observe(kept := record(5, 1.0, [0, 1]), dict)
    half.observe(lost := record(10, 1.0, [0, 1, 2]), dict)
    assert kept.kept_floor and not lost.kept_floor
    # only the probes the base model answered right count
    based = EvalTracker(patience=None, min_delta=0.0, keep_best=False, floor=1.0, base_kept=[1, 1, 0, 1])
    based.observe(wrong_before := record(5, 1.0, [2]), dict)
    assert wrong_before.kept_floor


@pytest.fixture
def fake(tiny_model_dir, tmp_path):
    return FakeScheduler(tiny_model_dir, HarliConfig(output_dir=str(tmp_path / "adapters")))


def spec(name, **overrides):
    body = {
        "name": name,
        "dataset": {"records": TRAIN},
        "lora": {"r": 8, "alpha": 16, "target_modules": ALL_MODULES},
        "training": {"epochs": 4, "learning_rate": 0.01, "micro_batch_size": 4, "max_seq_len": 64},
        # the tiny model never says this: every evaluation loses the probe
        "eval": {"retention": [{"prompt": "The sky is", "expect": "zzz-never"}], "every_steps": 2},
    }
    return body | overrides


def test_a_job_whose_every_evaluation_loses_a_probe_publishes_nothing_and_fails_naming_it(fake):
    fake.submit(spec("forgets"), base_kept=[True])
    fake.run_until(lambda: fake.job("forgets").state == "failed")
    job = fake.job("forgets")
    assert job.published == [] and not fake.host.published  # nothing written as a version, nothing served
    assert "'The sky is'" in job.error and "'zzz-never'" in job.error and "retention floor" in job.error
    assert [e.kept_floor for e in job.evals] == [False] * 4 and job.floor_breaches == 4
    kept_on_disk = Path(job.unpublished_path) / "adapter_model.safetensors"
    assert kept_on_disk.is_file() and Path(job.unpublished_path).parent == Path(job.output_dir)


def test_early_stopping_stops_a_job_below_the_floor_after_patience_evaluations(fake):
    body = spec("stops", training={**spec("x")["training"], "epochs": 50, "early_stopping": {"patience": 2}})
    body["eval"] = {**body["eval"], "records": RECORDS[8:12]}
    fake.submit(body, base_kept=[True])
    fake.run_until(lambda: fake.job("stops").state == "failed")
    job = fake.job("stops")
    assert job.stopped_early and job.step == 4 and [e.step for e in job.evals] == [2, 4]


def test_probes_the_base_model_answers_wrong_do_not_count_and_versions_keep_their_retention(fake):
    body = spec("counts", publish={"every_steps": 4})
    fake.submit(body, base_kept=[False])
    fake.run_until(lambda: fake.job("counts").state == "publishing")
    fake.serve()
    job = fake.job("counts")
    assert job.state == "completed" and job.floor_breaches == 0
    assert [(v.step, v.retention_kept, v.retention_total) for v in job.published] == [(4, 0, 1), (8, 0, 1)]


def test_rehearsal_answers_are_trained_beside_the_examples_every_epoch(fake):
    body = spec("rehearses")
    del body["eval"]
    body["rehearsal"] = {"prompts": ["One", [{"role": "user", "content": "Two"}], "Three"], "ratio": 0.5}
    job = fake.submit(body, rehearsal_answers=[" one.", " two.", " three."])
    assert job.rehearsal_examples == 3 and job.examples == 8
    assert job.total_steps == 4 * math.ceil((8 + 3) / 4)  # 8 examples and 3 answers (ratio 0.5: 4, at most 3)
    fake.run_until(lambda: fake.job("rehearses").state == "publishing")
    trained = fake.examples(spec("x"))
    assert fake.job("rehearses").tokens_trained > 4 * sum(len(e.input_ids) for e in trained)


def test_bad_floor_and_rehearsal_specs_are_refused_naming_the_field(fake):
    for body, field in (
        ({"eval": {"retention": "builtin", "retention_floor": 1.5}}, "eval.retention_floor"),
        ({"rehearsal": {"prompts": []}}, "rehearsal.prompts"),
        ({"rehearsal": {"prompts": ["ok", " "]}}, "rehearsal.prompts[1]"),
        ({"rehearsal": {"prompts": ["ok"], "ratio": 0}}, "rehearsal.ratio"),
    ):
        with pytest.raises(Exception) as refused:
            decode_spec(msgspec.json.encode({"name": "bad", "dataset": {"records": TRAIN}, **body}))
        assert refused.value.field == field, refused.value
