"""Per-request TPOT (``core.colocation.tpot``) and the policy that holds it: slack banked, spent, never
invented."""

import pytest

from sglang_harli.core.colocation.loop import CoLocation
from sglang_harli.core.colocation.predictor import DecodeShape, LatencyPredictor
from sglang_harli.core.colocation.qos import BANKED_RESERVE, HarliPolicy
from sglang_harli.core.colocation.tpot import TpotLedger
from sglang_harli.core.colocation.work import FinetuneWork

SLO = 0.100
UNIT = FinetuneWork(kind="forward", tokens=64, layers=1)


class FlatPredictor:
    """Decode steps of 20 ms, units of 10 ms, serial: an interval is 20 ms + 10 ms per unit."""

    def solo(self, shape):
        return 0.020

    def unit_seconds(self, work, split="shared"):
        return 0.010

    def interval(self, solo_s, work_s, split="shared"):
        return solo_s + work_s


def test_tpot_is_bench_servings_and_open_requests_are_forgotten_when_dropped():
    ledger = TpotLedger(SLO)
    ledger.results(1.0, [("a", 1, False), ("b", 1, False)], decode=False)  # their prefill: first tokens
    ledger.results(1.05, [("a", 2, False), ("b", 2, False)], decode=True)
    assert ledger.slack(1.05) == pytest.approx(2 * SLO - 0.05)  # one token in 50 ms banked 50 ms
    ledger.results(1.15, [("a", 3, False), ("b", 3, False), ("c", 1, False)], decode=True)  # c: PD join
    # c's first token just came: it banked nothing, and it is the batch's tightest request
    assert ledger.slack(1.15) == pytest.approx(SLO)
    finished = ledger.results(1.40, [("a", 4, True), ("c", 2, False)], decode=True)  # b was aborted
    assert finished == [pytest.approx((1.40 - 1.0) / 3)]  # (latency - TTFT) / (output tokens - 1)
    assert ledger.summary().open == 1  # b is gone: its clock would have starved training
    assert ledger.slack(1.40) == pytest.approx(2 * SLO - 0.25)  # c's second token took 250 ms: behind
    ledger.finished(0.5)
    summary = ledger.summary()
    assert summary.count == 2 and summary.slo_attainment == pytest.approx(0.0)
    assert ledger.results(2.0, [("d", 1, True)], decode=False) == []  # one token: no TPOT


def test_the_budget_is_the_tightest_requests_slack_less_the_reserve_and_margin():
    policy = HarliPolicy(FlatPredictor(), slo_s=SLO, idle_budget_s=0.05, metric="tpot", initial_margin=0.0)
    decode = DecodeShape(batch_size=4, context_tokens=400)
    upcoming = [UNIT] * 100
    # a newcomer in the batch (slack of one SLO): the same 100 ms an interval SLO would give
    assert policy.admit(decode, upcoming, slack_s=SLO).units == 8  # 20 + 8 x 10 = 100 ms
    # every request banked three SLOs: one stays banked for the tokens to come, two may be spent
    banked = policy.admit(decode, upcoming, slack_s=3 * SLO)
    assert banked.budget_s == pytest.approx((3 - BANKED_RESERVE) * SLO) and banked.units == 18
    # a request behind (its slack below one decode step): nothing beside the step, however much others
    # banked; slack that is not there is never spent
    assert policy.admit(decode, upcoming, slack_s=0.015).units == 0
    assert policy.admit(decode, upcoming, slack_s=0.055).units == 3
    # a hard cap on the interval bounds what banked slack may buy
    capped = HarliPolicy(
        FlatPredictor(), slo_s=SLO, idle_budget_s=0.05, metric="tpot", max_itl_s=0.150, initial_margin=0.0
    )
    assert capped.admit(decode, upcoming, slack_s=10 * SLO).units == 13
    # the per-interval metric ignores slack altogether
    itl = HarliPolicy(FlatPredictor(), slo_s=SLO, idle_budget_s=0.05, metric="itl", initial_margin=0.0)
    assert itl.admit(decode, upcoming, slack_s=10 * SLO).units == 8


def test_missed_requests_widen_the_margin_and_a_late_interval_counts_against_its_slack():
    policy = HarliPolicy(FlatPredictor(), slo_s=SLO, idle_budget_s=0.05, metric="tpot")
    start = policy.margin_s
    policy.observe_request(0.9 * SLO)
    assert policy.margin_s < start
    policy.observe_request(1.1 * SLO)
    widened = policy.margin_s
    assert widened > start
    decode = DecodeShape(batch_size=4, context_tokens=400)
    admission = policy.admit(decode, [UNIT] * 100, slack_s=2.5 * SLO)
    policy.observe(admission, 1.6 * SLO)  # past the SLO, within the slack it was budgeted from
    narrowed = policy.margin_s
    assert narrowed < widened
    policy.observe(admission, 2.6 * SLO)  # past the slack: its tightest request is now behind
    assert policy.margin_s > narrowed


def test_colocation_feeds_the_ledger_and_admits_against_it():
    now = [0.0]
    predictor = LatencyPredictor(min_samples=2)
    policy = HarliPolicy(predictor, slo_s=SLO, idle_budget_s=0.05, metric="tpot", initial_margin=0.0)
    colocation = CoLocation(predictor, policy, slo_s=SLO, clock=lambda: now[0])
    shape = DecodeShape(batch_size=1, context_tokens=100)
    for _ in range(10):
        colocation.unit_done(UNIT, 0.010)
    colocation.forward_ran(None, 0.05, nothing_waiting=True)
    colocation.result_arrived(decode=False, requests=[("r", 1, False)])
    for token in range(2, 12):  # ten decode steps of 20 ms: the request banks 80 ms a token
        now[0] += 0.020
        colocation.forward_ran(shape, 0.020)
        colocation.result_arrived(decode=True, requests=[("r", token, False)])
    assert colocation.requests.slack(now[0]) == pytest.approx(11 * SLO - 0.2)
    admission = colocation.admit(shape, [UNIT] * 200)
    assert admission.slack_s == pytest.approx(11 * SLO - 0.2)
    assert admission.predicted_s > SLO  # the interval may run past the SLO: the request paid for it
    assert admission.predicted_s <= admission.slack_s - BANKED_RESERVE * SLO
    now[0] += 0.02
    colocation.forward_ran(shape, 0.02)
    colocation.result_arrived(decode=True, requests=[("r", 12, True)])
    stats = colocation.snapshot()
    assert stats.requests.count == 1 and stats.requests.slo_attainment == 1.0
    assert stats.slo_metric == "tpot" and colocation.just_finished == [pytest.approx(0.22 / 11)]
