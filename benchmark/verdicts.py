"""What the co-location verdicts mean, written once for the CPU benchmark (``benchmark.colocation``) and
the simulator (``benchmark.simulate``): when a policy holds the SLO, and harli's gain over the best
baseline that holds it.

The gain is one ratio: harli's finetune tokens/s over those of the baseline (``idle-only``, ``static``,
``naive``) that trains the most while holding the SLO, at the same load on the same trace. It counts as a
gain only where harli holds the SLO too (``Gain.claimed``); the CPU report still shows the ratio beside
its "harli itself misses the SLO" verdict, and the simulator reports ``claimed - 1`` as a percentage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import msgspec

ATTAINMENT_TARGET = 0.99
"""A policy "holds the SLO" when this share of client-side token intervals is within it (p99)."""
BASELINES = ("idle-only", "static", "naive")
"""The policies harli is compared with."""
REALISTIC = ("idle-only", "naive", "static/peak", "fixed-split/peak")
"""A real-trace replay's baselines an operator can run: none of them knows the trace in advance
(``fixed-split`` needs SM partitions, so only the simulator and a GPU run it)."""
ORACLE = ("static/oracle",)
"""``static`` tuned on the very trace it is scored on: a reference, not a baseline anyone can deploy."""
TPOT_OVER_ITL_TARGET = 1.3
"""harli holding per-request TPOT over harli holding every interval, where decode is busy (issue 21)."""


class PolicyRun(Protocol):
    """One policy's run at one load, as both benchmarks record it."""

    policy: str
    slo_attainment: float
    finetune_tokens_per_s: float


def holds_slo(run: PolicyRun) -> bool:
    return run.slo_attainment >= ATTAINMENT_TARGET


class Gain(msgspec.Struct, frozen=True, kw_only=True):
    ratio: float | None
    """harli's finetune tokens/s over ``best``'s; ``None`` without a harli run, without a baseline that
    holds the SLO, or when the best of them trains nothing."""
    best: str | None
    """The baseline with the most finetune throughput among those holding the SLO."""
    harli_holds: bool
    note: str
    """Why no gain can be claimed (the first reason that applies); empty when one can."""

    @property
    def claimed(self) -> float | None:
        """The ratio where it counts as a gain: harli holds the SLO too."""
        return self.ratio if self.harli_holds else None


def gain_over_best_baseline(runs: Iterable[PolicyRun], baselines: Iterable[str] = BASELINES) -> Gain:
    """harli's gain over the best SLO-holding baseline, among the runs of one load (and seed).

    ``baselines``: the policies (as the runs name them) that count as baselines; the simulator's trace
    replay names its realistic ones apart from the oracle ``static`` tuned on the scored trace."""
    runs, baselines = list(runs), tuple(baselines)
    harli = next((r for r in runs if r.policy == "harli"), None)
    holding = [r for r in runs if r.policy in baselines and holds_slo(r)]
    best = max(holding, key=lambda r: r.finetune_tokens_per_s, default=None)
    trains_nothing = best is not None and best.finetune_tokens_per_s <= 0
    ratio = None
    if harli is not None and best is not None and not trains_nothing:
        ratio = harli.finetune_tokens_per_s / best.finetune_tokens_per_s
    harli_holds = harli is not None and holds_slo(harli)
    if harli is None:
        note = "no harli run"
    elif not harli_holds:
        note = f"harli misses the SLO ({harli.slo_attainment:.4f})"
    elif best is None:
        note = "no baseline holds the SLO"
    elif trains_nothing:
        note = f"the best baseline ({best.policy}) trains nothing"
    else:
        note = ""
    return Gain(ratio=ratio, best=None if best is None else best.policy, harli_holds=harli_holds, note=note)
