"""Training over a tensor-parallel base model gives the adapter one rank gives.

Two processes (gloo) each hold the slice of the tiny checkpoint a serving engine with ``--tp-size 2``
holds (heads, MLP width, vocabulary), train the same job with ``core.training.tensor_parallel``, and the
gathered adapter is compared with the one-rank trainer's, weight by weight; so is the adapter file rank 0
writes. No SGLang here: ``test_tensor_parallel_server.py`` does the same through the real server.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoConfig

from helpers import background
from helpers.background import InThread
from helpers.training import make_examples
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.tensor_parallel import TensorParallel, TensorParallelError
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.models.builtin import materialize

LORA = LoraSpec(
    r=4,
    alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
TRAINING = TrainingSpec(
    epochs=2,
    learning_rate=5e-3,
    micro_batch_size=2,
    gradient_accumulation_steps=2,
    max_seq_len=64,
    seed=5,
    warmup_steps=1,
    weight_decay=0.01,
    max_grad_norm=0.05,  # small enough that every step is clipped: the global norm must be right
)
# Even in float64 the ranks' sums run in another order, and Adam divides near-zero gradient entries by
# their own RMS, which turns 1e-16 differences there into ~1e-7 in the weights (of size ~0.1). A missing
# or doubled reduction shows up as 1e-3 and more.
CLOSE = dict(rtol=1e-5, atol=2e-6)
COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
ROW = {"o_proj", "down_proj"}


def full_weights(path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}


def rank_slice(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """What a tensor-parallel engine holds on ``rank``: split by output rows or input columns."""
    leaf = name.split(".")[-2]
    if leaf in COLUMN or leaf == "embed_tokens":
        return tensor.chunk(size, dim=0)[rank]
    if leaf in ROW:
        return tensor.chunk(size, dim=1)[rank]
    return tensor


def _rank(rank: int, size: int, init: str, path, examples, variants, out) -> None:
    """One rank: the job trained once per ``layers_per_unit`` of ``variants``, in one process group."""
    os.nice(19)  # it trains in the background (``prefetch``): the tests in the foreground keep their cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        config = AutoConfig.from_pretrained(path)
        config.dtype = torch.float64
        vocab_rows = config.vocab_size // size
        tp = TensorParallel(
            dist.group.WORLD,
            vocab_start=rank * vocab_rows,
            vocab_rows=vocab_rows,
            vocab_size=config.vocab_size,
        )
        full = full_weights(path)
        local = {name: rank_slice(name, t, rank, size) for name, t in full.items()}
        for layers_per_unit in variants:
            model = build_bound_model(tp.local_config(config), local)
            trainer = LoraTrainer(
                model, examples, LORA, TRAINING, layers_per_unit=layers_per_unit, tensor_parallel=tp
            )
            initial = tp.gathered(trainer.model)
            trainer.run()
            trained = tp.gathered(trainer.model)
            where = out / str(layers_per_unit)
            trainer.save_adapter(str(where / "adapter") if rank == 0 else None)
            if rank == 0:
                torch.save(
                    {"initial": initial, "trained": trained, "loss": trainer.loss}, where / "result.pt"
                )
    finally:
        dist.destroy_process_group()


def _one_rank(path, examples, layers_per_unit=None) -> LoraTrainer:
    config = AutoConfig.from_pretrained(path)
    config.dtype = torch.float64
    return LoraTrainer(
        build_bound_model(config, full_weights(path)),
        examples,
        LORA,
        TRAINING,
        layers_per_unit=layers_per_unit,
    )


@pytest.fixture(scope="module")
def tiny():
    return materialize("tiny")


VARIANTS = [None, 1]


def _train_two_ranks():
    """Both variants trained by one pair of rank processes (each process start imports torch and PEFT)."""
    examples = make_examples(1024, count=9)
    out = Path(tempfile.mkdtemp(prefix="ranks-"))
    for variant in VARIANTS:
        (out / str(variant)).mkdir()
    mp.start_processes(
        _rank,
        args=(2, f"file://{out / 'rendezvous'}", materialize("tiny"), examples, VARIANTS, out),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return examples, out


def prefetch() -> None:
    """Start the ranks at the end of collection (``helpers.background``): they train while the tests before
    this module's run."""
    background.start("two ranks", lambda: InThread(_train_two_ranks))


@pytest.fixture(scope="module")
def two_ranks():
    return background.start("two ranks", lambda: InThread(_train_two_ranks)).result(timeout=300)


@pytest.mark.parametrize("layers_per_unit", VARIANTS)
def test_two_ranks_train_the_one_rank_adapter(tiny, two_ranks, tmp_path, layers_per_unit):
    examples, out = two_ranks
    reference = _one_rank(tiny, examples)
    initial = {n: t.clone() for n, t in reference.lora_state().items()}
    reference.run()
    result = torch.load(out / str(layers_per_unit) / "result.pt", weights_only=True)

    # The ranks start from exactly the weights one rank draws (PEFT's init on the full shapes).
    assert result["initial"].keys() == initial.keys()
    for name, tensor in initial.items():
        assert torch.equal(result["initial"][name], tensor), name

    # ... and end where one rank ends, up to the order of the ranks' sums.
    trained = reference.lora_state()
    moved = 0
    for name, tensor in trained.items():
        torch.testing.assert_close(result["trained"][name], tensor, **CLOSE, msg=name)
        moved += not torch.equal(tensor, initial[name])
    assert moved == len(trained)  # every weight trained (B starts at zero)
    assert result["loss"] == pytest.approx(reference.loss, rel=1e-6)

    # Rank 0 wrote one ordinary PEFT adapter with the full shapes.
    written = load_file(str(out / str(layers_per_unit) / "adapter" / "adapter_model.safetensors"))
    reference.save_adapter(str(tmp_path / "reference"))
    expected = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, **CLOSE, msg=name)


def test_heads_that_do_not_divide_are_refused(tiny):
    config = AutoConfig.from_pretrained(tiny)  # 2 key/value heads
    tp = TensorParallel.__new__(TensorParallel)
    tp.size = 4
    with pytest.raises(TensorParallelError, match="key/value heads"):
        tp.local_config(config)
