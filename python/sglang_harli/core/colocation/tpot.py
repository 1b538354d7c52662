"""Per-request TPOT, as ``sglang.bench_serving`` and the serving literature define it, and the slack it banks.

A request's time per output token is ``(end-to-end latency - TTFT) / (output tokens - 1)``: the time from
its first token to its last, over the tokens after the first. Its SLO attainment is the share of requests
whose TPOT is within the SLO. That is not the share of token intervals within it (ITL): a request whose
tokens so far came faster than the SLO has *banked slack*, and one long interval later does not break its
TPOT. After ``k`` tokens past its first, at time ``t``, a request first answered at ``t0`` has

    slack = SLO x (k + 1) - (t - t0)

left for its next token: the next interval, counted from ``t``, may last that long and its TPOT still holds.

``TpotLedger`` keeps, for every request the engine is decoding, when its first token came and how many
tokens it had then; the engine reports each batch's results (request id, tokens generated so far, finished
or not) and asks for the smallest slack in the batch before finetune work is admitted. The slack formula
itself covers both ends of a request's life:

- **Just arrived** (its first token only, nothing banked): its slack is the SLO less the time since that
  token, so a batch with a newcomer is never stretched past what a per-interval SLO would allow.
- **Near its end** (few tokens left): its TPOT is nearly settled and no later token can win back a late
  one, so it gets exactly its remaining slack and not a millisecond more; a request already behind
  (negative slack) leaves no room at all, and the policy admits nothing beside that step.

A request the engine drops without finishing it (an abort, a retraction back to the queue) is forgotten
at the next decode result that does not carry it: its clock would otherwise run on and starve training.
A retracted request that comes back is counted afresh from its next token.

State is two small numbers per open request and a bounded window of finished TPOTs; a decode result costs
one dictionary update per request in the batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import msgspec
import numpy as np

RequestTokens = tuple[str, int, bool]
"""One request in a batch's results: (request id, output tokens generated so far, finished)."""


class LatencySummary(msgspec.Struct, kw_only=True):
    """A window of latencies against the SLO: how many, p50/p99, and the share within the SLO."""

    count: int
    p50_ms: float | None
    p99_ms: float | None
    slo_attainment: float | None
    """Share of them within the SLO."""

    @classmethod
    def of(cls, seconds: Iterable[float], slo_s: float, **extra):
        """The summary of ``seconds`` (``None`` figures when there are none); ``extra``: subclass fields."""
        ms = np.fromiter(seconds, dtype=np.float64) * 1e3
        if not ms.size:
            return cls(count=0, p50_ms=None, p99_ms=None, slo_attainment=None, **extra)
        p50, p99 = np.percentile(ms, [50, 99])
        held = float(np.mean(ms <= slo_s * 1e3))
        return cls(count=int(ms.size), p50_ms=float(p50), p99_ms=float(p99), slo_attainment=held, **extra)


class TpotSummary(LatencySummary, kw_only=True):
    """Finished requests' TPOT over the stats window, with ``bench_serving``'s definition: ``count`` is
    the finished requests with at least two output tokens (TPOT is undefined for one)."""

    open: int
    """Requests being decoded now."""


class _Open:
    __slots__ = ("first_at", "first_tokens", "tokens", "seen")

    def __init__(self, at: float, tokens: int, seen: int):
        self.first_at, self.first_tokens, self.tokens, self.seen = at, tokens, tokens, seen


class TpotLedger:
    def __init__(self, slo_s: float, window: int = 2048):
        self.slo_s = slo_s
        self._open: dict[str, _Open] = {}
        self._finished: deque[float] = deque(maxlen=window)
        self._results = 0  # decode results reported: how an entry knows it was left out of one

    def results(self, at: float, requests: Iterable[RequestTokens], *, decode: bool) -> list[float]:
        """A batch's results arrived at ``at``; returns the TPOT of each request it finished.

        A request is opened at its first result with a token (a prefill's, or a decode step's for one
        that joined decode with its first token already out, as on a PD decode instance) and closed when
        finished. After a ``decode`` result, open requests it did not carry are forgotten."""
        if decode:
            self._results += 1
        finished: list[float] = []
        for rid, tokens, done in requests:
            entry = self._open.get(rid)
            if entry is None:
                if tokens < 1 or done:
                    continue
                entry = self._open[rid] = _Open(at, tokens, self._results)
            entry.tokens, entry.seen = tokens, self._results
            if done:
                del self._open[rid]
                after_first = entry.tokens - entry.first_tokens
                if after_first >= 1:
                    tpot = (at - entry.first_at) / after_first
                    self._finished.append(tpot)
                    finished.append(tpot)
        if decode and len(self._open) > 0:
            stale = [rid for rid, entry in self._open.items() if entry.seen != self._results]
            for rid in stale:
                del self._open[rid]
        return finished

    def finished(self, tpot_s: float) -> None:
        """A request finished with this TPOT (for a loop that keeps per-request time itself)."""
        self._finished.append(tpot_s)

    def slack(self, at: float) -> float | None:
        """The smallest slack over the requests being decoded, for the interval counted from ``at`` (the
        last decode result); ``None`` with no request open."""
        if not self._open:
            return None
        slo = self.slo_s
        return min(slo * (e.tokens - e.first_tokens + 1) - (at - e.first_at) for e in self._open.values())

    def clear(self) -> None:
        """Nothing is decoding (the engine went idle): no open request remains."""
        self._open.clear()

    def summary(self) -> TpotSummary:
        return TpotSummary.of(self._finished, self.slo_s, open=len(self._open))
