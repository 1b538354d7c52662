"""``KvLending``: how much of the KV pool the trainer borrows, and what it does when decode wants it back.

The allocator mixin (``srt.memory.allocator``) knows how to lend pages; this decides how many, when, and
answers reclaims, so that decode never waits, fails or retracts because of training:

- **Reserve.** Never lent: what the running requests may still grow by (``max_new_tokens`` minus what
  they generated), what the waiting queue would need to be admitted, and a headroom of the pool. The
  prefix cache counts as free, as it does for SGLang's own admission: a loan evicts what it needs of it
  (least recently used first), exactly as an allocation would. Before SGLang picks its next batch, a
  loan that no longer leaves the reserve is taken back whole.
- **Size.** The activations one micro-batch saves grow with its tokens; the bytes per token are measured
  on every finished micro-batch (first estimated from the model's shape), and the trainer borrows that
  for the next one, with slack, in whole KV rows. Runs need not be long: a tensor too large for one
  run's byte range is split over several (``core.training.memory``). After a reclaim, no new loan is made for
  a moment, since a burst of requests arrives over many steps and each would take the loan back again.
- **Reclaim.** When decode takes pages back, the micro-batch in flight is spilled to ordinary memory if
  the trainer budget (``--harli-trainer-memory-mb``) has room, and dropped otherwise; a dropped one is
  replayed (with its whole step, if its backward had begun) with the same dropout seeds, so the adapter
  is the same. The LoRA gradient buffers, also in lent pages, always move out whole.
- **Too little memory.** With a budget, a micro-batch starts only when the loan covers it (or the budget
  alone does); one that still runs out of room is dropped and replayed with a larger loan. Only when
  even the largest loan the pool allows would not do is it the job's error.
"""

from __future__ import annotations

import logging
import time

import torch

from sglang_harli.core.config import HarliConfig
from sglang_harli.core.training.memory import ActivationStore, TrainerMemory, TrainerMemoryError
from sglang_harli.core.training.trainer import LoraTrainer
from sglang_harli.core.wire.stats import LendingStats
from sglang_harli.srt.memory.allocator import install_lending, lending_unsupported

logger = logging.getLogger(__name__)

HEADROOM_FRACTION = 1 / 32  # of the pool, never lent: room for requests not yet in the queue
SLACK = 1.1  # lent bytes per measured byte: alignment, and micro-batches of the same tokens vary a little
CALM_S = 0.5  # after a reclaim, no new loan for this long: a burst arrives over many steps
GROWTH = 1.5  # after a micro-batch ran out of room, the next loan is this much larger


class KvLending(TrainerMemory):
    """The trainer's memory with KV pages lent to it; without them (lending off or unsupported here,
    ``reason``) it is ``TrainerMemory``: ordinary memory within the trainer budget."""

    def __init__(self, scheduler, config: HarliConfig):
        self.scheduler = scheduler
        budget = int(config.trainer_memory_mb * 2**20) if config.trainer_memory_mb else None
        model = scheduler.tp_worker.model_runner.model
        super().__init__(ActivationStore(budget_bytes=budget, keep=model.parameters()))
        self.trainer: LoraTrainer | None = None
        self.allocator = scheduler.token_to_kv_pool_allocator
        self.reason = "--harli-kv-lending off" if config.kv_lending == "off" else None
        mode = getattr(scheduler.server_args, "disaggregation_mode", "null")
        if mode == "prefill":
            self.reason = self.reason or "PD prefill instance: finetuning belongs on decode instances"
        if scheduler.tp_size > 1:  # each rank's pool would have to lend the same pages at the same step
            self.reason = self.reason or "tensor parallelism: loans are not agreed across ranks yet"
        self.reason = self.reason or lending_unsupported(self.allocator)
        if self.reason is None:
            install_lending(self.allocator, on_reclaim=self._on_reclaim, poison=config.kv_poison)
            kvcache = self.allocator.get_kvcache()
            rows = [b[0].numel() * b.element_size() for b in (*kvcache.k_buffer, *kvcache.v_buffer)]
            self.bytes_per_token = sum(rows)
        else:
            logger.info("KV lending off: %s", self.reason)
            self.bytes_per_token = 0
        # Saved activation bytes per trained token: measured on every finished micro-batch, estimated
        # from the model's shape until then.
        self._per_token = _estimate_per_token(model)
        self._growth = 1.0
        self._spilled = self._replayed = self._waits = 0
        self._calm_at = 0.0
        self._grad_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.reason is None

    @property
    def hooks(self):
        """The trainer's saved-tensor hooks: the store's when lending is on, else as ``TrainerMemory``."""
        return self.store.hooks if self.enabled else super().hooks

    # -- the trainer's side --------------------------------------------------------------------------
    @property
    def place_grads(self):
        """The trainer's gradient-buffer placement: in lent pages when lending is on."""
        return self.store.place_grads if self.enabled else None

    def attach(self, trainer: LoraTrainer) -> None:
        super().attach(trainer)
        self._grad_bytes = sum(p.numel() * p.element_size() for p in trainer.params)
        self._growth = 1.0

    def detach(self) -> None:
        """The job ended: every page goes back."""
        if not self.enabled:
            return super().detach()
        if self.trainer is not None:
            self.trainer.abort_micro_batch()
        self.trainer = None
        self.allocator.reclaim()
        self.store.micro_batch_done()

    def prepare(self, tokens: int) -> bool:
        """Before a micro-batch of ``tokens`` starts: borrow what it needs. False: it must wait, because
        the pool cannot lend all of that now and the trainer budget alone would not hold it."""
        if not self.enabled:
            return super().prepare(tokens)
        allocator, budget = self.allocator, self.store.budget_bytes
        want = self._per_token * tokens * self._growth
        need = want * SLACK + self._grad_bytes
        rows = min(-(-int(need) // self.bytes_per_token), self.ceiling_tokens)
        if budget is not None and need > self.ceiling_tokens * self.bytes_per_token + budget:
            raise TrainerMemoryError(
                f"a micro-batch of {tokens} tokens needs about {need / 2**20:.1f} MiB of activations: more "
                f"than the KV pool can lend plus the trainer budget of {budget / 2**20:.1f} MiB "
                "(--harli-trainer-memory-mb); use a smaller micro_batch_size or max_seq_len"
            )
        if allocator.lent_tokens > 2 * rows:  # far more than needed: give the rest back to decode
            allocator.reclaim()
        missing = rows - allocator.lent_tokens
        lendable = self.lendable_tokens() if missing > 0 and time.monotonic() >= self._calm_at else 0
        if missing > 0 and (budget is None or lendable >= missing):  # with a budget, all or nothing
            runs = allocator.lend(min(missing, lendable), tree_cache=self.scheduler.tree_cache)
            self.store.lend(allocator.lent_regions(runs))
        if budget is None or allocator.lent_tokens >= rows or budget >= want:
            return True
        self._waits += 1
        return False

    def out_of_memory(self) -> bool:
        """A unit ran out of room. True: its micro-batch was dropped, to be replayed with a larger loan.
        False: the loan was already as large as the pool allows, so no replay would fare better."""
        if not self.enabled:
            return super().out_of_memory()
        if self.allocator.lent_tokens >= self.ceiling_tokens:
            return False
        self.trainer.abort_micro_batch()  # in flight: the store hears of it through micro_batch_done
        self._replayed += 1
        self._growth *= GROWTH
        return True

    @property
    def ceiling_tokens(self) -> int:
        """The most the trainer may ever borrow: the pool less its headroom."""
        return self.scheduler.max_total_num_tokens - self.headroom_tokens

    def micro_batch_done(self, tokens: int) -> None:
        """The trainer's micro-batch ended (``tokens`` 0: dropped); learn what a finished one saved."""
        super().micro_batch_done(tokens)
        total, _ = self.store.demand
        if tokens and total:
            self._per_token = total / tokens
            self._growth = 1.0

    # -- decode's side -------------------------------------------------------------------------------
    def reserve_tokens(self) -> int:
        """KV tokens decode may need soon: the running requests' growth, the queue, and headroom."""
        scheduler = self.scheduler
        reqs = {id(r): r for r in scheduler.running_batch.reqs}
        last = scheduler.last_batch
        if last is not None and last.forward_mode.is_extend():
            reqs.update((id(r), r) for r in last.reqs)
        limit = scheduler.max_req_len
        growth = sum(_remaining(r, limit) for r in reqs.values() if not r.finished())
        queued = sum(len(r.origin_input_ids) + _remaining(r, limit) for r in scheduler.waiting_queue)
        return growth + queued + self._disaggregated_tokens(limit) + self.headroom_tokens

    def _disaggregated_tokens(self, limit: int) -> int:
        """PD decode: what the requests still on their way need. Those in the pre-allocation queue (and
        retracted ones) need all their KV; those already transferring hold their prompt's and will grow."""
        prealloc = getattr(self.scheduler, "disagg_decode_prealloc_queue", None)
        if prealloc is None:
            return 0
        waiting = [d.req for d in prealloc.queue] + list(prealloc.retracted_queue)
        transferring = [d.req for d in self.scheduler.disagg_decode_transfer_queue.queue]
        return sum(len(r.origin_input_ids) + _remaining(r, limit) for r in waiting) + sum(
            _remaining(r, limit) for r in transferring
        )

    @property
    def headroom_tokens(self) -> int:
        return int(self.scheduler.max_total_num_tokens * HEADROOM_FRACTION)

    def _free_for_decode(self) -> int:
        """Free and evictable tokens: the prefix cache counts, as it does for SGLang's admission."""
        return self.allocator.available_size() + self.scheduler.tree_cache.evictable_size()

    def lendable_tokens(self) -> int:
        """Tokens beyond the reserve: a loan may evict prefix cache, as decode may."""
        return max(0, self._free_for_decode() - self.reserve_tokens())

    def ensure_reserve(self) -> None:
        """Before SGLang picks its next batch: take the loan back if decode might need it."""
        if self.enabled and self.allocator.lent_tokens and self._free_for_decode() < self.reserve_tokens():
            self.allocator.reclaim()

    def _on_reclaim(self) -> None:
        if self.allocator.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()  # the trainer's kernels may still touch the lent rows
        if self.allocator.poison:
            self.allocator.check_poison(self.store.untouched)
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
        self._calm_at = time.monotonic() + CALM_S

    # -- stats ---------------------------------------------------------------------------------------
    def snapshot(self) -> LendingStats:
        a = self.allocator
        return LendingStats(
            enabled=self.enabled,
            reason=self.reason,
            pool_tokens=self.scheduler.max_total_num_tokens,
            free_tokens=a.available_size(),
            cached_tokens=self.scheduler.tree_cache.evictable_size(),
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
            lent_allocations=getattr(a, "lent_allocations", 0),
            activations=self.store.stats(),
        )


def _remaining(req, max_req_len: int) -> int:
    """Tokens ``req`` may still generate: to ``max_new_tokens``, or to the context limit without one."""
    limit = req.sampling_params.max_new_tokens
    if limit is None:
        limit = max_req_len - len(req.origin_input_ids)
    return max(0, limit - len(req.output_ids))


def _estimate_per_token(model) -> float:
    """A decoder layer with LoRA on every projection saves about a dozen hidden-size vectors and four
    intermediate-size ones per token."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 4096)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 32)
    itemsize = next(model.parameters()).element_size()
    return float(layers * (12 * hidden + 4 * intermediate) * itemsize)
