"""The QoS policies, driven by a fake clock and a scripted predictor: no wall clock, no server."""

import random

import pytest

from helpers.colocation import FakeClock, ScriptedPredictor, plan
from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.qos import (
    Admission,
    HarliPolicy,
    IdleOnlyPolicy,
    NaivePolicy,
    StaticPolicy,
    make_policy,
)
from sglang_harli.core.colocation.work import FinetuneWork, micro_batch_prefix

SLO = 0.050


def harli(predictor=None, **kwargs):
    """The policy holding the SLO per token interval (``itl``), unless ``metric`` says otherwise."""
    kwargs.setdefault("metric", "itl")
    return HarliPolicy(predictor or ScriptedPredictor(), slo_s=SLO, idle_budget_s=0.05, **kwargs)


def test_admits_the_longest_prefix_within_the_budget():
    rng = random.Random(0)
    predictor = ScriptedPredictor()
    policy = harli(predictor)
    used_some, used_none = 0, 0
    for _ in range(500):
        decode = DecodeShape(batch_size=rng.randint(1, 60), context_tokens=rng.randint(1, 10_000))
        upcoming = plan(rng.randint(1, 4))[rng.randint(0, 5) :]
        admission = policy.admit(decode, upcoming)
        budget = SLO - policy.margin_s
        assert admission.budget_s == pytest.approx(budget)
        assert list(admission.work) == upcoming[: admission.units]
        if admission.units:
            used_some += 1
            assert admission.predicted_s == pytest.approx(
                predictor.corun(decode, upcoming[: admission.units])
            )
            assert admission.predicted_s <= budget  # never over the budget
        else:
            used_none += 1
        if admission.units < len(upcoming):  # and nothing more would have fitted: all the slack is used
            assert predictor.corun(decode, upcoming[: admission.units + 1]) > budget
    assert used_some > 100 and used_none > 50  # the scenarios cover both


def test_picks_the_split_that_fits_the_most_work():
    predictor = ScriptedPredictor()
    policy = harli(predictor, splits=("shared", "half"))
    upcoming = plan(4)
    admission = policy.admit(DecodeShape(batch_size=20, context_tokens=4000), upcoming)
    shared = harli(predictor).admit(DecodeShape(batch_size=20, context_tokens=4000), upcoming)
    assert admission.split == "half" and admission.units > shared.units


def test_violations_widen_the_margin_and_shrink_admission():
    policy = harli()
    decode = DecodeShape(batch_size=10, context_tokens=2000)
    upcoming = plan(4)
    before = policy.admit(decode, upcoming)
    for _ in range(5):
        policy.observe(before, SLO * 1.2)
    after = policy.admit(decode, upcoming)
    assert policy.margin_s > 0.05 * SLO and after.units < before.units
    for _ in range(5_000):  # a long run of intervals within the SLO narrows it again
        policy.observe(after, SLO * 0.5)
    assert policy.admit(decode, upcoming).units >= before.units
    assert policy.margin_s == 0.0
    policy.observe(policy.admit(decode, []), SLO * 3)  # decode alone over the SLO spends the budget too
    assert policy.margin_s > 0.0


def test_when_decode_alone_breaks_the_slo_too_often_training_waits_for_idle_time():
    policy = harli()
    decode = DecodeShape(batch_size=10, context_tokens=2000)
    for _ in range(100):  # 5% of intervals over the SLO with no training at all
        for index in range(20):
            policy.observe(policy.admit(decode, []), SLO * (1.5 if index == 0 else 0.5))
    assert policy.margin_s == pytest.approx(SLO, rel=0.02)
    assert policy.admit(decode, plan(4)).units == 0
    assert policy.admit(None, plan(4)).units == len(plan(4))  # idle time is still trained in


def test_margin_settles_at_the_slo_percentile():
    """With noisy predictions, violations settle near half the 1% p99 allows, using most of the slack."""
    rng = random.Random(1)
    predictor = ScriptedPredictor()
    policy = harli(predictor, percentile=99.0)
    decode = DecodeShape(batch_size=10, context_tokens=2000)
    upcoming = [FinetuneWork(kind="forward", tokens=16, layers=1)] * 200  # fine-grained: 0.32 ms each
    violations, tokens, work = 0, 0, 0.0
    steps = 20_000
    for _ in range(steps):
        admission = policy.admit(decode, upcoming)
        # Large batches (bursts) are also where predictions miss most; the SLO is over tokens.
        batch = rng.choice((1, 1, 1, 8))
        observed = admission.predicted_s * (1 + rng.gauss(0, 0.02 if batch == 1 else 0.05))
        violations += batch * (observed > SLO)
        tokens += batch
        work += predictor.work_seconds(admission.work)
        policy.observe(admission, observed, tokens=batch)
    assert 0.002 < violations / tokens < 0.01
    slack = SLO - predictor.solo(decode)
    assert work / steps > 0.75 * slack


def test_a_violation_counts_by_the_tokens_that_waited_through_it():
    """Clients measure TPOT per token: an interval over the SLO with six requests waiting widens the
    margin about six times what one with a single request does, at the same mean batch."""
    single, six = harli(), harli()
    decode = DecodeShape(batch_size=2, context_tokens=200)
    for policy in (single, six):
        for _ in range(50):
            policy.observe(policy.admit(decode, []), SLO * 0.5, tokens=2)
    start = single.margin_s
    single.observe(Admission(units=0), SLO * 1.2, tokens=1)
    six.observe(Admission(units=0), SLO * 1.2, tokens=6)
    assert six.margin_s - start > 5 * (single.margin_s - start) > 0


def test_nothing_is_admitted_beside_decode_without_a_prediction():
    predictor = ScriptedPredictor()
    predictor.known = False
    admission = harli(predictor).admit(DecodeShape(batch_size=1, context_tokens=10), plan())
    assert admission.units == 0


@pytest.mark.parametrize("name", ["harli", "idle-only", "naive", "static"])
def test_without_decode_work_every_policy_trains_flat_out(name):
    policy = make_policy(name, ScriptedPredictor(), slo_s=SLO, idle_budget_s=0.2)
    upcoming = plan(3)
    admission = policy.admit(None, upcoming)
    assert admission.units == len(upcoming) and admission.budget_s == 0.2


def test_baselines():
    decode = DecodeShape(batch_size=60, context_tokens=60_000)
    upcoming = plan(3)
    assert IdleOnlyPolicy(slo_s=SLO, idle_budget_s=1).admit(decode, upcoming).units == 0
    assert StaticPolicy(units_per_step=3, slo_s=SLO, idle_budget_s=1).admit(decode, upcoming).units == 3
    assert StaticPolicy(units_per_step=3, slo_s=SLO, idle_budget_s=1).admit(decode, upcoming[:2]).units == 2
    naive = NaivePolicy(slo_s=SLO, idle_budget_s=1)
    assert naive.admit(decode, upcoming).units == 9  # one whole micro-batch, whatever the latency
    assert naive.admit(decode, upcoming[6:]).units == 3  # the rest of one in flight
    assert micro_batch_prefix(upcoming[18:]) == 1  # a lone optimizer step
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("greedy", ScriptedPredictor(), slo_s=SLO, idle_budget_s=1)


def test_colocation_pairs_each_admission_with_the_interval_it_lands_in():
    clock = FakeClock()
    predictor = LatencyPredictor(min_samples=2)
    policy = harli(predictor)
    colocation = CoLocation(predictor, policy, slo_s=SLO, clock=clock)
    shape = DecodeShape(batch_size=4, context_tokens=400)
    unit = FinetuneWork(kind="forward", tokens=100, layers=1)
    for _ in range(20):  # decode alone, 10 ms steps, 1 ms of loop overhead
        clock.now += 0.011
        colocation.decode_done(shape, 0.010)
    for _ in range(10):  # the unit takes 5 ms, learnt from idle-time runs
        colocation.unit_done(unit, 0.005, micro_batch_tokens=100)
    assert predictor.solo(shape) == pytest.approx(0.010, rel=1e-3)

    admission = colocation.admit(shape, [unit] * 20)
    assert admission.units == 7  # 11 ms + 7 x 5 ms = 46 ms <= 50 ms - 2.5 ms margin; 8 would be 51 ms
    assert admission.predicted_s == pytest.approx(0.046, rel=0.02)
    for _ in range(admission.units):
        colocation.unit_done(unit, 0.005)
    clock.now += 0.011 + 7 * 0.005 + 0.008  # the interval overran by 8 ms
    record = colocation.decode_done(shape, 0.010)
    assert record.units == 7 and record.observed_ms == pytest.approx(54.0)
    assert record.predicted_ms == pytest.approx(admission.predicted_s * 1e3)
    assert policy.violations_with_work == 1 and policy.margin_s > 0.0025
    stats = colocation.snapshot()
    assert stats.predictor.corun["shared"].samples == 19  # the first interval came before stage 1 was ready
    assert stats.token_intervals.count == 20
    assert stats.token_intervals.slo_attainment == pytest.approx(19 / 20)

    margin = policy.margin_s
    admission = colocation.admit(shape, [unit] * 20)
    for _ in range(admission.units):
        colocation.unit_done(unit, 0.005)
    colocation.other_batch()  # a prefill ran in the interval too: clients and the policy feel it ...
    clock.now += 0.3
    assert colocation.decode_done(shape, 0.010).observed_ms == pytest.approx(300.0)
    assert policy.margin_s > margin and policy.violations_with_work == 2
    assert colocation.snapshot().token_intervals.count == 21
    assert predictor.snapshot().corun["shared"].samples == 19  # ... but it is no sample for stage 2

    colocation.idle()  # nothing to run: the chain of token intervals ends
    clock.now += 5.0
    assert colocation.decode_done(shape, 0.010) is None

    # The last request finished and a new one was prefilled with nothing else decoding: no client waited
    # through that prefill for a next token, so its first decode interval counts from the prefill.
    clock.now += 0.4
    colocation.chain_restarts()
    clock.now += 0.012
    record = colocation.decode_done(shape, 0.010)
    assert record.observed_ms == pytest.approx(12.0) and record.units == 0
    assert colocation.snapshot().token_intervals.slo_attainment == pytest.approx(20 / 22)


def test_an_interval_is_paired_with_the_units_that_ran_not_those_admitted():
    """A request arrived (or the job ended, or no memory could be lent) after two of seven units: the
    interval is evidence about two units, and the seven-unit prediction says nothing about it."""
    clock = FakeClock()
    predictor = LatencyPredictor(min_samples=2)
    colocation = CoLocation(predictor, harli(predictor), slo_s=SLO, clock=clock)
    shape = DecodeShape(batch_size=4, context_tokens=400)
    unit = FinetuneWork(kind="forward", tokens=100, layers=1)
    for _ in range(20):
        clock.now += 0.011
        colocation.decode_done(shape, 0.010)
    for _ in range(10):
        colocation.unit_done(unit, 0.005)
    for _ in range(5):  # intervals that ran all their admitted units teach stage 2 the true cost
        admission = colocation.admit(shape, [unit] * 20)
        for _ in range(admission.units):
            colocation.unit_done(unit, 0.005)
        clock.now += 0.011 + admission.units * 0.005
        colocation.decode_done(shape, 0.010)
    admission = colocation.admit(shape, [unit] * 20)
    assert admission.units == 7
    colocation.unit_done(unit, 0.005)
    colocation.unit_done(unit, 0.005)
    clock.now += 0.011 + 2 * 0.005
    record = colocation.decode_done(shape, 0.010)
    assert record.units == 2 and record.predicted_ms is None
    assert record.observed_ms == pytest.approx(21.0)
    # Stage 2 was told about two units in 21 ms, so its estimate for seven is unchanged (46 ms): had it been
    # told seven, it would now think units nearly free.
    assert colocation.admit(shape, [unit] * 20).predicted_s == pytest.approx(0.046, rel=0.02)


def test_engine_events_resolve_to_intervals_in_an_overlap_loop():
    """SGLang's overlap loop launches step k+1's forward before it processes step k's results; the
    events ``CoLocation`` owns turn that order into the same intervals, interruptions and chain restarts
    a loop with its own clock reports directly."""
    clock = FakeClock()
    predictor = LatencyPredictor(min_samples=2)
    colocation = CoLocation(predictor, harli(predictor), slo_s=SLO, clock=clock)
    shape = DecodeShape(batch_size=4, context_tokens=400)

    colocation.forward_ran(None, 0.02, nothing_waiting=True)  # prefill of requests that all just arrived
    colocation.forward_ran(shape, 0.010)  # the first decode forward is launched before that result
    clock.now += 0.02
    assert colocation.result_arrived(decode=False) is None  # their first tokens: the chain starts here
    clock.now += 0.011
    first = colocation.result_arrived(decode=True)
    assert first.observed_ms == pytest.approx(11.0)  # counted from the prefill's result, not from idle
    for _ in range(5):
        colocation.forward_ran(shape, 0.010)
        clock.now += 0.011
        assert colocation.result_arrived(decode=True).observed_ms == pytest.approx(11.0)
    samples = predictor.snapshot().corun["shared"].samples

    colocation.forward_ran(None, 0.03, nothing_waiting=False)  # a newcomer's prefill, requests running
    clock.now += 0.041
    interrupted = colocation.result_arrived(decode=True)  # the decode result whose interval held it
    assert interrupted.observed_ms == pytest.approx(41.0)  # clients felt it ...
    assert predictor.snapshot().corun["shared"].samples == samples  # ... stage 2 learns nothing from it
    assert colocation.result_arrived(decode=False) is None  # the prefill's own result
    colocation.forward_ran(shape, 0.010)
    clock.now += 0.011
    colocation.result_arrived(decode=True)
    assert predictor.snapshot().corun["shared"].samples == samples + 1  # the chain is whole again

    colocation.idle()  # nothing to run
    clock.now += 3.0
    colocation.forward_ran(shape, 0.010)
    assert colocation.result_arrived(decode=True) is None  # no interval spans idle time
    assert colocation.snapshot().token_intervals.count == 8

    assert not colocation.prefill_waits()
    colocation.arrival_during_work()
    assert not colocation.prefill_waits()  # no TTFT objective: a prefill is never held (test_prefill)
