"""The prefills of a server that prefills: what they cost, how often they come, how long a first token waits.

Harli's paper protects decode instances, whose prefills run elsewhere. A server that also prefills (the
launcher's default, not ``--disaggregation-mode decode``) shares the slack between three users: the
running requests' token intervals (the TPOT SLO and the interval cap), the waiting requests' first tokens
(TTFT), and training. ``Prefills`` keeps what the co-location loop needs to protect the second:

- **TTFT** per request, from its arrival at the scheduler to the result that carries its first token
  (tokenization and HTTP before it are the same with or without training, so they are left out), in a
  window summarised against the objective (``--harli-ttft-slo-ms``; unset: ``DEFAULT_TTFT_FACTOR`` times
  the TPOT SLO, for the report only).
- **What a prefill costs**: a line in its new tokens, fitted online on every prefill batch as the
  predictor fits finetune units (``fits.OnlineLinearModel``, with the same forgetting).
- **How often requests come, and how long**: arrivals and their prompt tokens over a sliding window.
  Together they give the *prefill load* ``rho``: the share of time prefills will take. A token interval
  that is to hold finetune work is planned with room for the prefills expected to land in it
  (``PrefillOutlook``): against per-request TPOT, which averages, the work and the decode step together
  get ``budget / (1 + rho)``, since an interval of length ``T`` collects about ``rho * T`` of prefill;
  against a percentile of intervals (the cap, or ``itl``), where one prefill landing breaks the one
  interval it lands in, the interval keeps free the mean prefills of the fewest arrivals that more land
  in it less often than the violations the percentile allows (a Poisson quantile).

Holding a prefill back one decode step (the scheduler's answer to a request that arrived during finetune
work beside decode: the decode step closes the interval the policy budgeted, the prefill follows) trades
that request's TTFT for the running requests' interval. With an objective set, a prefill is held only
while every waiting request's predicted TTFT, held, stays within ``HOLD_SHARE`` of it (the rest is
for queueing behind other prefills, which no one here controls); unset, never: the request waits only for
the unit running when it came, and units are kept small (``core.training.lora``'s loss chunks).

State: the cost fit's sufficient statistics, a bounded deque of recent arrivals, the open requests'
arrival times (bounded: a request aborted before its first token is dropped after ``STALE_S``), and a
bounded window of TTFTs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import msgspec

from sglang_harli.core.colocation.fits import ErrorStats, OnlineLinearModel, StageStats, stage_stats
from sglang_harli.core.colocation.tpot import LatencySummary

DEFAULT_TTFT_FACTOR = 5.0
"""With no ``--harli-ttft-slo-ms``, TTFT attainment is reported against this many TPOT SLOs."""
HOLD_SHARE = 0.5
"""Of the TTFT objective, the share a held prefill's predicted TTFT may reach."""
ARRIVAL_WINDOW_S = 30.0
"""Arrivals counted for the rate: long enough to average a burst, short enough to follow the load."""
MAX_PREFILL_LOAD = 1.0
"""The room kept for prefills never takes more than half of an interval's budget."""
STALE_S = 600.0
"""A request with no first token after this long was dropped before its prefill (an abort)."""
MIN_SAMPLES = 4
"""Prefill batches seen before their cost is predicted."""
_FEATURES = ("intercept", "tokens")
_SCALES = (1.0, 2.0**6)
"""Prompts of tens to thousands of tokens reach the fit near 1, where its prior weighs little."""


class PrefillOutlook(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy plans an interval's finetune work with: the prefills that may land in it."""

    load: float = 0.0
    """``rho``: the share of time prefills are expected to take."""
    arrivals_per_s: float = 0.0
    prefill_s: float = 0.0
    """Predicted prefill of a mean prompt (0 while unknown)."""

    def reserve_s(self, interval_s: float, violation_rate: float) -> float:
        """What an interval held to ``interval_s`` at a percentile allowing ``violation_rate`` of them over
        must keep free for prefills: the prefills of the fewest arrivals that more arrive in it less often
        than that rate (Poisson arrivals; none where even one is rarer than that). The mean is not enough:
        at 0.8 arrivals expected, two or more land in one interval in almost a fifth of them."""
        expected = self.arrivals_per_s * interval_s
        if expected <= 0.0 or self.prefill_s <= 0.0:
            return 0.0
        term = math.exp(-expected)  # P(N = k), from k = 0
        below = term  # P(N <= k)
        arrivals = 0
        while 1.0 - below > violation_rate and arrivals < MAX_RESERVED_PREFILLS:
            arrivals += 1
            term *= expected / arrivals
            below += term
        return self.prefill_s * arrivals


MAX_RESERVED_PREFILLS = 16
"""Past this many arrivals in one interval, a server is overloaded by prefills alone."""

NO_PREFILLS = PrefillOutlook()
"""A PD decode instance's (or a simulator's without prefills) outlook."""


class TtftSummary(LatencySummary, kw_only=True):
    """Time to first token over the stats window, from arrival at the scheduler; ``slo_attainment`` is
    against ``objective_ms``."""

    objective_ms: float
    objective_set: bool
    """Whether ``--harli-ttft-slo-ms`` set the objective (else the default, for this report only)."""


class PrefillStats(msgspec.Struct, kw_only=True):
    ttft: TtftSummary
    held: int
    """Prefills held one decode step behind finetune work beside decode."""
    waiting: int
    """Requests that arrived and have no first token yet."""
    arrivals_per_s: float
    mean_prompt_tokens: float | None
    load: float
    """``rho``: the share of time prefills are expected to take (arrival rate x predicted prefill)."""
    cost: StageStats
    """The prefill cost fit (seconds against new tokens) and its error."""


class Prefills:
    def __init__(
        self,
        *,
        objective_s: float | None,
        reported_s: float,
        clock: Callable[[], float],
        forgetting: float = 0.995,
        window: int = 2048,
    ):
        """``objective_s``: the TTFT objective that decides holding (``None``: never hold);
        ``reported_s``: what attainment is reported against."""
        self.objective_s, self.reported_s, self.clock = objective_s, reported_s, clock
        self.cost = OnlineLinearModel(_FEATURES, forgetting=forgetting, scales=_SCALES)
        self._errors = ErrorStats()
        self._arrivals: deque[tuple[float, int]] = deque()
        self._arrived_tokens = 0
        self._open: dict[str, tuple[float, int]] = {}
        self._ttft: deque[float] = deque(maxlen=window)
        self.held = 0

    # -- events --------------------------------------------------------------------------------------
    def arrived(self, rid: str, prompt_tokens: int) -> None:
        """A request reached the scheduler with ``prompt_tokens`` to prefill."""
        now = self.clock()
        self._open[rid] = (now, prompt_tokens)
        self._arrivals.append((now, prompt_tokens))
        self._arrived_tokens += prompt_tokens
        self._forget(now)

    @property
    def waiting(self) -> bool:
        """Whether a request that arrived has no first token yet."""
        return bool(self._open)

    def tokens_out(self, rid: str, tokens: int) -> float | None:
        """A batch result gave request ``rid`` ``tokens`` output tokens so far; its TTFT when this is its
        first (``None`` otherwise)."""
        if tokens < 1 or not self._open:
            return None
        entry = self._open.pop(rid, None)
        if entry is None:
            return None
        ttft = self.clock() - entry[0]
        self._ttft.append(ttft)
        return ttft

    def prefill_ran(self, tokens: int, seconds: float) -> None:
        """A prefill batch of ``tokens`` new tokens ran for ``seconds``."""
        if tokens <= 0 or not seconds > 0:
            return
        predicted = self.predict(tokens)
        if predicted is not None:
            self._errors.add(predicted, seconds)
        self.cost.update((1.0, float(tokens)), seconds)

    # -- decisions -----------------------------------------------------------------------------------
    def predict(self, tokens: int) -> float | None:
        """Predicted run time of a prefill of ``tokens`` new tokens; ``None`` until it has been seen."""
        if self.cost.samples < MIN_SAMPLES:
            return None
        return max(self.cost.predict((1.0, float(tokens))), 0.0)

    def load(self) -> float:
        """``rho``: arrivals per second times the predicted prefill of a mean prompt (0 while unknown)."""
        return self.outlook().load

    def outlook(self) -> PrefillOutlook:
        rate, mean = self.arrival_rate(), self.mean_prompt_tokens()
        prefill = self.predict(round(mean)) if rate and mean is not None else None
        if prefill is None:
            return NO_PREFILLS
        load = min(rate * prefill, MAX_PREFILL_LOAD)
        return PrefillOutlook(load=load, arrivals_per_s=rate, prefill_s=prefill)

    def hold(self, decode_s: float | None) -> bool:
        """Whether the prefill about to run may wait one decode step of ``decode_s``: only with an
        objective set, and only while every waiting request's predicted TTFT, held, stays within
        ``HOLD_SHARE`` of it. A hold is counted."""
        if self.objective_s is None or decode_s is None or not self._open:
            return False
        now, limit = self.clock(), HOLD_SHARE * self.objective_s
        for arrived_at, tokens in self._open.values():
            prefill = self.predict(tokens)
            if prefill is None or now - arrived_at + decode_s + prefill > limit:
                return False
        self.held += 1
        return True

    # -- state ---------------------------------------------------------------------------------------
    def arrival_rate(self) -> float:
        self._forget(self.clock())
        return len(self._arrivals) / ARRIVAL_WINDOW_S if self._arrivals else 0.0

    def mean_prompt_tokens(self) -> float | None:
        return self._arrived_tokens / len(self._arrivals) if self._arrivals else None

    def snapshot(self) -> PrefillStats:
        ttft = TtftSummary.of(
            self._ttft,
            self.reported_s,
            objective_ms=self.reported_s * 1e3,
            objective_set=self.objective_s is not None,
        )
        return PrefillStats(
            ttft=ttft,
            held=self.held,
            waiting=len(self._open),
            arrivals_per_s=self.arrival_rate(),
            mean_prompt_tokens=self.mean_prompt_tokens(),
            load=self.load(),
            cost=stage_stats(self.cost, self._errors),
        )

    def _forget(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - ARRIVAL_WINDOW_S:
            self._arrived_tokens -= self._arrivals.popleft()[1]
        if self._open:
            oldest_rid = next(iter(self._open))
            if self._open[oldest_rid][0] < now - STALE_S:
                self._open = {rid: e for rid, e in self._open.items() if e[0] >= now - STALE_S}
