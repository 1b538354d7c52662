"""Training on a scheduler with ``--tp-size N``: the group the trainer's collectives use, and one decision
for all ranks.

Each TP rank runs its own ``HarliScheduler`` in lockstep (SGLang broadcasts every request from rank 0),
and each trains its slice of the adapter (``core.training.tensor_parallel``). The slices meet in collectives,
so every rank must run exactly the same units at the same moments. What the ranks see alike (requests,
batches, job commands) they decide alike; what only rank 0 sees (a request waiting on its socket, its
clock, its latency predictor) it decides for all: ``RankAgreement`` broadcasts rank 0's plan for each
token interval, and its go-ahead before each unit, over SGLang's CPU group of the TP ranks.

The trainer's own collectives get a group of their own (gloo on CPU, NCCL on CUDA), created once at
start-up by every rank, so training never shares a communicator with the decode forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from sglang_harli.core.colocation.partition import SMSplit
from sglang_harli.core.colocation.plan import BesideDecode, IdleSlice, WorkPlan
from sglang_harli.core.training.tensor_parallel import TensorParallel, TensorParallelError


def training_group(scheduler) -> TensorParallel | None:
    """This rank's ``TensorParallel`` for the served model, or None with one rank. Every rank calls it."""
    if scheduler.tp_size == 1:
        return None
    tp = scheduler.tp_group
    device = str(getattr(scheduler.tp_worker.model_runner, "device", "cpu"))
    group = dist.new_group(ranks=list(tp.ranks), backend="nccl" if device.startswith("cuda") else "gloo")
    model = scheduler.tp_worker.model_runner.model
    embedding = model.get_input_embeddings()
    embedding = getattr(embedding, "base_layer", embedding)  # SGLang's LoRA wrapper
    indices = embedding.shard_indices
    config = model.config
    if getattr(config, "original_intermediate_size", config.intermediate_size) != config.intermediate_size:
        raise TensorParallelError(
            f"SGLang padded the MLP width from {config.original_intermediate_size} to "
            f"{config.intermediate_size} to split it over {scheduler.tp_size} CPU ranks; training needs "
            f"an intermediate_size divisible by {32 * scheduler.tp_size} on CPU (or a GPU)"
        )
    return TensorParallel(
        group,
        vocab_start=indices.padded_org_vocab_start_index,
        vocab_rows=embedding.num_embeddings_per_partition,
        vocab_size=model.config.vocab_size,
    )


class RankAgreement:
    """Rank 0's numbers, on every TP rank (with one rank, the numbers as given)."""

    def __init__(self, scheduler):
        self.group = scheduler.tp_cpu_group if scheduler.tp_size > 1 else None
        self.leader = scheduler.tp_group.rank_in_group == 0

    def agree(self, values: list[float] | None, count: int) -> list[float]:
        """``values`` (``count`` numbers) from rank 0; other ranks pass anything (None)."""
        if self.group is None:
            return list(values)
        tensor = torch.tensor(values if self.leader else [0.0] * count, dtype=torch.float64)
        dist.broadcast(tensor, group_src=0, group=self.group)
        return tensor.tolist()

    def flag(self, value: bool) -> bool:
        return bool(self.agree([float(value)], 1)[0]) if self.group is not None else value

    def agree_plan(
        self, started: bool, plan: WorkPlan | None, menu: Sequence[SMSplit]
    ) -> tuple[bool, WorkPlan | None]:
        """Rank 0's decision for this place in the loop: whether it started the next queued job, and the
        plan to run. Sent as five numbers: [started, kind (0 none, 1 beside decode, 2 idle slice), units,
        idle budget, split's index in ``menu``]; a field a kind does not use is sent as 0."""
        values = None
        if self.leader:
            values = [float(started), 0.0, 0.0, 0.0, 0.0]
            if isinstance(plan, BesideDecode):
                values[1:] = [1.0, float(plan.units), 0.0, float(menu.index(plan.split))]
            elif isinstance(plan, IdleSlice):
                values[1:] = [2.0, 0.0, plan.budget_s, float(menu.index(plan.split))]
        start, kind, units, budget, split = self.agree(values, 5)
        if kind == 1.0:
            return bool(start), BesideDecode(units=int(units), split=menu[int(split)])
        if kind == 2.0:
            return bool(start), IdleSlice(budget_s=budget, split=menu[int(split)])
        return bool(start), None
