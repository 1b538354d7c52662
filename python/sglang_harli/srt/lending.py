"""``KvLending``: how much of the KV pool the trainer borrows, and what it does when decode wants it back.

The allocator mixin (``srt.allocator``) knows how to lend pages; this decides how many, when, and answers
reclaims, so that decode never waits, fails or retracts because of training:

- **Reserve.** Never lent: what the running requests may still grow by (``max_new_tokens`` minus what
  they generated), what the waiting queue would need to be admitted, and a headroom of the pool. The
  prefix cache counts as free for decode (SGLang evicts it on demand) but is never lent. Before SGLang
  picks its next batch, a lent pool that no longer leaves the reserve is taken back whole.
- **Size.** The activations one micro-batch saves grow with its tokens; the bytes per token are measured
  on every finished micro-batch (first estimated from the model's shape), and the trainer borrows that
  for the next one, with slack, in whole KV rows. A lent row gives one byte range per layer's K and V
  buffer, so the rows must also hold the largest saved tensor in one of them.
- **Reclaim.** When decode takes pages back, the micro-batch in flight is spilled to ordinary memory if
  the trainer budget (``--harli-trainer-memory-mb``) has room, and dropped otherwise; a dropped one is
  replayed from its start with its gradients and dropout seeds restored, so the adapter is the same.
- **Too little memory.** With a budget, a micro-batch that runs out of room is dropped and waits for a
  larger loan; only when even the whole pool would not do is it the job's error.
"""

from __future__ import annotations

import logging

import msgspec
import torch

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.memory import ActivationStore, MemoryStats, TrainerMemoryError
from sglang_harli.core.trainer import LoraTrainer
from sglang_harli.srt.allocator import install_lending, lending_unsupported

logger = logging.getLogger(__name__)

HEADROOM_FRACTION = 1 / 32  # of the pool, never lent: room for requests not yet in the queue
SLACK = 1.25  # lent bytes per measured byte: alignment and the tail of each region the bump misses
GROWTH = 2.0  # after a micro-batch ran out of room, the next loan is this much larger


class LendingStats(msgspec.Struct, kw_only=True):
    enabled: bool
    reason: str | None
    """Why lending is off, when it is."""
    pool_tokens: int
    lent_tokens: int
    reserve_tokens: int
    bytes_per_token: int
    """KV bytes one lent token gives (all layers, K and V)."""
    reclaims: int
    last_reclaim_ms: float
    reclaim_ms_total: float
    spilled_micro_batches: int
    replayed_micro_batches: int
    waits: int
    """Times training was held back because the pool could not lend enough under the budget."""
    poison_violations: int
    activations: MemoryStats


class KvLending:
    def __init__(self, scheduler, config: HarliConfig):
        self.scheduler = scheduler
        budget = int(config.trainer_memory_mb * 2**20) if config.trainer_memory_mb else None
        model = scheduler.tp_worker.model_runner.model
        self.store = ActivationStore(budget_bytes=budget, keep=model.parameters())
        self.trainer: LoraTrainer | None = None
        self.allocator = scheduler.token_to_kv_pool_allocator
        self.reason = "--harli-kv-lending off" if config.kv_lending == "off" else None
        self.reason = self.reason or lending_unsupported(self.allocator)
        if self.reason is None:
            install_lending(self.allocator, on_reclaim=self._on_reclaim, poison=config.kv_poison)
            kvcache = self.allocator.get_kvcache()
            rows = [b[0].numel() * b.element_size() for b in (*kvcache.k_buffer, *kvcache.v_buffer)]
            self.bytes_per_token, self.min_row_bytes = sum(rows), min(rows)
        else:
            logger.info("KV lending off: %s", self.reason)
            self.bytes_per_token = self.min_row_bytes = 0
        self._per_token = _estimate_bytes_per_token(model)  # saved activation bytes per trained token
        self._largest_per_token = 0.0
        self._growth = 1.0
        self._spilled = self._replayed = self._waits = 0

    @property
    def enabled(self) -> bool:
        return self.reason is None

    @property
    def hooks(self):
        """The trainer's saved-tensor hooks; none when there is neither lending nor a budget to keep."""
        if not self.enabled and self.store.budget_bytes is None:
            return None
        return self.store.hooks

    # -- the trainer's side --------------------------------------------------------------------------
    def attach(self, trainer: LoraTrainer) -> None:
        self.trainer = trainer
        self.store.keep(trainer.params)
        self._growth = 1.0

    def detach(self) -> None:
        """The job ended: every page goes back."""
        if self.trainer is not None:
            self.trainer.abort_micro_batch()
        self.trainer = None
        if self.enabled:
            self.allocator.reclaim()
        self.store.micro_batch_done()

    def prepare(self, tokens: int) -> bool:
        """Before a micro-batch of ``tokens`` starts: borrow what it needs. False: it must wait, because
        the pool cannot lend enough now and the trainer budget would not cover the rest."""
        if not self.enabled:
            return True
        allocator, budget = self.allocator, self.store.budget_bytes
        want = int(self._per_token * tokens * SLACK * self._growth)
        largest = int(self._largest_per_token * tokens * SLACK)
        rows = max(-(-want // self.bytes_per_token), -(-largest // self.min_row_bytes))
        ceiling = self.scheduler.max_total_num_tokens - self.headroom_tokens
        if budget is not None and (rows - ceiling) * self.bytes_per_token > budget:
            raise TrainerMemoryError(
                f"a micro-batch of {tokens} tokens needs about {want / 2**20:.1f} MiB of activations: more "
                f"than the whole KV pool can lend plus the trainer budget of {budget / 2**20:.1f} MiB "
                "(--harli-trainer-memory-mb); use a smaller micro_batch_size or max_seq_len"
            )
        if allocator.lent_tokens > 2 * rows:  # far more than needed: give the rest back to decode
            allocator.reclaim()
        if allocator.lent_tokens < rows:
            runs = allocator.lend(min(rows - allocator.lent_tokens, self.lendable_tokens()))
            self.store.lend(allocator.lent_regions(runs))
        short = (rows - allocator.lent_tokens) * self.bytes_per_token
        if budget is not None and short > budget:
            self._waits += 1
            return False
        return True

    def out_of_memory(self) -> None:
        """A unit ran out of room: drop its micro-batch, to be replayed with a larger loan (the next
        ``prepare`` fails the job if no loan could be large enough)."""
        self.trainer.abort_micro_batch()
        self.store.micro_batch_done()
        self._replayed += 1
        self._growth *= GROWTH

    def micro_batch_done(self, tokens: int) -> None:
        """The trainer's micro-batch ended (``tokens`` 0: dropped); learn what a finished one saved."""
        self.store.micro_batch_done()
        total, largest = self.store.demand
        if tokens and total:
            self._per_token = total / tokens
            self._largest_per_token = largest / tokens
            self._growth = 1.0

    # -- decode's side -------------------------------------------------------------------------------
    def reserve_tokens(self) -> int:
        """KV tokens decode may need soon: the running requests' growth, the queue, and headroom."""
        scheduler = self.scheduler
        reqs = {id(r): r for r in scheduler.running_batch.reqs}
        last = scheduler.last_batch
        if last is not None and last.forward_mode.is_extend():
            reqs.update((id(r), r) for r in last.reqs)
        growth = sum(_remaining(r) for r in reqs.values() if not r.finished())
        queued = sum(len(r.origin_input_ids) + _remaining(r) for r in scheduler.waiting_queue)
        return growth + queued + self.headroom_tokens

    @property
    def headroom_tokens(self) -> int:
        return int(self.scheduler.max_total_num_tokens * HEADROOM_FRACTION)

    def lendable_tokens(self) -> int:
        allocator = self.allocator
        evictable = self.scheduler.tree_cache.evictable_size()
        free = allocator.available_size()
        return max(0, min(free, free + evictable - self.reserve_tokens()))

    def ensure_reserve(self) -> None:
        """Before SGLang picks its next batch: take the loan back if decode might need it."""
        if not self.enabled or not self.allocator.lent_tokens:
            return
        free = self.allocator.available_size() + self.scheduler.tree_cache.evictable_size()
        if free < self.reserve_tokens():
            self.allocator.reclaim()

    def _on_reclaim(self) -> None:
        if self.allocator.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()  # the trainer's kernels may still touch the lent rows
        if self.allocator.poison:
            self.allocator.check_poison(self.store.high_water)
        placed = self.store.stats().placed_bytes
        try:
            self.store.reclaim(spill=True)
            self._spilled += bool(placed)
        except TrainerMemoryError:
            self.store.reclaim(spill=False)
            if self.trainer is not None:
                self.trainer.abort_micro_batch()
            self.store.micro_batch_done()
            self._replayed += 1
        self.scheduler.running_batch.batch_is_full = False

    # -- stats ---------------------------------------------------------------------------------------
    def snapshot(self) -> LendingStats:
        a = self.allocator
        return LendingStats(
            enabled=self.enabled,
            reason=self.reason,
            pool_tokens=self.scheduler.max_total_num_tokens,
            lent_tokens=a.lent_tokens if self.enabled else 0,
            reserve_tokens=self.reserve_tokens(),
            bytes_per_token=self.bytes_per_token,
            reclaims=getattr(a, "reclaims", 0),
            last_reclaim_ms=getattr(a, "last_reclaim_s", 0.0) * 1e3,
            reclaim_ms_total=getattr(a, "reclaim_seconds", 0.0) * 1e3,
            spilled_micro_batches=self._spilled,
            replayed_micro_batches=self._replayed,
            waits=self._waits,
            poison_violations=getattr(a, "poison_violations", 0),
            activations=self.store.stats(),
        )


def _remaining(req) -> int:
    limit = req.sampling_params.max_new_tokens
    return max(0, (limit if limit is not None else 0) - len(req.output_ids))


def _estimate_bytes_per_token(model) -> float:
    """Before any measurement: a decoder layer with LoRA on every projection saves about a dozen
    hidden-size vectors and four intermediate-size ones per token."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 4096)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 32)
    itemsize = next(model.parameters()).element_size()
    return float(layers * (12 * hidden + 4 * intermediate) * itemsize)
