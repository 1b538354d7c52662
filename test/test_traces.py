"""The shipped real trace (``benchmark.traces``), its time-scaling for the simulator and the CPU server
benchmark, the ``fixed-split`` baseline, and a short simulated replay, asserted on real outputs."""

import gzip
import hashlib
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
from benchmark import colocation, load, simulate, traces, verdicts

from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.qos import FixedSplitPolicy, make_policy
from sglang_harli.core.colocation.work import FinetuneWork

README = Path(traces.__file__).with_name("README.md")


def test_the_shipped_trace_is_the_published_file():
    spec = traces.TRACES["azure-code"]
    rows = traces.read_rows("azure-code")
    assert len(rows) == spec.rows == 8819
    assert rows[0] == ("2023-11-16 18:17:03.9799600", 4808, 10)  # the published file's first data row
    assert rows[-1] == ("2023-11-16 19:14:19.9280160", 549, 173)
    readme = README.read_text()
    assert (
        "8,819 rows" in readme and spec.sha256 in readme and "CC BY 4.0" in readme and "Splitwise" in readme
    )
    # the decompressed bytes are the original file: its git blob id is the one upstream lists
    data = gzip.decompress((README.parent / spec.file).read_bytes())
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert blob == "62bd8109d0f2b1bc48206d397ecca48d8de03aab" and blob in readme


def test_trace_loads_in_time_order_from_zero():
    trace = traces.load("azure-code")
    assert len(trace) == 8819
    assert trace.at_s[0] == 0.0 and np.all(np.diff(trace.at_s) >= 0)
    assert trace.at_s[-1] == pytest.approx(3435.948056)  # 18:17:03.97996 to 19:14:19.928016
    assert trace.mean_rate == pytest.approx(8819 / trace.duration_s)
    assert trace.prompt.min() >= 1 and trace.output.min() >= 1
    # the load moves: the busiest minute runs several times the mean, some minutes see nothing
    assert 4 < trace.peak_factor() < 6
    with pytest.raises(ValueError):
        trace.at_s[0] = 1.0  # cached and shared: read-only
    with pytest.raises(ValueError, match="unknown trace"):
        traces.load("nope")


@pytest.mark.parametrize("rate", [0.37, 5.0, 123.4])
def test_time_scaled_mean_rate_is_the_requested_one(rate):
    trace = traces.load("azure-code")
    scaled = trace.time_scaled(rate)
    assert len(scaled) == len(trace)
    assert scaled.mean_rate == pytest.approx(rate)
    assert scaled.duration_s == pytest.approx(len(trace) / rate)
    assert np.allclose(scaled.at_s, trace.at_s * scaled.time_scale)
    assert scaled.peak_factor() == pytest.approx(trace.peak_factor())  # the shape, only faster or slower
    assert np.array_equal(scaled.prompt, trace.prompt) and np.array_equal(scaled.output, trace.output)


def test_thinned_into_a_duration_keeps_a_seeded_subset_at_the_rate():
    trace = traces.load("azure-code")
    thinned = trace.time_scaled(0.5, duration_s=90.0, seed=3)
    assert len(thinned) == 45 and thinned.mean_rate == pytest.approx(0.5)
    assert thinned.duration_s == 90.0 and thinned.at_s.max() < 90.0
    assert np.all(np.diff(thinned.at_s) >= 0)
    again = trace.time_scaled(0.5, duration_s=90.0, seed=3)
    assert np.array_equal(thinned.at_s, again.at_s) and np.array_equal(thinned.prompt, again.prompt)
    assert not np.array_equal(thinned.at_s, trace.time_scaled(0.5, duration_s=90.0, seed=4).at_s)
    with pytest.raises(ValueError, match="thinning cannot add"):
        trace.time_scaled(1000.0, duration_s=90.0)


def test_window_lengths_and_poisson():
    trace = traces.load("azure-code")
    window = trace.window(600.0, 300.0)
    inside = (trace.at_s >= 600) & (trace.at_s < 900)
    assert len(window) == inside.sum() and window.duration_s == 300.0
    assert window.at_s.min() >= 0 and window.at_s.max() < 300
    with pytest.raises(ValueError):
        trace.window(5000.0)
    clipped = trace.lengths(prompt_range=(32, 4096), output_range=(16, 1024))
    assert clipped.prompt.max() == 4096 and clipped.output.min() == 16
    assert np.array_equal(clipped.prompt, np.clip(trace.prompt, 32, 4096))
    steady = trace.poisson(20.0, 100.0, seed=1)
    assert abs(len(steady) - 2000) < 4 * math.sqrt(2000)
    assert set(steady.prompt.tolist()) <= set(trace.prompt.tolist())


def test_cpu_replay_is_thinned_to_the_bursty_mean_rate_and_the_cpu_lengths():
    rate = load.bursty_mean_rate(burst_rate=1.5, quiet_rate=0.2)
    assert 0.3 < rate < 0.45  # gaps drawn at the quiet rate jump over bursts: below the 0.63/s average
    arrivals = load.recorded_trace("azure-code", 0, 60.0, rate)
    assert len(arrivals) == round(60 * rate)
    assert all(0 <= a.at_s < 60 for a in arrivals)
    assert all(load.NEW_TOKENS[0] <= a.max_new_tokens <= load.NEW_TOKENS[1] for a in arrivals)
    assert all(load.PROMPT_WORDS[0] <= len(a.prompt.split()) <= load.PROMPT_WORDS[1] for a in arrivals)
    peak, probe = load.recorded_peak("azure-code", 0, 60.0, rate)
    assert peak == pytest.approx(traces.load("azure-code").peak_factor() * rate)
    assert abs(len(probe) - 60 * peak) < 4 * math.sqrt(60 * peak) + 1

    settings = colocation.Settings(trace="azure-code", duration_s=60.0)
    assert msgspec.to_builtins(colocation.level_trace(settings, 1.0)) == msgspec.to_builtins(arrivals)
    # without a trace, the levels are the bursty traces as before
    plain = colocation.Settings(duration_s=60.0)
    assert colocation.level_trace(plain, 1.5) == load.bursty_trace(
        0, 60.0, burst_rate=1.5 * 1.5, quiet_rate=0.2 * 1.5
    )


def test_cpu_trace_flags():
    settings, _ = colocation.parse(["--trace", "azure-code", "--trace-span-s", "600", "--loads", "1"])
    assert settings.trace == "azure-code" and settings.trace_span_s == 600.0 and settings.trace_start_s == 0.0
    with pytest.raises(SystemExit):
        colocation.parse(["--trace", "azure-conv"])


def test_fixed_split_admits_its_units_in_its_split():
    menu = ["shared", "ft-25%", "ft-50%", "ft-75%"]
    policy = make_policy(
        "fixed-split", LatencyPredictor(), slo_s=0.05, idle_budget_s=0.05, static_units=3, splits=menu
    )
    assert isinstance(policy, FixedSplitPolicy) and policy.split == "ft-75%"  # the largest by default
    upcoming = [FinetuneWork(kind="forward", tokens=512, layers=1)] * 10
    admission = policy.admit(DecodeShape(batch_size=8, context_tokens=8000), upcoming)
    assert admission.units == 3 and admission.split == "ft-75%" and admission.predicted_s is None
    policy.split = "ft-25%"
    assert policy.admit(DecodeShape(batch_size=8, context_tokens=8000), upcoming[:2]).split == "ft-25%"
    assert policy.admit(DecodeShape(batch_size=8, context_tokens=8000), upcoming[:2]).units == 2
    alone = make_policy("fixed-split", LatencyPredictor(), slo_s=0.05, idle_budget_s=0.05, static_units=1)
    assert alone.split == "shared"  # no partitions: static


class _Run(msgspec.Struct):
    policy: str
    slo_attainment: float
    finetune_tokens_per_s: float


def test_gain_counts_only_the_named_baselines():
    runs = [
        _Run("harli", 0.995, 300.0),
        _Run("static", 0.999, 200.0),
        _Run("static/oracle", 0.999, 250.0),
        _Run("idle-only", 1.0, 100.0),
    ]
    default = verdicts.gain_over_best_baseline(runs)
    assert default.best == "static" and default.ratio == pytest.approx(1.5)
    oracle = verdicts.gain_over_best_baseline(runs, baselines=("static/oracle",))
    assert oracle.best == "static/oracle" and oracle.ratio == pytest.approx(1.2)
    assert verdicts.gain_over_best_baseline(runs, baselines=("naive",)).note == "no baseline holds the SLO"


@pytest.fixture(scope="module")
def replay() -> simulate.Report:
    """A short replay: 10 recorded minutes of the trace at mean load 0.2, every policy, one seed."""
    settings = simulate.Settings(
        loads=[], seeds=[0], trace="azure-code", trace_span_s=600.0, trace_load=0.2, probe_s=10.0
    )
    return simulate.run(settings, log=lambda line: None)


def test_simulated_trace_replay_gives_every_policy_a_result(replay):
    (result,) = replay.replays
    policies = [r.policy for r in result.runs]
    assert policies == [
        "harli", "harli/shared", "harli/itl", "idle-only", "naive", "static/peak", "fixed-split/peak",
        "static/oracle",
    ]  # fmt: skip
    assert result.requests == sum(traces.load("azure-code").at_s < 600)
    assert result.arrival_rate == pytest.approx(0.2 * result.capacity_rate)
    assert result.peak_rate > 2 * result.arrival_rate
    assert all(r.requests == result.requests for r in result.runs)
    assert result.tuning.fixed_split in {"ft-25%", "ft-50%", "ft-75%"}
    assert {p[0] for p in result.tuning.probes} == {"static", "ft-25%", "ft-50%", "ft-75%"}
    fixed = result.runs[policies.index("fixed-split/peak")]
    if result.tuning.fixed_split_units:
        assert set(k for k, v in fixed.split_units.items() if v) == {result.tuning.fixed_split}
    # the oracle is tuned on the scored trace: it trains at least as much as static tuned at peak, or the
    # peak-tuned one misses the SLO on the trace
    peak, oracle = (result.runs[policies.index(name)] for name in ("static/peak", "static/oracle"))
    assert verdicts.holds_slo(oracle)
    assert oracle.finetune_tokens_per_s >= peak.finetune_tokens_per_s or not verdicts.holds_slo(peak)


def test_simulated_trace_replay_harli_holds_the_slo(replay):
    (result,) = replay.replays
    harli = result.runs[0]
    assert harli.policy == "harli" and verdicts.holds_slo(harli) and harli.finetune_tokens_per_s > 0
    assert result.note == "" and result.gain is not None and result.best_baseline in simulate.REALISTIC


def test_trace_replay_reaches_the_report(replay):
    targets, table, notes = simulate.simulate_summary(replay)
    assert "`static/peak`" in table and "`fixed-split/peak`" in table and "`static/oracle`" in table
    assert any("trace azure-code" in t.target and "realistic" in t.target for t in targets)
    assert any("oracle" in t.target for t in targets)
    assert any("CC-BY" in note and "busiest recorded minute" in note for note in notes)
    encoded = msgspec.json.decode(msgspec.json.encode(replay), type=simulate.Report)
    assert encoded.replays[0].tuning == replay.replays[0].tuning
