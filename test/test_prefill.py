"""The prefill side of co-location (``core.colocation.prefill``) and the token-interval cap's default: TTFT
measured from arrival to first token, prefill cost learnt online, room left for the prefills the arrival
rate says will come, and a prefill held for finetune work only where the TTFT objective leaves room."""

import argparse

import pytest

from helpers.colocation import FakeClock, ScriptedPredictor, plan
from sglang_harli.core.colocation.loop import CoLocation, itl_cap_s, reported_ttft_s
from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.prefill import (
    ARRIVAL_WINDOW_S,
    DEFAULT_TTFT_FACTOR,
    PrefillOutlook,
    Prefills,
)
from sglang_harli.core.colocation.qos import HarliPolicy
from sglang_harli.core.config import HarliConfig, add_struct_flags, config_from_flags, flag_name

SLO = 0.050
SHAPE = DecodeShape(batch_size=4, context_tokens=400)


def prefills(clock, objective_s=None):
    return Prefills(objective_s=objective_s, reported_s=objective_s or 5 * SLO, clock=clock)


# The fit's prior (worth about a hundredth of a sample per coefficient) biases a handful of exact samples
# by well under a thousandth.
FIT = dict(rel=2e-3)


def teach(side: Prefills, intercept=0.004, per_token=2e-4, tokens=(16, 64, 128, 256, 96, 48)):
    for n in tokens:
        side.prefill_ran(n, intercept + per_token * n)


def test_prefill_cost_is_learnt_as_a_line_in_new_tokens():
    side = prefills(FakeClock())
    assert side.predict(100) is None  # nothing seen yet: no guess
    teach(side)
    assert side.predict(100) == pytest.approx(0.004 + 2e-4 * 100, **FIT)
    assert side.predict(1000) == pytest.approx(0.004 + 2e-4 * 1000, **FIT)
    assert side.snapshot().cost.samples == 6


def test_ttft_counts_from_arrival_to_the_first_token_and_is_judged_against_the_objective():
    clock = FakeClock()
    side = prefills(clock, objective_s=0.5)
    side.arrived("a", 100)
    side.arrived("b", 50)
    clock.now += 0.2
    assert side.tokens_out("a", 0) is None  # a chunk of a chunked prefill: no token yet
    assert side.tokens_out("a", 1) == pytest.approx(0.2)
    assert side.tokens_out("a", 2) is None  # counted once
    clock.now += 0.6
    assert side.tokens_out("b", 1) == pytest.approx(0.8)
    ttft = side.snapshot().ttft
    assert ttft.count == 2 and ttft.slo_attainment == 0.5 and ttft.objective_ms == 500.0
    assert ttft.objective_set and side.snapshot().waiting == 0


def test_the_default_objective_is_reported_against_but_never_holds_a_prefill():
    clock = FakeClock()
    config = HarliConfig(tpot_slo_ms=50.0)
    assert reported_ttft_s(config) == pytest.approx(DEFAULT_TTFT_FACTOR * 0.050)
    assert reported_ttft_s(HarliConfig(tpot_slo_ms=50.0, ttft_slo_ms=300.0)) == pytest.approx(0.3)
    colocation = CoLocation.from_config(config, clock=clock)
    assert not colocation.prefills.snapshot().ttft.objective_set
    teach(colocation.prefills)
    colocation.request_arrived("r", 10)
    colocation.arrival_during_work()
    assert not colocation.prefill_waits()


def test_a_prefill_is_held_one_decode_step_only_while_the_objective_leaves_room():
    clock = FakeClock()
    side = prefills(clock, objective_s=0.4)  # a held TTFT may reach half of it: 200 ms
    teach(side)  # a 100-token prefill: 24 ms
    assert not side.hold(0.05)  # nobody waiting
    side.arrived("a", 100)
    clock.now += 0.1
    assert side.hold(0.05)  # 100 + 50 + 24 ms
    assert not side.hold(None)  # no decode step predicted: no hold
    clock.now += 0.05
    assert not side.hold(0.05)  # 150 + 50 + 24 ms is past 200
    assert side.snapshot().held == 1
    side.tokens_out("a", 1)
    side.arrived("b", 5000)  # a long prompt: 1 s of prefill alone
    assert not side.hold(0.01)


def test_the_arrival_rate_and_prompt_length_give_the_prefill_load():
    clock = FakeClock()
    side = prefills(clock)
    teach(side)
    for index in range(30):  # 30 arrivals of 100 tokens in 15 s
        side.arrived(f"r{index}", 100)
        clock.now += 0.5
    rate = 30 / ARRIVAL_WINDOW_S
    assert side.arrival_rate() == pytest.approx(rate)
    assert side.mean_prompt_tokens() == 100
    assert side.load() == pytest.approx(rate * side.predict(100), rel=1e-12)
    assert side.load() == pytest.approx(rate * 0.024, **FIT)
    clock.now += ARRIVAL_WINDOW_S + 1  # all of them out of the window
    assert side.arrival_rate() == 0 and side.load() == 0


def test_the_budget_leaves_room_for_the_prefills_to_come():
    upcoming = plan(micro_batches=6)
    tpot = HarliPolicy(ScriptedPredictor(), slo_s=SLO, idle_budget_s=0.05, max_itl_s=4 * SLO)
    slack = 0.5 * SLO  # no banked slack: the cap is far
    alone = tpot.admit(SHAPE, upcoming, slack_s=slack)
    busy = tpot.admit(SHAPE, upcoming, slack_s=slack, prefills=PrefillOutlook(load=0.5, prefill_s=0.001))
    assert busy.budget_s == pytest.approx(alone.budget_s / 1.5)  # TPOT averages: room for rho of it
    assert 0 < busy.units < alone.units and busy.predicted_s <= busy.budget_s
    # with slack banked the cap binds: a landing prefill breaks the interval, so whole ones are kept free,
    # as many as arrive in one interval more often than the 0.5% of intervals the percentile leaves over
    rich = 10 * SLO
    cap = 4 * SLO - tpot.cap_margin_s
    assert tpot.admit(SHAPE, upcoming, slack_s=rich).budget_s == pytest.approx(cap)
    frequent = PrefillOutlook(load=0.01, arrivals_per_s=2.0, prefill_s=0.004)  # 0.4 arrivals per cap
    # Poisson(0.4): 3 or more arrive in 0.79% of intervals, 4 or more in 0.078%
    assert tpot.admit(SHAPE, upcoming, slack_s=rich, prefills=frequent).budget_s == pytest.approx(cap - 0.012)
    bursty = PrefillOutlook(load=0.01, arrivals_per_s=20.0, prefill_s=0.004)  # 4 per cap
    # Poisson(4): 10 or more arrive in 0.81% of intervals, 11 or more in 0.28%
    assert tpot.admit(SHAPE, upcoming, slack_s=rich, prefills=bursty).budget_s == pytest.approx(cap - 0.040)
    rare = PrefillOutlook(load=1e-5, arrivals_per_s=0.01, prefill_s=0.004)  # likelier under the 0.5%
    assert tpot.admit(SHAPE, upcoming, slack_s=rich, prefills=rare).budget_s == pytest.approx(cap)
    # itl holds every interval at its percentile: Poisson(0.1), 2 or more in 0.47% of them: one kept free
    itl = HarliPolicy(ScriptedPredictor(), slo_s=SLO, idle_budget_s=0.05, metric="itl")
    limit = itl.admit(SHAPE, upcoming).budget_s
    assert itl.admit(SHAPE, upcoming, prefills=frequent).budget_s == pytest.approx(limit - 0.004)


def test_colocation_measures_ttft_and_prefill_cost_from_engine_events():
    clock = FakeClock()
    colocation = CoLocation.from_config(HarliConfig(tpot_slo_ms=50.0, ttft_slo_ms=400.0), clock=clock)
    for index, tokens in enumerate((20, 40, 80, 160, 60)):
        colocation.request_arrived(f"r{index}", tokens)
        clock.now += 0.01
        colocation.forward_ran(None, 0.004 + 2e-4 * tokens, nothing_waiting=True, prefill_tokens=tokens)
        clock.now += 0.004 + 2e-4 * tokens
        colocation.result_arrived(decode=False, requests=[(f"r{index}", 1, False)])
    stats = colocation.snapshot().prefill
    assert stats.ttft.count == 5 and stats.ttft.objective_ms == 400.0 and stats.ttft.objective_set
    assert stats.cost.samples == 5
    assert colocation.prefills.predict(100) == pytest.approx(0.024, **FIT)
    assert stats.arrivals_per_s == pytest.approx(5 / ARRIVAL_WINDOW_S)
    assert colocation.first_tokens  # the engine's metrics read these


def test_the_interval_cap_defaults_to_twice_the_slo_and_zero_or_none_turns_it_off():
    assert itl_cap_s(HarliConfig(tpot_slo_ms=80.0)) == pytest.approx(0.160)
    assert itl_cap_s(HarliConfig(tpot_slo_ms=80.0, max_itl_ms=120.0)) == pytest.approx(0.120)
    assert itl_cap_s(HarliConfig(tpot_slo_ms=80.0, max_itl_ms=0.0)) is None
    parser = argparse.ArgumentParser()
    add_struct_flags(parser, HarliConfig, flag=flag_name)
    for off in ("0", "none", "off"):
        values = vars(parser.parse_args(["--harli-max-itl-ms", off]))
        assert config_from_flags(values).max_itl_ms == 0.0
    with pytest.raises(ValueError, match="--harli-max-itl-ms"):
        config_from_flags({"max_itl_ms": -5.0})
    with pytest.raises(ValueError, match="--harli-ttft-slo-ms"):
        config_from_flags({"ttft_slo_ms": 0.0})
    colocation = CoLocation.from_config(HarliConfig(tpot_slo_ms=80.0), predictor=LatencyPredictor())
    assert colocation.policy.max_itl_s == pytest.approx(0.160)
    assert colocation.snapshot().itl_cap_ms == pytest.approx(160.0)
    itl = CoLocation.from_config(HarliConfig(tpot_slo_ms=80.0, slo_metric="itl"))
    assert itl.snapshot().itl_cap_ms is None  # the cap is a tpot-only guard: itl holds every interval
