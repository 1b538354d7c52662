"""CUDA green contexts: the partitions behind ``partition``'s menu, where the platform has them.

A :class:`GreenContextPartitioner` builds one green context per split through a backend, whichever
library can make them here: ``torch.cuda.green_contexts`` (torch owns the lifetimes) or cuda-python's
driver bindings for a torch without it. Tests on CPU swap in a fake backend. :func:`pick_backend` says
which one this environment has, or why none; :func:`query_granularity` asks the driver what partition
sizes it grants exactly. ``partition.make_partitioner`` reaches all of this only on a CUDA device.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from sglang_harli.core.colocation.partition import (
    DEFAULT_SHARES,
    Partitioner,
    SMGranularity,
    SMSplit,
    plan_splits,
)

logger = logging.getLogger(__name__)

EnterPartition = Callable[[], contextlib.AbstractContextManager[None]]


class GreenContextBackend(Protocol):
    """Whichever library actually builds green contexts; swapped for a fake in CPU tests."""

    name: str

    def create(self, device: torch.device, num_sms: int) -> EnterPartition:
        """Build one green context of exactly ``num_sms`` SMs and return how to enter it.

        The returned callable must keep the context alive for as long as it is referenced.
        """
        ...


class GreenContextPartitioner(Partitioner):
    """CUDA partitions: each non-shared split is one green context, built on first use and kept.

    Building a context costs a driver round trip and a stream, so it happens once per split (lazily,
    or all at once through :meth:`prepare`). If the driver refuses, finetune keeps running unfenced
    (``shared``) rather than failing, and ``available``/``reason`` say so.
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        total_sms: int,
        granularity: SMGranularity,
        backend: GreenContextBackend,
        shares: Sequence[float] = DEFAULT_SHARES,
    ):
        self.device = torch.device(device)
        self.total_sms = total_sms
        self.granularity = granularity
        self.backend = backend
        self.splits = plan_splits(total_sms, shares, granularity)
        self._entries: dict[SMSplit, EnterPartition] = {}
        self._lock = threading.Lock()
        self._failure: str | None = None
        if len(self.splits) == 1:
            self._failure = (
                f"no share in {list(shares)} gives a partition of {total_sms} SMs "
                f"(minimum {granularity.minimum}, multiple of {granularity.alignment}, below all SMs)"
            )

    @property
    def available(self) -> bool:
        return self._failure is None

    @property
    def reason(self) -> str | None:
        return self._failure

    def _entry(self, split: SMSplit) -> EnterPartition | None:
        entry = self._entries.get(split)
        if entry is not None or self._failure is not None:
            return entry
        with self._lock:
            if split in self._entries or self._failure is not None:
                return self._entries.get(split)
            assert split.finetune_sms is not None
            try:
                entry = self.backend.create(self.device, split.finetune_sms)
            except Exception as exc:
                self._failure = f"creating a {split.finetune_sms}-SM green context failed: {exc}"
                logger.warning("SM partitions disabled, finetune shares the GPU: %s", self._failure)
                return None
            self._entries[split] = entry
            return entry

    def finetune(self, split: SMSplit) -> contextlib.AbstractContextManager[None]:
        self._check(split)
        if not split.partitioned:
            return contextlib.nullcontext()
        entry = self._entry(split)
        return contextlib.nullcontext() if entry is None else entry()

    def prepare(self) -> None:
        for split in self.splits:
            if split.partitioned:
                self._entry(split)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "green_context",
            "device": str(self.device),
            "available": self.available,
            "reason": self.reason,
            "backend": self.backend.name,
            "total_sms": self.total_sms,
            "granularity": self.granularity._asdict(),
            "splits": self._describe_splits(),
            "created": [s.name for s in self.splits if s in self._entries],
        }


@contextlib.contextmanager
def _on_side_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """Run the body on ``stream`` as if it were inline on the caller's stream.

    The side stream first waits for what the caller already queued (the body's inputs), and the
    caller's stream waits for the body before anything queued after it (its outputs). Both waits are
    on the GPU, so the host never blocks. The same two waits keep the caching allocator honest without
    ``record_stream``: a block freed on one stream is only reused by work ordered after its last reader,
    provided the side stream is only used through here and no other thread queues on the caller's
    stream while the body runs (decode has its own stream).
    """
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)


class _StreamPartition:
    """A green context entered through a stream bound to it; holds whatever must outlive that stream."""

    def __init__(self, stream: torch.cuda.Stream, owner: Any = None):
        self.stream = stream
        self._owner = owner  # torch destroys a GreenContext (and its streams) when it is collected

    def __call__(self) -> contextlib.AbstractContextManager[None]:
        return _on_side_stream(self.stream)


class _ContextStackPartition:
    """torch 2.9/2.10, which has no green-context streams: the context is pushed current instead.

    ``set_context`` switches to the green context's default stream after recording an event on the
    caller's stream, and ``pop_context`` restores the caller's stream behind an event, which gives the
    same inline ordering as :func:`_on_side_stream`.
    """

    def __init__(self, ctx: Any):
        self._ctx = ctx

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self._ctx.set_context()
        try:
            yield
        finally:
            self._ctx.pop_context()


def _ensure_primary_context(device: torch.device) -> None:
    """Green contexts are carved out of the primary context; make sure torch has created it."""
    torch.zeros(1, device=device)


class TorchGreenContexts:
    """``torch.cuda.green_contexts`` (beta since torch 2.9): preferred, torch owns the lifetimes."""

    name = "torch.cuda.green_contexts"

    def __init__(self, green_context_cls: Any):
        self._cls = green_context_cls

    def create(self, device: torch.device, num_sms: int) -> EnterPartition:
        _ensure_primary_context(device)
        ctx = self._cls.create(num_sms=num_sms, device_id=device.index)
        if hasattr(ctx, "Stream"):
            # torch >= 2.11 binds streams to the context and deprecates set_context/pop_context.
            return _StreamPartition(ctx.Stream(), owner=ctx)
        return _ContextStackPartition(ctx)


class DriverGreenContexts:
    """cuda-python's driver bindings, for a torch without ``torch.cuda.green_contexts``."""

    name = "cuda.bindings.driver"

    def __init__(self, driver: Any):
        self._drv = driver

    def _ok(self, result: tuple) -> Any:
        """cuda-python returns ``(CUresult, *outputs)`` instead of raising."""
        err, *values = result
        if err != self._drv.CUresult.CUDA_SUCCESS:
            _, text = self._drv.cuGetErrorString(err)
            detail = text.decode() if isinstance(text, bytes) else "no description"
            raise RuntimeError(f"{getattr(err, 'name', err)}: {detail}")
        return values[0] if len(values) == 1 else tuple(values)

    def create(self, device: torch.device, num_sms: int) -> EnterPartition:
        drv = self._drv
        _ensure_primary_context(device)
        dev = self._ok(drv.cuDeviceGet(device.index))
        sms = self._ok(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        groups, made, _rest = self._ok(drv.cuDevSmResourceSplitByCount(1, sms, 0, num_sms))
        if made != 1:
            raise RuntimeError(f"the driver made {made} SM groups of {num_sms} instead of 1")
        desc = self._ok(drv.cuDevResourceGenerateDesc([groups[0]], 1))
        flags = drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        green = self._ok(drv.cuGreenCtxCreate(desc, dev, flags))
        try:
            flags = drv.CUstream_flags.CU_STREAM_NON_BLOCKING
            raw = self._ok(drv.cuGreenCtxStreamCreate(green, flags, 0))
        except BaseException:
            drv.cuGreenCtxDestroy(green)
            raise
        partition = _StreamPartition(torch.cuda.ExternalStream(int(raw), device=device))
        weakref.finalize(partition, _destroy_driver_green_context, drv, raw, green)
        return partition


def _destroy_driver_green_context(drv: Any, stream: Any, green: Any) -> None:
    drv.cuStreamDestroy(stream)
    drv.cuGreenCtxDestroy(green)


def pick_backend() -> tuple[GreenContextBackend | None, str]:
    why: list[str] = []
    try:
        from torch.cuda import green_contexts
    except ImportError as exc:
        why.append(f"torch {torch.__version__} has no torch.cuda.green_contexts ({exc})")
    else:
        # torch 2.9/2.10 compiled it in C++ and flag builds without it; later ones check on create().
        if getattr(green_contexts, "SUPPORTED", True):
            return TorchGreenContexts(green_contexts.GreenContext), ""
        why.append(f"torch {torch.__version__} was built without green context support")
    try:
        from cuda.bindings import driver
    except ImportError:
        why.append("cuda-python (cuda.bindings) is not installed")
    else:
        return DriverGreenContexts(driver), ""
    return None, "; ".join(why)


def query_granularity(device: torch.device) -> SMGranularity | None:
    """The driver's own minimum and alignment (CUDA 13+ report them), else ``None``."""
    try:
        from cuda.bindings import driver as drv

        err, dev = drv.cuDeviceGet(device.index)
        if err != drv.CUresult.CUDA_SUCCESS:
            return None
        err, res = drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
        if err != drv.CUresult.CUDA_SUCCESS:
            return None
    except Exception:  # no bindings, or bindings older than green contexts
        return None
    minimum = getattr(res.sm, "minSmPartitionSize", 0)
    alignment = getattr(res.sm, "smCoscheduledAlignment", 0)
    if minimum > 0 and alignment > 0:
        return SMGranularity(minimum=int(minimum), alignment=int(alignment))
    return None
