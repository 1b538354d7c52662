"""Activations in lent memory, and micro-batches dropped mid-flight: the adapter never changes."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from helpers.training import make_examples
from sglang_harli.core.jobs.spec import LoraSpec, TrainingSpec
from sglang_harli.core.training.base_model import build_bound_model
from sglang_harli.core.training.memory import ActivationStore, TrainerMemoryError
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.models.builtin import materialize

LORA = LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
TRAINING = TrainingSpec(
    epochs=2, micro_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, seed=3
)


@pytest.fixture(scope="module")
def tiny():
    path = materialize("tiny")
    return AutoConfig.from_pretrained(path), load_file(str(path / "model.safetensors"))


def trainer(tiny, **kwargs):
    config, served = tiny
    examples = make_examples(config.vocab_size, count=5)
    return LoraTrainer(
        build_bound_model(config, served), examples, LORA, TRAINING, layers_per_unit=1, **kwargs
    )


def run_with_store(trainer_, store, between=None):
    micro_before = trainer_._micro_index
    while True:
        more = trainer_.run_unit()
        if trainer_._micro_index != micro_before:
            store.micro_batch_done()
            micro_before = trainer_._micro_index
        if between is not None:
            between(trainer_)
        if not more:
            return


def assert_same_adapter(a, b):
    for name, tensor in a.lora_state().items():
        torch.testing.assert_close(b.lora_state()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "region_bytes, count",
    [(16 << 20, 2), (3000, 4000)],  # few large runs; many short ones, smaller than most activations
    ids=["whole", "scattered"],
)
def test_activations_in_lent_regions_change_nothing(tiny, region_bytes, count):
    reference = trainer(tiny)
    reference.run()
    lent = trainer(tiny)
    store = ActivationStore(budget_bytes=0, keep=lent.model.parameters())  # no ordinary memory at all
    lent.saved_tensor_hooks, lent.place_grads = store.hooks, store.place_grads
    poison = 0xA5
    regions = [torch.full((region_bytes,), poison, dtype=torch.uint8) for _ in range(count)]
    store.lend(regions)
    grads_lent = []
    run_with_store(lent, store, between=lambda t: grads_lent.append(store.stats().grad_bytes))
    assert_same_adapter(reference, lent)
    stats = store.stats()
    assert stats.placed_total > 20 and stats.peak_ordinary_bytes == 0
    every = sum(p.numel() * 4 for p in lent.params)
    # gradient buffers were lent: all of them, or those short enough for what the short regions had left
    assert max(grads_lent) == every if count == 2 else 0 < max(grads_lent) < every
    assert stats.last_largest_bytes > region_bytes or count == 2  # scattered: some tensors were split
    returned = store.reclaim()
    assert all(r is o for r, o in zip(returned, regions, strict=True))


def test_without_lent_memory_a_small_budget_is_a_clear_error(tiny):
    t = trainer(tiny)
    store = ActivationStore(budget_bytes=64 * 1024, keep=t.model.parameters())
    t.saved_tensor_hooks = store.hooks
    with pytest.raises(TrainerMemoryError, match="--harli-trainer-memory-mb"):
        run_with_store(t, store)


@pytest.mark.parametrize("spill", [True, False])
def test_reclaim_mid_micro_batch_spills_or_replays_exactly(tiny, spill):
    """Decode takes its pages back every few units; the adapter is the same as with no reclaim. A dropped
    micro-batch replays from its first unit, so drops come further apart than a micro-batch's 9 units."""
    reference = trainer(tiny)
    reference.run()
    t = trainer(tiny)
    store = ActivationStore(keep=t.model.parameters())
    t.saved_tensor_hooks, t.place_grads = store.hooks, store.place_grads  # gradients in the pages too
    regions = [torch.zeros(32 << 20, dtype=torch.uint8)]
    store.lend(regions)
    units = 0

    def reclaim_now_and_then(tr):
        nonlocal units
        units += 1
        if units % (3 if spill else 11) == 0:
            store.reclaim(spill=spill)
            if not spill:
                tr.abort_micro_batch()  # replayed from its first unit by the next run_unit calls
                store.micro_batch_done()
            regions[0].fill_(0x5A)  # decode writes over the pages the moment it has them back
            store.lend(regions)

    run_with_store(t, store, between=reclaim_now_and_then)
    assert_same_adapter(reference, t)
    assert store.stats().reclaims >= 5
    assert (store.stats().spilled_bytes > 0) == spill
    assert store.stats().grads_moved_bytes > 0  # gradients lived in the pages and left them whole


def test_abort_restores_gradients_mid_backward(tiny):
    reference = trainer(tiny)
    reference.run()
    t = trainer(tiny)
    aborted = 0
    while True:
        work = t.peek(1)
        if work and work[0].kind == "backward" and t._unit == t.units_per_micro_batch - 2 and aborted < 6:
            aborted += 1
            assert t.abort_micro_batch() > 0  # after some backward units ran into the gradients
            continue
        if not t.run_unit():
            break
    assert aborted == 6
    assert_same_adapter(reference, t)
