"""The two-stage latency predictor against synthetic traces whose true costs are known.

Every trace is drawn from a seeded generator and timed by formula, not by the wall clock, so the tests
check what was learnt rather than how busy the machine was.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from sglang_harli.core.colocation.fits import ErrorStats, OnlineLinearModel
from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor, PredictorStats
from sglang_harli.core.colocation.work import FinetuneWork

SOLO = {"intercept": 6e-3, "batch_size": 5e-5, "context_tokens": 2e-8, "adapters": 3e-4}
UNITS = {  # intercept seconds, seconds per unit of FinetuneWork.size
    "forward": (2e-4, 1.5e-8),
    "backward": (3e-4, 3e-8),
    "loss": (1e-4, 2e-7),
    "optimizer": (5e-4, 4e-11),
}
NOISE = 0.01


def random_shape(rng: np.random.Generator) -> DecodeShape:
    batch = int(rng.integers(1, 129))
    return DecodeShape(
        batch_size=batch,
        context_tokens=int(batch * rng.uniform(128, 4096)),
        adapters=int(rng.integers(0, min(batch, 8) + 1)),
    )


def random_unit(rng: np.random.Generator, kind: str | None = None) -> FinetuneWork:
    kind = kind or str(rng.choice(list(UNITS)))
    tokens = int(rng.integers(256, 8193))
    if kind in ("forward", "backward"):
        return FinetuneWork(kind=kind, tokens=tokens, layers=int(rng.integers(1, 9)))
    if kind == "loss":
        return FinetuneWork(kind=kind, tokens=tokens)
    return FinetuneWork(kind=kind, params=int(rng.integers(1_000_000, 40_000_000)))


def solo_seconds(shape: DecodeShape, scale: float = 1.0) -> float:
    return scale * (
        SOLO["intercept"]
        + SOLO["batch_size"] * shape.batch_size
        + SOLO["context_tokens"] * shape.context_tokens
        + SOLO["adapters"] * shape.adapters
    )


def unit_seconds(work: FinetuneWork) -> float:
    intercept, per_size = UNITS[work.kind]
    return intercept + per_size * work.size


def noisy(rng: np.random.Generator, seconds: float) -> float:
    return seconds * (1.0 + NOISE * rng.standard_normal())


def trained(rng: np.random.Generator, **kwargs) -> LatencyPredictor:
    """A predictor whose stage 1 and unit costs have seen a stationary trace."""
    predictor = LatencyPredictor(**kwargs)
    for _ in range(600):
        shape = random_shape(rng)
        predictor.observe_solo(shape, noisy(rng, solo_seconds(shape)))
    for kind in UNITS:
        for _ in range(300):
            unit = random_unit(rng, kind)
            predictor.observe_unit(unit, noisy(rng, unit_seconds(unit)))
    return predictor


def test_stage1_recovers_coefficients():
    rng = np.random.default_rng(1)
    # A stationary trace: slow forgetting lets the noise average out.
    predictor = LatencyPredictor(forgetting=0.999)
    for _ in range(2000):
        shape = random_shape(rng)
        predictor.observe_solo(shape, noisy(rng, solo_seconds(shape)))

    stats = predictor.snapshot().solo
    assert stats.samples == 2000
    for name, value in SOLO.items():
        assert stats.coefficients[name] == pytest.approx(value, rel=0.03), name
    assert stats.mape_recent < 0.015
    assert stats.mape_overall < 0.02
    shape = DecodeShape(batch_size=64, context_tokens=64 * 2000, adapters=3)
    assert predictor.solo(shape) == pytest.approx(solo_seconds(shape), rel=0.01)


def test_stage1_follows_a_step_change():
    rng = np.random.default_rng(2)
    predictor = LatencyPredictor(window=32)
    for _ in range(200):
        shape = random_shape(rng)
        predictor.observe_solo(shape, noisy(rng, solo_seconds(shape)))
    before = predictor.snapshot().solo
    assert before.mape_recent < 0.02

    recovered_at = None
    for step in range(1, 201):
        shape = random_shape(rng)
        predictor.observe_solo(shape, noisy(rng, solo_seconds(shape, scale=1.5)))
        if recovered_at is None and step > 32 and predictor.snapshot().solo.mape_recent < 0.05:
            recovered_at = step
    assert recovered_at is not None and recovered_at <= 130

    after = predictor.snapshot().solo
    assert after.mape_recent < 0.02
    assert after.mape_overall > 3 * before.mape_overall  # the miss is remembered
    assert after.coefficients["intercept"] == pytest.approx(1.5 * SOLO["intercept"], rel=0.1)


def test_stage1_learns_batch_sizes_a_line_cannot_fit():
    """Step latency as measured on the 2-core CPU (``benchmark/RESULTS.md``): a batch of 3 is slower than
    one of 4, and a single request much faster than the line through the others."""
    measured_ms = {1: 34.7, 2: 60.2, 3: 78.2, 4: 64.2, 5: 64.0, 6: 67.1}
    rng = np.random.default_rng(5)
    predictor = LatencyPredictor()
    line = OnlineLinearModel(["intercept", "batch_size"], forgetting=predictor.forgetting)
    line_errors = ErrorStats()
    for _ in range(400):
        batch = int(rng.integers(1, 7))
        shape = DecodeShape(batch_size=batch, context_tokens=batch * int(rng.integers(50, 150)))
        seconds = noisy(rng, measured_ms[batch] / 1e3)
        if line.samples >= predictor.min_samples:
            line_errors.add(line.predict((1.0, batch)), seconds)
        predictor.observe_solo(shape, seconds)
        line.update((1.0, batch), seconds)

    assert line_errors.summary().mape_recent > 0.1  # the stage 1 of before
    assert predictor.snapshot().solo.mape_recent < 0.02
    for batch, ms in measured_ms.items():
        shape = DecodeShape(batch_size=batch, context_tokens=batch * 100)
        assert predictor.solo(shape) == pytest.approx(ms / 1e3, rel=0.03), batch


def test_unit_costs_recover_each_kind():
    rng = np.random.default_rng(3)
    predictor = LatencyPredictor(window=64)
    for _ in range(800):
        unit = random_unit(rng)
        predictor.observe_unit(unit, noisy(rng, unit_seconds(unit)))

    units = predictor.snapshot().units
    assert list(units) == ["forward", "backward", "loss", "optimizer"]
    for kind, (intercept, per_size) in UNITS.items():
        assert units[kind].coefficients["intercept"] == pytest.approx(intercept, rel=0.1), kind
        assert units[kind].coefficients["size"] == pytest.approx(per_size, rel=0.05), kind
        assert units[kind].mape_recent < 0.02

    work = [random_unit(rng) for _ in range(5)]
    expected = sum(unit_seconds(unit) for unit in work)
    assert predictor.work_seconds(work) == pytest.approx(expected, rel=0.02)


def test_unit_prior_predicts_before_any_observation():
    predictor = LatencyPredictor()
    loss = FinetuneWork(kind="loss", tokens=1000)
    assert predictor.unit_seconds(loss) is None
    predictor.set_unit_prior("loss", 1e-4, 2e-7)
    assert predictor.unit_seconds(loss) == pytest.approx(1e-4 + 2e-7 * 1000)
    predictor.set_unit_prior("optimizer", -1.0, 0.0)
    assert predictor.unit_seconds(FinetuneWork(kind="optimizer", params=10)) == 0.0
    with pytest.raises(ValueError):
        predictor.set_unit_prior("prefill", 1e-4, 1e-7)


def test_stage2_recovers_interference_per_split():
    rng = np.random.default_rng(4)
    predictor = trained(rng, forgetting=0.995)
    truth = {"shared": (1.0, 1.0, 3e-4), "sm-66": (1.3, 0.4, 1e-4)}

    for _ in range(1500):
        split = str(rng.choice(list(truth)))
        alpha, beta, c = truth[split]
        shape = random_shape(rng)
        work = [random_unit(rng) for _ in range(int(rng.integers(1, 5)))]
        seconds = alpha * solo_seconds(shape) + beta * sum(map(unit_seconds, work)) + c
        predictor.observe_corun(shape, work, noisy(rng, seconds), split=split)

    stats = predictor.snapshot().corun
    assert sorted(stats) == ["shared", "sm-66"]
    for split, (alpha, beta, c) in truth.items():
        coefficients = stats[split].coefficients
        assert coefficients["alpha"] == pytest.approx(alpha, rel=0.03), split
        assert coefficients["beta"] == pytest.approx(beta, rel=0.05), split
        assert coefficients["c"] == pytest.approx(c, abs=3e-4), split
        assert stats[split].mape_recent < 0.02

    shape = DecodeShape(batch_size=32, context_tokens=32 * 1500, adapters=2)
    work = [FinetuneWork(kind="forward", tokens=4096, layers=4), FinetuneWork(kind="loss", tokens=4096)]
    serial = solo_seconds(shape) + sum(map(unit_seconds, work))
    overlapped = 1.3 * solo_seconds(shape) + 0.4 * sum(map(unit_seconds, work)) + 1e-4
    assert predictor.corun(shape, work) == pytest.approx(serial + 3e-4, rel=0.02)
    assert predictor.corun(shape, work, "sm-66") == pytest.approx(overlapped, rel=0.02)
    # A split never observed falls back to serial time-sharing.
    unseen = predictor.corun(shape, work, "sm-50")
    assert unseen == pytest.approx(predictor.solo(shape) + predictor.work_seconds(work))


def test_corun_error_is_measured_against_the_prediction_acted_on():
    rng = np.random.default_rng(5)
    predictor = trained(rng)
    shape = random_shape(rng)
    work = [random_unit(rng)]
    observed = predictor.corun(shape, work)
    predictor.observe_corun(shape, work, observed, predicted=2 * observed)
    assert predictor.snapshot().corun["shared"].mape_overall == pytest.approx(1.0)


def test_state_round_trip_predicts_identically():
    rng = np.random.default_rng(6)
    predictor = trained(rng)
    for split in ("shared", "sm-66"):
        for _ in range(50):
            shape = random_shape(rng)
            work = [random_unit(rng) for _ in range(2)]
            predictor.observe_corun(shape, work, noisy(rng, 1.2 * predictor.corun(shape, work)), split=split)

    blob = msgspec.json.encode(predictor.state())
    restored = LatencyPredictor.from_state(msgspec.json.decode(blob))
    assert msgspec.json.encode(restored.state()) == blob

    def predictions(p: LatencyPredictor, seed: int) -> list[float | None]:
        probe = np.random.default_rng(seed)
        out = []
        for _ in range(20):
            shape = random_shape(probe)
            work = [random_unit(probe) for _ in range(3)]
            out += [p.solo(shape), p.work_seconds(work), p.corun(shape, work), p.corun(shape, work, "sm-66")]
        return out

    assert predictions(restored, 7) == predictions(predictor, 7)
    # Both keep learning in step: the sufficient statistics, not just the solution, survived.
    for p in (predictor, restored):
        feed = np.random.default_rng(8)
        for _ in range(30):
            shape = random_shape(feed)
            p.observe_solo(shape, noisy(feed, solo_seconds(shape)))
    assert predictions(restored, 9) == predictions(predictor, 9)

    stats = msgspec.json.decode(msgspec.json.encode(predictor.snapshot()), type=PredictorStats)
    assert set(stats.corun) == {"shared", "sm-66"}
    assert LatencyPredictor.from_state(predictor.state(), min_samples=1000).ready is False


def test_not_ready_until_min_samples():
    predictor = LatencyPredictor(min_samples=8)
    shape = DecodeShape(batch_size=4, context_tokens=4000)
    work = [FinetuneWork(kind="forward", tokens=512, layers=2), FinetuneWork(kind="loss", tokens=512)]
    predictor.set_unit_prior("forward", 1e-4, 1e-8)
    predictor.set_unit_prior("loss", 1e-4, 1e-7)

    for _ in range(7):
        predictor.observe_solo(shape, 0.01)
        assert predictor.solo(shape) is None and not predictor.ready
    assert predictor.corun(shape, work) is None
    assert predictor.corun(None, work) == predictor.work_seconds(work)
    assert predictor.work_seconds([]) == 0.0
    assert predictor.work_seconds([*work, FinetuneWork(kind="optimizer", params=10)]) is None
    assert predictor.snapshot().solo.mape_overall is None  # no errors counted before stage 1 is ready

    predictor.observe_solo(shape, 0.01)
    assert predictor.ready
    assert predictor.solo(shape) == pytest.approx(0.01, rel=1e-2)
    assert predictor.corun(shape, []) == predictor.solo(shape)
    assert predictor.corun(shape, work) == pytest.approx(0.01 + predictor.work_seconds(work), rel=1e-2)


def test_bad_timings_are_ignored():
    predictor = LatencyPredictor(min_samples=1)
    shape = DecodeShape(batch_size=1, context_tokens=100)
    unit = FinetuneWork(kind="loss", tokens=100)
    for seconds in (0.0, -1e-3, math.nan, math.inf):
        predictor.observe_solo(shape, seconds)
        predictor.observe_unit(unit, seconds)
        predictor.observe_corun(shape, [unit], seconds)
    stats = predictor.snapshot()
    assert stats.solo.samples == 0 and stats.units == {} and stats.corun == {}


def test_constant_features_do_not_wind_up():
    """50k updates that excite one direction only: classic forgetting RLS would overflow here."""
    model = OnlineLinearModel(["intercept", "batch", "tokens"], forgetting=0.98)
    x = [1.0, 32.0, 10_000.0]
    model.update([1.0, 1.0, 100.0], 0.002)  # earlier information the constant stretch will forget
    for _ in range(50_000):
        model.update(x, 0.01)
    assert model.predict(x) == pytest.approx(0.01, rel=1e-3)
    assert all(map(math.isfinite, model.coefficients().values()))
    assert math.isfinite(model.predict([1.0, 1e4, 1e8]))

    # And it still learns a new direction straight away.
    for _ in range(200):
        model.update([1.0, 64.0, 20_000.0], 0.02)
    assert model.predict([1.0, 64.0, 20_000.0]) == pytest.approx(0.02, rel=1e-2)


def test_error_stats_window_and_overall():
    errors = ErrorStats(window=2)
    assert errors.summary().mape_recent is None
    for predicted, observed in [(2.0, 1.0), (1.0, 1.0), (1.1, 1.0), (1.0, 0.0)]:
        errors.add(predicted, observed)
    summary = errors.summary()
    assert summary.samples == 3
    assert summary.mape_recent == pytest.approx(0.05)
    assert summary.mape_overall == pytest.approx(1.1 / 3)


def test_a_partitioned_split_learns_its_own_unit_costs_and_the_overlap_of_stage_2():
    """On a split holding a quarter of the SMs, units run at a quarter of the speed and *beside* the
    decode step, which they slow by a fifth: the interval is the longer of the two, never their sum."""
    rng = np.random.default_rng(11)
    predictor = trained(rng, forgetting=0.995)
    predictor.set_split_shares({"ft-25%": 0.25})
    unit = FinetuneWork(kind="forward", tokens=2048, layers=1)
    # Before any unit ran there, the split starts from the shared cost on its share of the SMs.
    assert predictor.unit_seconds(unit, "ft-25%") == pytest.approx(4 * predictor.unit_seconds(unit), rel=1e-9)

    def on_split(work: FinetuneWork) -> float:
        return 3.0 * unit_seconds(work)  # better than a quarter of the speed: the SMs were not saturated

    for _ in range(400):
        work = random_unit(rng)
        predictor.observe_unit(work, noisy(rng, on_split(work)), "ft-25%")
    assert predictor.unit_seconds(unit, "ft-25%") == pytest.approx(on_split(unit), rel=0.03)
    assert predictor.unit_seconds(unit) == pytest.approx(unit_seconds(unit), rel=0.03)  # shared: unchanged

    for _ in range(1500):
        shape = random_shape(rng)
        work = [random_unit(rng) for _ in range(int(rng.integers(1, 9)))]
        seconds = max(1.2 * solo_seconds(shape) + 2e-4, sum(map(on_split, work)) + 1e-4)
        predictor.observe_corun(shape, work, noisy(rng, seconds), split="ft-25%")

    stats = predictor.snapshot().corun["ft-25%"]
    assert stats.coefficients["a"] == pytest.approx(1.2, rel=0.05)
    assert stats.coefficients["b"] == pytest.approx(1.0, rel=0.05)
    assert stats.mape_recent < 0.03
    for batch, units in ((8, 1), (8, 12), (128, 2), (128, 40)):
        shape = DecodeShape(batch_size=batch, context_tokens=batch * 2048)
        work = [unit] * units
        truth = max(1.2 * solo_seconds(shape) + 2e-4, units * on_split(unit) + 1e-4)
        assert predictor.corun(shape, work, "ft-25%") == pytest.approx(truth, rel=0.05), (batch, units)

    restored = LatencyPredictor.from_state(msgspec.json.decode(msgspec.json.encode(predictor.state())))
    restored.set_split_shares({"ft-25%": 0.25})
    shape = DecodeShape(batch_size=64, context_tokens=64 * 1024)
    assert restored.corun(shape, [unit] * 5, "ft-25%") == predictor.corun(shape, [unit] * 5, "ft-25%")
    assert set(predictor.snapshot().units) >= {"forward", "forward@ft-25%"}
