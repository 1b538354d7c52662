"""A finetune job's whole life on the scheduler side, without a server: the rooms the server wires
(``core.runner.finetuning``) over a fake of what SGLang's scheduler gives them (``helpers.fake_scheduler``).

Start (bound to the served weights, nothing copied), units, versions published every N steps, ``publishing``
until the tokenizer manager answers and only then ``completed``; evaluation, early stopping and
``publish: "best"``; cancel; a failing job failing alone; a restart resuming a job bit for bit."""

import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers.fake_scheduler import FakeHost, FakeScheduler
from helpers.jobs import ALL_MODULES, RECORDS
from sglang_harli.core.config import HarliConfig
from sglang_harli.core.errors import Conflict, SpecError
from sglang_harli.core.jobs.spec import ServingLimits
from sglang_harli.core.training.memory import ActivationStore, TrainerMemory
from sglang_harli.core.wire.control import CancelJob, GetJob, ListJobs

TRAIN, HELD_OUT = RECORDS[:8], RECORDS[8:12]


def spec(name, *, epochs=6, **overrides):
    body = {
        "name": name,
        "dataset": {"records": TRAIN},
        "lora": {"r": 8, "alpha": 16, "target_modules": ALL_MODULES},
        "training": {"epochs": epochs, "learning_rate": 0.01, "micro_batch_size": 4, "max_seq_len": 64},
    }
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return body


def adapter_weights(path) -> dict[str, torch.Tensor]:
    return load_file(f"{path}/adapter_model.safetensors")


@pytest.fixture
def fake(tiny_model_dir, tmp_path):
    return FakeScheduler(tiny_model_dir, HarliConfig(output_dir=str(tmp_path / "adapters")))


def test_a_job_trains_on_the_served_weights_publishes_and_completes_once_served(fake, tiny_model_dir):
    job = fake.submit(spec("memo", publish={"every_steps": 2}))
    assert job.state == "queued" and job.total_steps == 12  # 8 examples, 4 a step, 6 epochs
    fake.place()
    assert fake.job("memo").state == "running" and fake.finetuning.training == "memo"
    weights = fake.finetuning.starter.base_weights
    assert weights["params"] == weights["shared_with_server"] > 0  # every base parameter is a view
    fake.run_until(lambda: not fake.finetuning.has_work)
    job = fake.job("memo")
    # Trained, its final version written and asked for, but not served yet: not completed.
    assert job.state == "publishing" and job.step == job.total_steps
    every_two = [(i + 1, step, False) for i, step in enumerate(range(2, 12, 2))]
    assert [(v.version, v.step, v.final) for v in job.published] == [*every_two, (6, 12, True)]
    assert [v.version for v in fake.host.published] == [1, 2, 3, 4, 5, 6]
    assert not fake.finetuning.has_work and fake.finetuning.training is None
    fake.serve()
    job = fake.call(GetJob(name="memo"))
    assert job.state == "completed" and job.published[-1].loaded and job.error is None
    assert job.tokens_trained == 6 * sum(len(e.input_ids) for e in fake.examples(spec("memo")))
    assert math.isfinite(job.loss) and job.tokens_per_s > 0
    # The adapter on disk is PEFT's format, and it is the trained one: it changes the model's logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, job.adapter_path).eval()(ids).logits
    assert not torch.allclose(before, after)


def test_evaluation_early_stopping_and_the_best_adapter(fake):
    body = spec(
        "stopped",
        epochs=200,
        training={"learning_rate": 0.05, "early_stopping": {"patience": 2}},
        eval={"records": HELD_OUT, "every_steps": 2},
        publish="best",
    )
    fake.submit(body)
    fake.run_until(lambda: fake.job("stopped").state == "publishing")
    fake.serve()
    done = fake.job("stopped")
    assert done.state == "completed" and done.stopped_early and done.step < done.total_steps
    losses = {e.step: e.loss for e in done.evals}
    assert list(losses) == list(range(2, done.step + 1, 2))
    best = min(losses, key=losses.get)
    assert done.best_step == best and done.published[-1].step == best
    assert max(s for s in losses if s > best) == best + 4  # patience: two evaluations without improvement
    assert done.eval_loss == losses[done.step] >= losses[best]
    assert 0 <= done.eval_accuracy <= 1


def test_cancel_lets_go_of_a_running_job_and_the_next_one_starts(fake):
    fake.submit(spec("first", epochs=50))
    fake.submit(spec("second"))
    fake.place()
    fake.place()
    assert fake.finetuning.training == "first" and fake.job("first").state == "running"
    cancelled = fake.call(CancelJob(name="first"))
    assert cancelled.state == "cancelled" and fake.finetuning.training is None
    with pytest.raises(Conflict):
        fake.call(CancelJob(name="first"))
    fake.run_until(lambda: fake.job("second").state == "publishing")
    fake.serve()
    states = {job.name: job.state for job in fake.call(ListJobs())}
    assert states == {"first": "cancelled", "second": "completed"}
    assert fake.job("first").published == []


def test_a_diverging_job_fails_alone_and_the_next_one_completes(fake):
    diverging = spec(
        "diverges", epochs=50, lora={"alpha": 1024}, training={"learning_rate": 1.0, "max_grad_norm": 0}
    )
    fake.submit(diverging)
    fake.submit(spec("fine"))
    fake.run_until(lambda: fake.job("fine").state == "publishing")
    failed = fake.job("diverges")
    assert failed.state == "failed" and "loss is nan" in failed.error, failed
    assert 0 < failed.step < failed.total_steps and failed.published == []
    fake.serve()
    assert fake.job("fine").state == "completed"


def test_a_version_that_cannot_be_served_fails_the_job(fake):
    fake.submit(spec("refused", epochs=1))
    fake.run_until(lambda: fake.job("refused").state == "publishing")
    fake.serve(error="the LoRA pool is full")
    job = fake.job("refused")
    assert job.state == "failed" and "could not be served: the LoRA pool is full" in job.error


def test_a_restart_resumes_a_job_from_its_checkpoint_bit_for_bit(tiny_model_dir, tmp_path):
    def config(run):
        return HarliConfig(
            output_dir=str(tmp_path / run / "adapters"), state_dir=str(tmp_path / run / "state"),
            checkpoint_every_steps=2,
        )  # fmt: skip

    body = spec("durable", epochs=8)
    straight = FakeScheduler(tiny_model_dir, config("straight"))
    straight.submit(body)
    straight.run_until(lambda: straight.job("durable").state == "publishing")

    first = FakeScheduler(tiny_model_dir, config("restarted"))
    first.submit(body)
    first.run_until(lambda: first.job("durable").step >= 5)
    assert first.job("durable").step == 5
    first.finetuning.jobs.durable.flush()  # the checkpoint at step 4 is on disk; step 5 is lost
    # The process dies here; a new scheduler takes the book back from the state directory.
    second = FakeScheduler(tiny_model_dir, config("restarted"))
    resumed = second.job("durable")
    assert resumed.state == "queued" and resumed.resumes == 1 and resumed.checkpoint_step == 4
    second.run_until(lambda: second.job("durable").state == "running")
    assert second.job("durable").step == 4  # it starts where its checkpoint left it
    second.run_until(lambda: second.job("durable").state == "publishing")
    second.serve()
    done, reference = second.job("durable"), straight.job("durable")
    assert done.state == "completed" and done.step == reference.step
    assert done.loss == reference.loss
    ours, theirs = adapter_weights(done.adapter_path), adapter_weights(reference.adapter_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_server_that_cannot_serve_the_adapter_refuses_the_job_naming_the_flag(tiny_model_dir, tmp_path):
    config = HarliConfig(output_dir=str(tmp_path / "adapters"))
    no_lora = FakeScheduler(
        tiny_model_dir, config, FakeHost(tiny_model_dir, limits=ServingLimits(enable_lora=False))
    )
    with pytest.raises(SpecError) as refused:
        no_lora.submit(spec("unservable"))
    assert refused.value.status == 400 and "--enable-lora" in str(refused.value)
    small = ServingLimits(enable_lora=True, max_lora_rank=4)
    with pytest.raises(SpecError) as refused:
        FakeScheduler(tiny_model_dir, config, FakeHost(tiny_model_dir, limits=small)).submit(
            spec("too-large")
        )
    assert refused.value.field == "lora.r" and "--max-lora-rank" in str(refused.value)
    assert no_lora.call(ListJobs()) == []  # refused before it was taken


def test_without_lent_pages_a_micro_batch_over_the_trainer_budget_fails_its_job_naming_the_flag(
    tiny_model_dir, tmp_path
):
    """What a server with --harli-kv-lending off and a small --harli-trainer-memory-mb does: ``KvLending``
    without pages is ``TrainerMemory``. The job fails alone, with the reason; the next job trains."""
    host = FakeHost(tiny_model_dir)
    budget = TrainerMemory(ActivationStore(budget_bytes=2**20, keep=host.served.values()))
    fake = FakeScheduler(
        tiny_model_dir, HarliConfig(output_dir=str(tmp_path / "adapters")), host, lending=budget
    )
    fake.submit(spec("alone", epochs=1, training={"micro_batch_size": 8}))
    fake.run_until(lambda: fake.job("alone").state not in ("queued", "running"))
    failed = fake.job("alone")
    assert failed.state == "failed" and failed.published == []
    assert "TrainerMemoryError" in failed.error and "--harli-trainer-memory-mb" in failed.error
    assert budget.trainer is None and budget.store.stats().ordinary_bytes == 0  # let go of it all
