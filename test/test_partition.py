"""SM partitions for finetune: the menu arithmetic and the no-op path run anywhere, the real one on CUDA."""

from __future__ import annotations

import contextlib
import json

import msgspec
import pytest
import torch

from sglang_harli.core.colocation.green_contexts import (
    DriverGreenContexts,
    GreenContextPartitioner,
    TorchGreenContexts,
    _StreamPartition,
    pick_backend,
    query_granularity,
)
from sglang_harli.core.colocation.partition import (
    SharedPartitioner,
    SMGranularity,
    SMSplit,
    make_partitioner,
    plan_splits,
    round_sms,
    sm_granularity,
)
from sglang_harli.core.colocation.work import SHARED

HOPPER = sm_granularity(9, 0)
AMPERE = sm_granularity(8, 0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- the lone shared split: CPU, disabled, unknown splits ------------------------------------------


def test_cpu_has_only_the_shared_split():
    p = make_partitioner("cpu")
    assert isinstance(p, SharedPartitioner)
    assert [s.name for s in p.splits] == [SHARED]
    assert p.shared.finetune_sms is None and p.shared.share == 1.0
    assert p.available is False
    assert p.reason and "cpu" in p.reason
    described = json.loads(json.dumps(p.describe()))
    assert described["available"] is False and described["reason"] == p.reason
    assert [s["name"] for s in described["splits"]] == [SHARED]


def test_shared_split_is_a_no_op():
    p = make_partitioner("cpu")
    a = torch.arange(6.0).reshape(2, 3)
    with p.finetune(p.shared):
        inside = a @ a.T
    assert torch.equal(inside, a @ a.T)
    with pytest.raises(RuntimeError, match="boom"), p.finetune(p.shared):
        raise RuntimeError("boom")


def test_disabled_wins_over_the_device():
    for device in ("cpu", "cuda", torch.device("cuda", 0)):
        p = make_partitioner(device, enabled=False)
        assert p.splits == (p.shared,) and not p.available
        assert "disabled" in p.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less path")
def test_cuda_without_cuda_explains_itself():
    p = make_partitioner("cuda")
    assert p.splits == (p.shared,) and not p.available
    assert "CUDA is not available" in p.reason


def test_foreign_splits_are_rejected():
    p = make_partitioner("cpu")
    with pytest.raises(ValueError, match="not on this partitioner"):
        p.finetune(SMSplit(name="ft-25%", finetune_sms=32, total_sms=132))
    assert p.split(SHARED) is p.shared
    with pytest.raises(KeyError):
        p.split("ft-25%")


@pytest.mark.parametrize("shares", [(0.0,), (1.0,), (0.5, 1.5), (-0.25,)])
def test_bad_shares_fail_even_on_cpu(shares):
    with pytest.raises(ValueError, match="shares"):
        make_partitioner("cpu", shares=shares)


# --- SMSplit -------------------------------------------------------------------------------------


def test_split_share_and_validation():
    split = SMSplit(name="ft-50%", finetune_sms=66, total_sms=132)
    assert split.share == 0.5 and split.partitioned
    assert SMSplit(name=SHARED, finetune_sms=None, total_sms=132).share == 1.0
    assert {split, SMSplit(name="ft-50%", finetune_sms=66, total_sms=132)} == {split}
    with pytest.raises(AttributeError):
        split.finetune_sms = 8  # type: ignore[misc]
    for bad in (0, 132, 200):
        with pytest.raises(ValueError):
            SMSplit(name="x", finetune_sms=bad, total_sms=132)
    with pytest.raises(ValueError):
        SMSplit(name="x", finetune_sms=8, total_sms=None)
    assert msgspec.json.decode(msgspec.json.encode(split), type=SMSplit) == split


# --- granularity and rounding --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cc", "expected"),
    [
        ((6, 0), (2, 2)),
        ((7, 0), (2, 2)),
        ((7, 5), (2, 2)),
        ((8, 0), (4, 2)),
        ((8, 9), (4, 2)),
        ((9, 0), (8, 8)),
        ((10, 0), (8, 8)),
        ((12, 0), (8, 8)),
    ],
)
def test_granularity_guideline(cc, expected):
    assert sm_granularity(*cc) == SMGranularity(*expected)


def test_granularity_before_pascal_is_refused():
    with pytest.raises(ValueError):
        sm_granularity(5, 2)


def test_h100_menu():
    splits = plan_splits(132, (0.25, 0.5, 0.75), HOPPER)
    assert splits[0].name == SHARED and splits[0].total_sms == 132
    assert [(s.name, s.finetune_sms) for s in splits[1:]] == [("ft-25%", 32), ("ft-50%", 64), ("ft-75%", 96)]
    counts = [s.finetune_sms for s in splits[1:]]
    assert len(set(counts)) == len(counts)
    assert all(c % 8 == 0 and 0 < c < 132 for c in counts)


def test_a100_menu():
    assert [s.finetune_sms for s in plan_splits(108, (0.25, 0.5, 0.75), AMPERE)[1:]] == [26, 54, 80]


def test_menu_dedups_and_sorts():
    splits = plan_splits(132, (0.75, 0.26, 0.25, 0.27), HOPPER)
    assert [(s.name, s.finetune_sms) for s in splits[1:]] == [("ft-26%", 32), ("ft-75%", 96)]


def test_extreme_shares_stay_inside_the_device():
    assert round_sms(1, 132, HOPPER) == 8  # a sliver still is a real partition, not 0
    assert round_sms(0, 132, HOPPER) == 8
    assert round_sms(131, 132, HOPPER) == 128  # never the whole device
    assert round_sms(136, 136, HOPPER) == 128  # all 136 would be aligned, but leaves decode nothing
    assert round_sms(1, 108, AMPERE) == 4


def test_devices_too_small_to_split():
    assert round_sms(4, 8, HOPPER) is None
    assert plan_splits(8, (0.25, 0.5, 0.75), HOPPER) == (
        SMSplit(name=SHARED, finetune_sms=None, total_sms=8),
    )


@pytest.mark.parametrize("granularity", [SMGranularity(2, 2), SMGranularity(4, 2), SMGranularity(8, 8)])
def test_round_sms_always_legal(granularity):
    for total in range(1, 180):
        for requested in range(total + 3):
            count = round_sms(requested, total, granularity)
            if count is None:
                assert total - 1 < max(granularity.minimum, granularity.alignment)
                continue
            assert count % granularity.alignment == 0
            assert granularity.minimum <= count < total
            if requested >= granularity.minimum:
                assert count <= requested  # rounded down, never up past the request


# --- the green-context partitioner with a fake backend (runs without a GPU) ----------------------


class FakeBackend:
    name = "fake"

    def __init__(self, fail: bool = False):
        self.created: list[int] = []
        self.log: list[str] = []
        self.fail = fail

    def create(self, device, num_sms):
        if self.fail:
            raise RuntimeError("driver says no")
        self.created.append(num_sms)

        @contextlib.contextmanager
        def enter():
            self.log.append(f"enter {num_sms}")
            try:
                yield
            finally:
                self.log.append(f"exit {num_sms}")

        return enter


def fake_partitioner(backend, total=132, shares=(0.25, 0.5, 0.75)):
    return GreenContextPartitioner(
        torch.device("cuda", 0), total_sms=total, granularity=HOPPER, backend=backend, shares=shares
    )


def test_contexts_are_created_lazily_and_cached():
    backend = FakeBackend()
    p = fake_partitioner(backend)
    assert p.available and p.reason is None and backend.created == []
    quarter = p.split("ft-25%")
    for _ in range(3):
        with p.finetune(quarter):
            pass
    with p.finetune(p.shared):
        pass
    assert backend.created == [32]
    assert backend.log == ["enter 32", "exit 32"] * 3
    assert p.describe()["created"] == ["ft-25%"]
    p.prepare()
    assert backend.created == [32, 64, 96]
    json.dumps(p.describe())


def test_partition_exits_when_the_body_raises():
    backend = FakeBackend()
    p = fake_partitioner(backend)
    with pytest.raises(KeyError), p.finetune(p.split("ft-50%")):
        raise KeyError("step failed")
    assert backend.log == ["enter 64", "exit 64"]


def test_creation_failure_degrades_to_shared():
    p = fake_partitioner(FakeBackend(fail=True))
    with p.finetune(p.split("ft-75%")):
        ran = torch.ones(2) + 1
    assert torch.equal(ran, torch.full((2,), 2.0))
    assert not p.available and "driver says no" in p.reason
    assert p.describe()["reason"] == p.reason


def test_partitioner_on_a_device_too_small():
    p = fake_partitioner(FakeBackend(), total=8)
    assert p.splits == (p.shared,) and not p.available and "8 SMs" in p.reason


def test_backend_is_found_in_this_environment():
    backend, why = pick_backend()
    assert (backend is None) == bool(why)


# --- real green contexts -------------------------------------------------------------------------


def cuda_backends():
    backends = [TorchGreenContexts, DriverGreenContexts]
    params = []
    for cls in backends:
        try:
            if cls is TorchGreenContexts:
                from torch.cuda.green_contexts import GreenContext

                backend = cls(GreenContext)
            else:
                from cuda.bindings import driver

                backend = cls(driver)
        except ImportError:
            continue
        params.append(pytest.param(backend, id=cls.name))
    return params


@needs_cuda
def test_make_partitioner_on_cuda_is_available():
    p = make_partitioner("cuda")
    assert p.available, p.reason
    assert len(p.splits) > 1
    p.prepare()
    assert p.available, p.reason
    total = torch.cuda.get_device_properties(p.device).multi_processor_count
    assert all(0 < s.finetune_sms < total for s in p.splits[1:])


@needs_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_matmul_inside_each_split_matches_outside(backend):
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    granularity = query_granularity(device) or sm_granularity(props.major, props.minor)
    p = GreenContextPartitioner(
        device, total_sms=props.multi_processor_count, granularity=granularity, backend=backend
    )
    # Small integers keep float32 sums exact whatever order a kernel on fewer SMs adds them in.
    a = torch.randint(-4, 5, (512, 256), device=device).float()
    b = torch.randint(-4, 5, (256, 384), device=device).float()
    expected = a @ b
    caller = torch.cuda.current_stream(device)
    for split in p.splits:
        with p.finetune(split):
            inside = a @ b
            partition = p._entries.get(split)
            if isinstance(partition, _StreamPartition):  # torch >= 2.11 or cuda-python
                assert torch.cuda.current_stream(device) == partition.stream != caller
        assert torch.cuda.current_stream(device) == caller
        assert torch.equal(inside, expected), split  # no synchronize: the exit ordered us after it
    assert p.available, p.reason


@needs_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_partition_restores_the_stream_when_the_body_raises(backend):
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    p = GreenContextPartitioner(
        device,
        total_sms=props.multi_processor_count,
        granularity=query_granularity(device) or sm_granularity(props.major, props.minor),
        backend=backend,
    )
    caller = torch.cuda.current_stream(device)
    with pytest.raises(RuntimeError, match="step failed"), p.finetune(p.splits[-1]):
        torch.ones(4, device=device).sum()
        raise RuntimeError("step failed")
    assert torch.cuda.current_stream(device) == caller
    assert torch.equal(torch.ones(4, device=device) * 2, torch.full((4,), 2.0, device=device))
