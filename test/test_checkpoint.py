"""Checkpoints: a resumed run ends where an uninterrupted one does, and a torn checkpoint is never used."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from helpers.training import make_examples
from sglang_harli.core.jobs.book import JobStatus
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.jobs.staging import stage_examples
from sglang_harli.core.jobs.store import JobStore, JobStoreError
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.checkpoint import WEIGHTS, CheckpointDir, encode
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.models.builtin import materialize

LORA = LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
TRAINING = TrainingSpec(
    epochs=3,
    learning_rate=5e-3,
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    seed=5,
    lr_scheduler="cosine",
    warmup_steps=2,
    weight_decay=0.01,
    max_grad_norm=0.5,
)


@pytest.fixture(scope="module")
def tiny():
    path = materialize("tiny")
    config = AutoConfig.from_pretrained(path)
    return config, load_file(str(path / "model.safetensors")), make_examples(config.vocab_size, count=9)


def trainer_for(tiny) -> LoraTrainer:
    config, served, examples = tiny
    return LoraTrainer(build_bound_model(config, served), examples, LORA, TRAINING, layers_per_unit=2)


def run_to_step(trainer: LoraTrainer, step: int) -> None:
    while trainer.step < step or not trainer.at_step_boundary:
        trainer.run_unit()


def test_a_run_resumed_from_disk_ends_bit_for_bit_where_an_uninterrupted_one_does(tiny, tmp_path):
    uninterrupted = trainer_for(tiny)
    uninterrupted.run()

    first = trainer_for(tiny)
    run_to_step(first, 4)  # mid-epoch, inside the warmup-then-cosine schedule, dropout on
    checkpoints = CheckpointDir(tmp_path)
    checkpoints.write(first.step, encode(first.state()))
    del first

    resumed = trainer_for(tiny)  # a new process would build exactly this
    resumed.restore(checkpoints.latest())
    assert resumed.step == 4
    resumed.run()
    assert resumed.step == uninterrupted.step == uninterrupted.total_steps
    want, got = uninterrupted.lora_state(), resumed.lora_state()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.loss == uninterrupted.loss and resumed.tokens_trained == uninterrupted.tokens_trained


def test_a_checkpoint_is_only_taken_between_steps(tiny):
    trainer = trainer_for(tiny)
    trainer.run_unit()  # a forward unit: a micro-batch is in flight
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        trainer.state()


def test_a_torn_checkpoint_is_skipped_for_the_one_before(tiny, tmp_path):
    trainer = trainer_for(tiny)
    checkpoints = CheckpointDir(tmp_path)
    for step in (1, 2, 3):
        run_to_step(trainer, step)
        checkpoints.write(step, encode(trainer.state()))
    assert checkpoints.steps() == [3, 2]  # the newest two are kept
    weights = tmp_path / "step-00000003" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # what a crash mid-write can leave behind
    assert checkpoints.latest().progress.step == 2
    assert checkpoints.steps() == [2]  # the torn one is gone, so pruning can never prefer it
    (tmp_path / "step-00000002" / "manifest.json").unlink()
    assert checkpoints.latest() is None


WRITER = textwrap.dedent(
    """
    import sys, torch
    from sglang_harli.core.training.checkpoint import CheckpointDir, Progress, TrainerState, encode
    checkpoints = CheckpointDir(sys.argv[1])
    step = 0
    while True:
        step += 1
        weights = {"w": torch.full((1 << 20,), float(step))}  # 4 MiB, so a kill often lands mid-write
        state = TrainerState(weights=weights, optimizer={"state": {}, "param_groups": []}, schedule={},
                             progress=Progress(step=step, micro_batches=step, tokens_trained=step))
        checkpoints.write(step, encode(state))
        print(step, flush=True)
    """
)


def test_a_writer_killed_at_any_instant_leaves_a_checkpoint_that_verifies(tmp_path):
    # All four writers start at once (each pays torch's import); each is killed at its own instant.
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path / f"run{i}")], stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    for attempt, writer in enumerate(writers):
        root = tmp_path / f"run{attempt}"
        for _ in range(2 + attempt):
            writer.stdout.readline()  # some checkpoints are complete
        time.sleep(0.01 * attempt)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        state = CheckpointDir(root).latest()
        assert state is not None
        assert torch.equal(state.weights["w"], torch.full((1 << 20,), float(state.progress.step)))


def test_the_job_store_keeps_jobs_and_refuses_a_damaged_dataset(tiny, tmp_path):
    _, _, examples = tiny
    store = JobStore(tmp_path)
    status = JobStatus(name="kept", state="running", step=3)
    store.add(status, stage_examples(tmp_path, examples))
    store.save(msgspec.structs.replace(status, step=4))
    store.flush()
    stage_examples(tmp_path, examples)  # a submit that never got its answer

    again = JobStore(tmp_path)
    [loaded] = again.load()
    assert loaded.name == "kept" and loaded.step == 4
    assert again.examples("kept") == examples
    assert not list((tmp_path / "incoming").glob("*"))  # staged leftovers are swept
    path = tmp_path / "jobs" / "kept" / "examples.msgpack"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(JobStoreError, match="damaged"):
        again.examples("kept")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "a\x00b"])
def test_job_state_never_lands_outside_its_directory(tmp_path, name):
    store = JobStore(tmp_path / "state")
    with pytest.raises(ValueError, match="name"):
        store.job_dir(name)


def test_a_link_planted_at_a_jobs_place_is_refused(tmp_path):
    store = JobStore(tmp_path / "state")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state" / "jobs" / "evil").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="link out"):
        store.job_dir("evil")
