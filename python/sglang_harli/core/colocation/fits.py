"""The online fits behind the latency predictor: linear least squares with forgetting, and the record of
how far its predictions were from what was then observed.

They know nothing of decode steps or finetune units; ``predictor`` gives them their features. Both drop
non-finite input, since a single NaN would poison every later figure.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np


class ErrorSummary(msgspec.Struct, kw_only=True):
    samples: int
    mape_recent: float | None
    """Mean absolute percentage error over the recent window, as a fraction (0.05 is 5%)."""
    mape_overall: float | None
    """The same over every error recorded since start-up."""


class StageStats(msgspec.Struct, kw_only=True):
    samples: int
    """Observations the model has been fitted on."""
    mape_recent: float | None
    mape_overall: float | None
    coefficients: dict[str, float]
    """Seconds per unit of each feature (``alpha`` and ``beta`` are dimensionless)."""


class OnlineLinearModel:
    """Linear regression fitted by recursive least squares with exponential forgetting.

    Each update discounts the past by ``forgetting``, so the fit follows drift within roughly
    ``1 / (1 - forgetting)`` samples. The Gaussian prior (mean ``prior``, covariance
    ``diag(prior_variance)``, one figure or one per feature) is kept in information form and is not
    forgotten, only the data is. Classic forgetting RLS divides the covariance by ``forgetting`` every
    step, so in any direction the features stop exciting (a batch shape held for minutes, an adapter
    count stuck at zero) the covariance grows without bound and the next informative sample throws the
    fit around. Here the posterior precision is the prior's precision plus the discounted Gram matrix:
    the covariance never exceeds the prior's, a direction without recent evidence relaxes to the prior
    instead of winding up, and the matrices stay exactly symmetric because they are sums of symmetric
    terms. A coefficient's prior weighs as much as
    ``1 / prior_variance`` samples: at the default of 1e2 the fit is ordinary weighted least squares.

    Features are divided by ``scales`` before fitting, so that token counts near 1e5 and an intercept of
    1 reach the solver at comparable magnitude. ``prior``, ``predict``, ``update`` and ``coefficients``
    all speak the caller's units; ``prior_variance`` applies to the scaled coefficients, i.e. to what a
    feature contributes to the target at its scale.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        forgetting: float = 0.98,
        prior: Sequence[float] | None = None,
        prior_variance: float | Sequence[float] = 1e2,
        scales: Sequence[float] | None = None,
    ):
        self.names = tuple(names)
        n = len(self.names)
        if n == 0:
            raise ValueError("a linear model needs at least one feature")
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        variance = np.broadcast_to(np.asarray(prior_variance, dtype=np.float64), (n,)).copy()
        if not (np.isfinite(variance).all() and (variance > 0).all()):
            raise ValueError(f"prior_variance must be positive and finite, got {prior_variance}")
        self.forgetting = float(forgetting)
        self.prior_variance = variance
        self._scales = _vector(scales if scales is not None else [1.0] * n, n, "scales")
        if np.any(self._scales <= 0):
            raise ValueError(f"scales must be positive, got {self._scales.tolist()}")
        self._prior = _vector(prior if prior is not None else [0.0] * n, n, "prior")
        self._ridge = np.diag(1.0 / variance)
        self._prior_moment = self._prior * self._scales / variance
        self._gram = np.zeros((n, n))
        self._moment = np.zeros(n)
        self.samples = 0
        self._theta: np.ndarray | None = self._prior * self._scales

    def predict(self, x: Sequence[float]) -> float:
        return float(self._scaled(x) @ self._solution())

    def update(self, x: Sequence[float], y: float) -> None:
        """Fold in one observation; a non-finite one is dropped, since a single NaN would poison the fit."""
        z = self._scaled(x)
        y = float(y)
        if not (math.isfinite(y) and np.isfinite(z).all()):
            return
        self._gram *= self.forgetting
        self._gram += np.outer(z, z)
        self._moment *= self.forgetting
        self._moment += y * z
        self.samples += 1
        self._theta = None

    def coefficients(self) -> dict[str, float]:
        theta = self._solution() / self._scales
        return dict(zip(self.names, theta.tolist(), strict=True))

    def state(self) -> dict[str, Any]:
        """The sufficient statistics rather than the solution, so a restored model keeps learning as if
        it had never stopped."""
        return {
            "names": list(self.names),
            "scales": self._scales.tolist(),
            "forgetting": self.forgetting,
            "prior": self._prior.tolist(),
            "prior_variance": self.prior_variance.tolist(),
            "samples": self.samples,
            "gram": self._gram.tolist(),
            "moment": self._moment.tolist(),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> OnlineLinearModel:
        model = cls(
            d["names"],
            forgetting=d["forgetting"],
            prior=d["prior"],
            prior_variance=d["prior_variance"],
            scales=d["scales"],
        )
        n = len(model.names)
        gram = np.array(d["gram"], dtype=np.float64)
        moment = _vector(d["moment"], n, "moment")
        if gram.shape != (n, n) or not np.isfinite(gram).all():
            raise ValueError(f"gram must be a finite {n}x{n} matrix")
        model._gram, model._moment = gram, moment
        model.samples = int(d["samples"])
        if model.samples:
            model._theta = None
        return model

    def _scaled(self, x: Sequence[float]) -> np.ndarray:
        z = np.asarray(x, dtype=np.float64)
        if z.shape != self._scales.shape:
            raise ValueError(f"expected {len(self.names)} features {self.names}, got shape {z.shape}")
        return z / self._scales

    def _solution(self) -> np.ndarray:
        # Solved lazily: the scheduler predicts far more often than it observes.
        if self._theta is None:
            self._theta = np.linalg.solve(self._gram + self._ridge, self._moment + self._prior_moment)
        return self._theta


class ErrorStats:
    """Absolute percentage error of predictions against what was then observed.

    The recent window shows whether the fit has caught up with the present; the overall figure keeps the
    misses a drift caused, which the window soon forgets.
    """

    def __init__(self, window: int = 256):
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._count = 0
        self._total = 0.0

    def add(self, predicted: float, observed: float) -> None:
        if not (math.isfinite(predicted) and math.isfinite(observed) and observed > 0):
            return
        error = abs(predicted - observed) / observed
        self._recent.append(error)
        self._count += 1
        self._total += error

    def summary(self) -> ErrorSummary:
        if not self._count:
            return ErrorSummary(samples=0, mape_recent=None, mape_overall=None)
        return ErrorSummary(
            samples=self._count,
            mape_recent=math.fsum(self._recent) / len(self._recent),
            mape_overall=self._total / self._count,
        )


def valid_seconds(seconds: float) -> bool:
    """Zero, negative or non-finite timings come from clock glitches or aborted steps, not the GPU."""
    return math.isfinite(seconds) and seconds > 0


def _vector(values: Sequence[float], n: int, what: str) -> np.ndarray:
    v = np.array(values, dtype=np.float64)
    if v.shape != (n,) or not np.isfinite(v).all():
        raise ValueError(f"{what} must be {n} finite numbers, got {values!r}")
    return v


def stage_stats(model: OnlineLinearModel, errors: ErrorStats | None) -> StageStats:
    summary = (errors or ErrorStats()).summary()
    return StageStats(
        samples=model.samples,
        mape_recent=summary.mape_recent,
        mape_overall=summary.mape_overall,
        coefficients=model.coefficients(),
    )
