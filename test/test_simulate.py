"""The trace simulator (``benchmark.simulate``), asserted on its real outputs: the production policies on
a roofline H100, a seeded bursty trace, no server. Each test simulates a minute or two in a few seconds."""

import functools

import msgspec
import pytest
from benchmark import simulate

from helpers import simulations
from sglang_harli.core.colocation.loop import PREDICTOR_FORGETTING
from sglang_harli.core.colocation.predictor import LatencyPredictor
from sglang_harli.core.colocation.qos import HarliPolicy, IdleOnlyPolicy, NaivePolicy, StaticPolicy

SLO_S, DURATION_S = simulations.SLO_S, simulations.DURATION_S
simulated = simulations.simulated


def prefetch() -> None:
    """The planned runs start in a child at the end of collection (``helpers.simulations``)."""
    simulations.start()


@pytest.fixture(scope="module")
def roofline() -> simulate.Roofline:
    return simulations.roofline()


@pytest.fixture(scope="module")
def rate(roofline) -> float:
    return roofline.saturation_rate(simulate.Workload(), SLO_S)


@functools.cache
def run(roofline, rate, policy, load, **options) -> simulate.RunResult:
    """The run for these arguments: the child's when it planned it, else computed here (once)."""
    return simulations.planned(policy, load, options) or simulated(roofline, rate, policy, load, **options)


def test_roofline_step_grows_with_batch_and_context(roofline):
    steps = [roofline.decode_s(batch, 1024 * batch) for batch in (1, 8, 64, 256)]
    assert steps == sorted(steps) and steps[-1] > 2 * steps[0]
    assert roofline.decode_s(32, 32 * 4096) > roofline.decode_s(32, 32 * 512)
    # batch alone adds only flops: invisible while memory-bound, dominant at very large batches
    assert roofline.decode_s(64, 2048 * 16) == roofline.decode_s(32, 2048 * 16)
    assert roofline.decode_s(2048, 2048 * 16) > 2 * roofline.decode_s(64, 2048 * 16)
    # batch 1 at 1k context: weights (15 GB) at 80% of 3.35 TB/s plus 1 ms, a published-looking 6-7 ms
    assert 0.006 < roofline.decode_s(1, 1024) < 0.0075
    # co-running finetune on part of the SMs slows decode, more with a larger share
    alone, quarter, three_quarters = (roofline.decode_s(64, 64 * 1024, share) for share in (0.0, 0.25, 0.75))
    assert alone < quarter < three_quarters


def test_simulator_runs_the_production_policies(roofline):
    expected = {
        "harli": HarliPolicy,
        "idle-only": IdleOnlyPolicy,
        "naive": NaivePolicy,
        "static": StaticPolicy,
    }
    for name, cls in expected.items():
        instance = simulate.Instance(roofline, name, slo_s=SLO_S, static_units=3)
        assert type(instance.policy) is cls
    harli = simulate.Instance(roofline, "harli", slo_s=SLO_S)
    assert isinstance(harli.predictor, LatencyPredictor) and harli.policy.predictor is harli.predictor
    assert list(harli.splits) == ["shared", "ft-25%", "ft-50%", "ft-75%"]  # the server's menu on an H100


def test_predictor_forgetting_is_the_servers(roofline):
    harli = simulate.Instance(roofline, "harli", slo_s=SLO_S)
    assert harli.predictor.forgetting == PREDICTOR_FORGETTING


def test_deterministic_for_a_seed(roofline, rate):
    first = simulated(roofline, rate, "harli", 0.5, seed=3, duration_s=30.0)
    second = simulated(roofline, rate, "harli", 0.5, seed=3, duration_s=30.0)
    other = simulated(roofline, rate, "harli", 0.5, seed=4, duration_s=30.0)
    assert msgspec.to_builtins(first) == msgspec.to_builtins(second)
    assert first.finetune_tokens_per_s > 0 and first.requests > 100
    assert msgspec.to_builtins(first) != msgspec.to_builtins(other)


@pytest.mark.parametrize("load", [0.2, 0.95])
def test_harli_holds_the_slo_light_and_near_saturation(roofline, rate, load):
    result = run(roofline, rate, "harli", load)
    assert result.slo_attainment >= simulate.ATTAINMENT_TARGET
    assert result.tpot_p99_ms <= SLO_S * 1e3
    assert result.finetune_tokens_per_s > 0


def test_naive_violates_under_load(roofline, rate):
    """A whole micro-batch after every step breaks both metrics: per-request TPOT at half load (at 0.8,
    memory lets it run so rarely that requests' TPOT holds), token intervals at 0.8 too."""
    naive = run(roofline, rate, "naive", 0.5)
    assert naive.slo_attainment < 0.95 and naive.tpot_p99_ms > SLO_S * 1e3
    busy = run(roofline, rate, "naive", 0.8)
    assert busy.itl_attainment < 0.95 and busy.itl_p99_ms > SLO_S * 1e3


def test_holding_tpot_per_request_spends_banked_slack_that_itl_leaves(roofline, rate):
    """With ``tpot`` token intervals may run past the SLO (slack a request banked pays for them) while
    every request's TPOT holds; with ``itl`` they may not."""
    tpot = run(roofline, rate, "harli", 0.5)
    itl = run(roofline, rate, "harli", 0.5, slo_metric="itl")
    for result in (tpot, itl):
        assert result.slo_attainment >= simulate.ATTAINMENT_TARGET and result.finetune_tokens_per_s > 0
    assert itl.itl_attainment >= simulate.ATTAINMENT_TARGET
    assert tpot.itl_attainment < itl.itl_attainment and tpot.itl_p99_ms > itl.itl_p99_ms


def test_harli_trains_more_than_idle_only(roofline, rate):
    for load in (0.05, 0.5):
        harli = run(roofline, rate, "harli", load)
        idle = run(roofline, rate, "idle-only", load)
        assert idle.slo_attainment == 1.0
        assert harli.finetune_tokens_per_s > 1.5 * idle.finetune_tokens_per_s


def test_static_search_returns_the_largest_units_that_hold(roofline, rate):
    settings = simulate.Settings(duration_s=30.0, max_static_units=65)
    trace = simulate.Workload().trace(0, settings.duration_s, 0.5 * rate)
    best = simulate.best_static(roofline, trace, settings=settings, load=0.5, seed=0)
    assert best.slo_attainment >= simulate.ATTAINMENT_TARGET
    one_more = simulate.simulate(
        roofline, "static", trace, duration_s=30.0, slo_s=SLO_S, load=0.5, static_units=best.static_units + 1
    )
    assert one_more.slo_attainment < simulate.ATTAINMENT_TARGET


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_stage_2_predicts_every_split_it_ran_within_ten_percent(roofline, rate, load):
    """Units cost what they cost on their own split, and a partitioned split overlaps the decode step:
    with both modelled, stage 2's error is small on every split the policy used, not only on shared."""
    result = run(roofline, rate, "harli", load, duration_s=90.0)
    used = [split for split, units in result.split_units.items() if units > 50]
    assert any(split != "shared" for split in used), result.split_units
    for split in used:
        assert result.corun_mape_by_split[split] < 0.10, (split, result.corun_mape_by_split)
