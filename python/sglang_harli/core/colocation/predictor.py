"""Two-stage decode latency prediction, after Harli (arXiv 2511.11729).

The QoS policy must decide, before every decode step, how much finetune work it can run alongside without
breaking the TPOT SLO. Stage 1 predicts what the decode step costs on its own from its shape; stage 2
predicts the decode-to-decode interval once finetune units share the GPU with it, from the stage-1
prediction and the units' own costs. Splitting it this way keeps each part cheap to learn: solo steps are
plentiful and fit the shape model, unit costs come from a start-up profile and from every unit the
trainer runs, and the interference model has only a few coefficients per SM split, so it settles after a
few dozen co-run intervals and carries over to batch shapes it has never seen co-run.

Stage 2 has two shapes, because the two ways of sharing a device overlap differently:

- ``shared`` (no partition; on CPU the only split): the units and the decode step take turns, so the
  interval is a blend of the serial sum, ``alpha * solo + beta * work + c``.
- a partitioned split: the units run on their SMs *while* the decode step runs on the rest, so the
  interval is whichever finishes last, ``max(a * solo + c_decode, b * work + c_work)``: decode slowed by
  the SMs and bandwidth it lost, or the units on the split's share. Each observation teaches the branch
  that the current fit says bounded it (a max-affine fit, one small least-squares model per branch).

Unit costs are learnt per split: a unit on a quarter of the SMs is not a unit on all of them, and costs
pooled across splits would lock the policy into whichever split it used first. A split with no sample
yet starts from the shared cost divided by its SM share.

Everything is fitted online with forgetting, because the truth drifts while serving: clocks and thermal
state, KV-cache fragmentation and the adapter mix all move the costs. The module needs only numpy and
msgspec so that the server, the GPU benchmark and the trace simulator share one implementation.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from sglang_harli.core.colocation.fits import (
    ErrorStats,
    OnlineLinearModel,
    StageStats,
    stage_stats,
    valid_seconds,
)
from sglang_harli.core.colocation.work import SHARED, WORK_KINDS, FinetuneWork

_STATE_VERSION = 2

BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Lower edges of the batch sizes that get an offset of their own in stage 1.

Decode latency is not linear in batch size: GEMM kernels change tiling and code path at some sizes, and
CUDA graphs pad a batch up to the next captured size. On the 2-core CPU of ``benchmark/RESULTS.md`` a
``small`` step with 3 requests takes 78 ms, with 4 only 64 ms; the linear terms alone left 17% error
there, an offset per bucket 5%. Exact up to 8, where a small server spends its time, then about
geometric, so the feature vector stays short at any ``--max-running-requests``."""

# Scales bring every feature to order one at typical sizes, so that the solver sees a well-conditioned
# system and one prior variance suits every linear coefficient. Powers of two make the scaling exact.
_LINEAR_SOLO_FEATURES = ("intercept", "batch_size", "context_tokens", "adapters")
_SOLO_FEATURES = _LINEAR_SOLO_FEATURES + tuple(
    f"batch_size>={low}" if high is None else f"batch_size={low}" if high == low + 1 else
    f"batch_size={low}-{high - 1}"
    for low, high in zip(BATCH_BUCKETS, (*BATCH_BUCKETS[1:], None), strict=True)
)  # fmt: skip
_SOLO_SCALES = (1.0, 2.0**6, 2.0**16, 2.0**3) + (1.0,) * len(BATCH_BUCKETS)
_SOLO_PRIOR_VARIANCE = (1e2,) * len(_LINEAR_SOLO_FEATURES) + (3.0,) * len(BATCH_BUCKETS)
"""The bucket offsets sum to the intercept, so alone they would not be identifiable. A prior thirty times
tighter than the linear terms' leaves to the line whatever a line explains and to the offsets only what
it cannot, so the linear coefficients keep their meaning; at a third of a sample's weight it still lets a
bucket seen a few times carry its own offset. Tighter priors cost accuracy on the measured CPU trace,
looser ones slow the fit's recovery after a drift that moves every bucket at once."""
_UNIT_FEATURES = ("intercept", "size")
_UNIT_SIZE_SCALES = {"forward": 2.0**16, "backward": 2.0**16, "loss": 2.0**12, "optimizer": 2.0**24}
_CORUN_FEATURES = ("alpha", "beta", "c")
_CORUN_SCALES = (2.0**-6, 2.0**-6, 1.0)
_CORUN_PRIOR = (1.0, 1.0, 0.0)
"""Serial time-sharing: the interval is the decode step followed by the finetune units."""
_BRANCH_FEATURES = ("slope", "c")
_BRANCH_SCALES = (2.0**-6, 1.0)
_BRANCH_PRIOR = (1.0, 0.0)
"""Overlap: the interval is the longer of the decode step and the units, each at its measured cost."""


class DecodeShape(msgspec.Struct, frozen=True, kw_only=True):
    """What a decode step's run time depends on, as far as the scheduler knows before launching it."""

    batch_size: int
    context_tokens: int
    """Total KV tokens of the batch: attention reads every one of them each step."""
    adapters: int = 0
    """Distinct LoRA adapters in the batch: each adds its own low-rank GEMMs to every layer."""


class PredictorStats(msgspec.Struct, kw_only=True):
    solo: StageStats
    corun: dict[str, StageStats]
    """Per SM split."""
    units: dict[str, StageStats]
    """Per finetune work kind (``forward``) on the shared split, per kind and split elsewhere
    (``forward@ft-50%``)."""


class LatencyPredictor:
    """Harli's two-stage predictor: solo decode steps, finetune unit costs, and how the two combine.

    Stage 2 regresses on the *predicted* solo and unit costs rather than on measured ones, because
    predictions are all the policy has when it decides; the fit then also absorbs their systematic bias.
    Error statistics are not part of ``state()``: a cached fit is reused across runs, its errors belong
    to the run that made them.
    """

    def __init__(self, *, forgetting: float = 0.98, window: int = 256, min_samples: int = 8):
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        self.forgetting = forgetting
        self.window = window
        self.min_samples = min_samples
        self._solo = OnlineLinearModel(
            _SOLO_FEATURES, forgetting=forgetting, scales=_SOLO_SCALES, prior_variance=_SOLO_PRIOR_VARIANCE
        )
        self._solo_errors = ErrorStats(window)
        self._units: dict[str, OnlineLinearModel] = {}
        self._unit_errors: dict[str, ErrorStats] = {}
        self._corun = CoRunModel(forgetting=forgetting, window=window)

    def set_split_shares(self, shares: dict[str, float]) -> None:
        """Finetune's SM share of each split of the menu (``shared``: 1.0); a split with a share below
        1 overlaps decode (the max-affine stage 2), and its unit costs start from the shared ones."""
        self._corun.set_shares(shares)

    def overlaps(self, split: str) -> bool:
        """Whether finetune work in ``split`` runs beside the decode step rather than taking turns."""
        return self._corun.overlaps(split)

    @property
    def ready(self) -> bool:
        """Whether stage 1 has seen enough solo steps to be trusted; until then nothing is admitted on
        the strength of a guess."""
        return self._solo.samples >= self.min_samples

    # Stage 1: a decode step on its own.

    def solo(self, shape: DecodeShape) -> float | None:
        if not self.ready:
            return None
        return max(0.0, self._solo.predict(_solo_features(shape)))

    def observe_solo(self, shape: DecodeShape, seconds: float) -> None:
        if not valid_seconds(seconds):
            return
        predicted = self.solo(shape)
        if predicted is not None:
            self._solo_errors.add(predicted, seconds)
        self._solo.update(_solo_features(shape), seconds)

    # Finetune unit costs, one model per kind and split.

    def unit_seconds(self, work: FinetuneWork, split: str = SHARED) -> float | None:
        model = self._units.get(_unit_key(work.kind, split))
        if model is not None:
            return max(0.0, model.predict((1.0, float(work.size))))
        shared = self._units.get(work.kind) if split != SHARED else None
        if shared is None:
            return None
        return max(0.0, shared.predict((1.0, float(work.size)))) / self._corun.share(split)

    def work_seconds(self, work: Sequence[FinetuneWork], split: str = SHARED) -> float | None:
        total = 0.0
        for unit in work:
            seconds = self.unit_seconds(unit, split)
            if seconds is None:
                return None
            total += seconds
        return total

    def observe_unit(self, work: FinetuneWork, seconds: float, split: str = SHARED) -> None:
        if not valid_seconds(seconds):
            return
        key = _unit_key(work.kind, split)
        predicted = self.unit_seconds(work, split)
        if key not in self._units:
            prior = None
            if split != SHARED and work.kind in self._units:  # the shared cost on the split's share
                coefficients = self._units[work.kind].coefficients()
                share = self._corun.share(split)
                prior = (coefficients["intercept"] / share, coefficients["size"] / share)
            self._new_unit_model(key, prior=prior)
        if predicted is not None:
            _errors(self._unit_errors, key, self.window).add(predicted, seconds)
        self._units[key].update((1.0, float(work.size)), seconds)

    def set_unit_prior(self, kind: str, intercept_s: float, per_size_s: float) -> None:
        """Start the kind's model afresh from profiled costs, so the policy can admit units of that kind
        before the trainer has run any. Whatever the kind had learnt is dropped."""
        if kind not in WORK_KINDS:
            raise ValueError(f"unknown work kind {kind!r}; expected one of {WORK_KINDS}")
        if not (math.isfinite(intercept_s) and math.isfinite(per_size_s)):
            raise ValueError("unit prior must be finite")
        self._new_unit_model(kind, prior=(intercept_s, per_size_s))

    # Stage 2: decode and finetune work sharing the GPU.

    def corun(
        self, shape: DecodeShape | None, work: Sequence[FinetuneWork], split: str = SHARED
    ) -> float | None:
        """The decode-to-decode interval with ``work`` admitted in it.

        Without decode work it is just the units. Without finetune work it still goes through the
        split's model, whose intercept has learnt what the engine's loop adds around a step.
        """
        cost = self.work_seconds(work, split)
        if shape is None:
            return cost
        solo = self.solo(shape)
        if solo is None or cost is None:
            return None
        return self.interval(solo, cost, split)

    def interval(self, solo_s: float, work_s: float, split: str = SHARED) -> float:
        """Stage 2 from already predicted parts: the policy's inner loop, so it stays a few flops."""
        return self._corun.interval(solo_s, work_s, split)

    def observe_corun(
        self,
        shape: DecodeShape,
        work: Sequence[FinetuneWork],
        seconds: float,
        *,
        split: str = SHARED,
        predicted: float | None = None,
    ) -> None:
        """Learn from one co-run interval.

        ``predicted`` is the figure the policy acted on, when it has one: that is the error which
        decides SLO attainment, and a prediction recomputed now would already reflect any stage-1 or
        unit updates made since. Intervals without finetune work teach the model the loop's own
        overhead (``alpha``, ``c``) but do not count in its error, which is about admitted work.
        """
        if not valid_seconds(seconds):
            return
        solo = self.solo(shape)
        cost = self.work_seconds(work, split)
        if predicted is None and work:
            predicted = self.corun(shape, work, split)
        if predicted is not None and work:
            self._corun.add_error(split, predicted, seconds)
        if solo is None or cost is None:
            return
        self._corun.observe(solo, cost, seconds, split, with_work=bool(work))

    # Reporting and persistence.

    def snapshot(self) -> PredictorStats:
        return PredictorStats(
            solo=stage_stats(self._solo, self._solo_errors),
            corun=self._corun.snapshot(),
            units={
                key: stage_stats(self._units[key], self._unit_errors.get(key))
                for key in sorted(self._units, key=_unit_order)
            },
        )

    def state(self) -> dict[str, Any]:
        """A JSON-ready fit, to cache per model and hardware so a restarted server predicts at once."""
        return {
            "version": _STATE_VERSION,
            "forgetting": self.forgetting,
            "window": self.window,
            "min_samples": self.min_samples,
            "solo": self._solo.state(),
            "units": {kind: model.state() for kind, model in self._units.items()},
            **self._corun.state(),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], **kwargs: Any) -> LatencyPredictor:
        """Restore a fit; ``kwargs`` override the stored settings (a new ``forgetting`` only affects
        updates from now on)."""
        if d.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported predictor state version {d.get('version')!r}")
        settings = {key: d[key] for key in ("forgetting", "window", "min_samples")}
        predictor = cls(**(settings | kwargs))
        predictor._solo = _restore(d["solo"], _SOLO_FEATURES, predictor.forgetting)
        for key, state in d["units"].items():
            if key.partition("@")[0] not in WORK_KINDS:
                raise ValueError(f"unknown work kind {key!r} in predictor state")
            predictor._units[key] = _restore(state, _UNIT_FEATURES, predictor.forgetting)
        predictor._corun.restore(d)
        return predictor

    def _new_unit_model(self, key: str, prior: Sequence[float] | None) -> None:
        scales = (1.0, _UNIT_SIZE_SCALES[key.partition("@")[0]])
        self._units[key] = OnlineLinearModel(
            _UNIT_FEATURES, forgetting=self.forgetting, scales=scales, prior=prior
        )


class CoRunModel:
    """Stage 2: the decode-to-decode interval from the predicted solo step and unit costs, one model per
    SM split, and the error of each split's predictions.

    The shared split (and any split whose share is unknown) takes turns, one serial blend per split;
    a split with a finetune share below 1 overlaps decode, one pair of branches (decode-bound and
    work-bound) per split. Shares are the menu's, set each run, not part of the fit's state.
    """

    def __init__(self, *, forgetting: float, window: int):
        self.forgetting = forgetting
        self.window = window
        self._serial: dict[str, OnlineLinearModel] = {}  # the splits that take turns, by name
        self._split_errors: dict[str, ErrorStats] = {}
        # Partitioned splits: the decode-bound and the work-bound branch of the max-affine stage 2.
        self._overlap: dict[str, tuple[OnlineLinearModel, OnlineLinearModel]] = {}
        self._shares: dict[str, float] = {}

    def set_shares(self, shares: dict[str, float]) -> None:
        self._shares = {name: share for name, share in shares.items() if name != SHARED}

    def overlaps(self, split: str) -> bool:
        return split in self._shares

    def share(self, split: str) -> float:
        """Finetune's SM share of ``split``; 1.0 for the shared split or one the menu does not name."""
        return self._shares.get(split, 1.0)

    def interval(self, solo_s: float, work_s: float, split: str) -> float:
        if split in self._shares:
            decode_bound, work_bound = self._branches(split)
            return max(0.0, *self._branch_predictions(decode_bound, work_bound, solo_s, work_s))
        model = self._serial.get(split)
        if model is None:
            alpha, beta, c = _CORUN_PRIOR
            return max(0.0, alpha * solo_s + beta * work_s + c)
        return max(0.0, model.predict((solo_s, work_s, 1.0)))

    def add_error(self, split: str, predicted: float, seconds: float) -> None:
        _errors(self._split_errors, split, self.window).add(predicted, seconds)

    def observe(self, solo: float, cost: float, seconds: float, split: str, *, with_work: bool) -> None:
        """Fit one interval, decoded in ``solo`` seconds beside ``cost`` seconds of units (both predicted)."""
        if split in self._shares and with_work:
            decode_bound, work_bound = self._branches(split)
            by_decode, by_work = self._branch_predictions(decode_bound, work_bound, solo, cost)
            if by_work > by_decode:
                work_bound.update((cost, 1.0), seconds)
            else:
                decode_bound.update((solo, 1.0), seconds)
        elif split in self._shares:  # no finetune work: the decode step alone, as decode-bound
            self._branches(split)[0].update((solo, 1.0), seconds)
        else:
            self._split_model(split).update((solo, cost, 1.0), seconds)

    def snapshot(self) -> dict[str, StageStats]:
        splits = sorted(self._serial.keys() | self._split_errors.keys() | self._overlap.keys())
        return {split: self._stats(split) for split in splits}

    def _stats(self, split: str) -> StageStats:
        errors = self._split_errors.get(split)
        if split not in self._overlap:
            return stage_stats(self._serial.get(split) or self._new_split_model(), errors)
        decode_bound, work_bound = self._overlap[split]
        summary = (errors or ErrorStats()).summary()
        decode, work = decode_bound.coefficients(), work_bound.coefficients()
        return StageStats(
            samples=decode_bound.samples + work_bound.samples,
            mape_recent=summary.mape_recent,
            mape_overall=summary.mape_overall,
            coefficients={
                "a": decode["slope"], "c_decode": decode["c"], "b": work["slope"], "c_work": work["c"]
            },
        )  # fmt: skip

    def state(self) -> dict[str, Any]:
        """The predictor state's ``corun`` and ``overlap`` entries."""
        return {
            "corun": {split: model.state() for split, model in self._serial.items()},
            "overlap": {split: [m.state() for m in models] for split, models in self._overlap.items()},
        }

    def restore(self, d: dict[str, Any]) -> None:
        """Load the fits from a predictor state (``overlap`` is optional, as it was in its first form)."""
        for split, state in d["corun"].items():
            self._serial[split] = _restore(state, _CORUN_FEATURES, self.forgetting)
        for split, (decode_bound, work_bound) in d.get("overlap", {}).items():
            self._overlap[split] = (
                _restore(decode_bound, _BRANCH_FEATURES, self.forgetting),
                _restore(work_bound, _BRANCH_FEATURES, self.forgetting),
            )

    def _branches(self, split: str) -> tuple[OnlineLinearModel, OnlineLinearModel]:
        if split not in self._overlap:
            self._overlap[split] = tuple(
                OnlineLinearModel(
                    _BRANCH_FEATURES, forgetting=self.forgetting, scales=_BRANCH_SCALES, prior=_BRANCH_PRIOR
                )
                for _ in range(2)
            )
        return self._overlap[split]

    @staticmethod
    def _branch_predictions(decode_bound, work_bound, solo_s: float, work_s: float) -> tuple[float, float]:
        """The decode-bound and the work-bound interval; no work: the decode step alone."""
        by_decode = decode_bound.predict((solo_s, 1.0))
        by_work = work_bound.predict((work_s, 1.0)) if work_s > 0 else 0.0
        return by_decode, by_work

    def _new_split_model(self) -> OnlineLinearModel:
        return OnlineLinearModel(
            _CORUN_FEATURES, forgetting=self.forgetting, scales=_CORUN_SCALES, prior=_CORUN_PRIOR
        )

    def _split_model(self, split: str) -> OnlineLinearModel:
        if split not in self._serial:
            self._serial[split] = self._new_split_model()
        return self._serial[split]


def _restore(state: dict[str, Any], names: Sequence[str], forgetting: float) -> OnlineLinearModel:
    model = OnlineLinearModel.from_state(state)
    if model.names != tuple(names):
        raise ValueError(f"predictor state has features {model.names}, expected {tuple(names)}")
    model.forgetting = forgetting
    return model


def _errors(table: dict[str, ErrorStats], key: str, window: int) -> ErrorStats:
    if key not in table:
        table[key] = ErrorStats(window)
    return table[key]


def _unit_key(kind: str, split: str) -> str:
    return kind if split == SHARED else f"{kind}@{split}"


def _unit_order(key: str) -> tuple[int, str]:
    kind, _, split = key.partition("@")
    return (WORK_KINDS.index(kind), split)


def _solo_features(shape: DecodeShape) -> np.ndarray:
    features = np.zeros(len(_SOLO_FEATURES))
    features[: len(_LINEAR_SOLO_FEATURES)] = (1.0, shape.batch_size, shape.context_tokens, shape.adapters)
    bucket = max(bisect.bisect_right(BATCH_BUCKETS, shape.batch_size) - 1, 0)
    features[len(_LINEAR_SOLO_FEATURES) + bucket] = 1.0
    return features
