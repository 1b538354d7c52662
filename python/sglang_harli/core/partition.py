"""SM partitions for the finetune side of a co-located GPU (Harli, arXiv 2511.11729).

Harli hides LoRA finetuning behind memory-bound decode steps. Left unfenced, a finetune kernel can grab
every SM and stretch the decode step past its TPOT SLO; fenced into a CUDA *green context* it can only
ever run on the SMs that context was provisioned with, so the rest stay free for decode. The scheduler
picks one split per decode step from a short menu (more SMs for finetune when the SLO has slack, fewer
when it has none), so the menu is fixed up front and each context is built once and reused.

Only finetune enters a partition. Decode keeps the primary context, its own stream and its CUDA graphs,
untouched: a green context restricts the work launched into it and nothing else, so decode may still
use every SM, including the finetune split's when finetune leaves them idle.

Everywhere green contexts cannot be had (CPU, ROCm, a torch without them, a driver that refuses them,
or partitioning switched off) the menu collapses to the single no-op ``shared`` split, so callers never
branch on the platform and ``/harli/stats`` can say why.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec
import torch

from sglang_harli.core.work import SHARED

logger = logging.getLogger(__name__)

DEFAULT_SHARES: tuple[float, ...] = (0.25, 0.5, 0.75)


class SMSplit(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the menu the scheduler chooses from each decode step.

    Frozen and hashable so it can key the context cache and be compared by value across threads.
    """

    name: str
    finetune_sms: int | None
    """SMs the finetune green context holds; ``None`` means no partition at all."""
    total_sms: int | None
    """SMs on the device, kept beside the count so the share survives being sent to ``/harli/stats``."""

    def __post_init__(self) -> None:
        if self.finetune_sms is None:
            return
        if self.total_sms is None or not 0 < self.finetune_sms < self.total_sms:
            raise ValueError(
                f"split {self.name!r}: finetune_sms={self.finetune_sms} must lie strictly between 0 and "
                f"total_sms={self.total_sms}, otherwise decode or finetune is left with nothing"
            )

    @property
    def share(self) -> float:
        """Finetune's fraction of the device; the shared split lets finetune reach all of it."""
        if self.finetune_sms is None or self.total_sms is None:
            return 1.0
        return self.finetune_sms / self.total_sms

    @property
    def partitioned(self) -> bool:
        return self.finetune_sms is not None


class SMGranularity(NamedTuple):
    """What ``cuDevSmResourceSplitByCount`` accepts without rounding the request up behind our back."""

    minimum: int
    """Smallest partition the driver will create."""
    alignment: int
    """Partitions are multiples of this many SMs (SMs co-scheduled on one GPC, needed for clusters)."""


def sm_granularity(major: int, minor: int) -> SMGranularity:
    """The per-architecture guideline from the CUDA 13.0 ``cuda.h`` green-context section.

    Used when the driver cannot be asked (CUDA 12 has no ``minSmPartitionSize``/``smCoscheduledAlignment``
    in ``CUdevSmResource``) and so the menu can be planned and tested without a GPU. The driver's own
    numbers win when they are available, see :func:`_query_granularity`. CUDA 13.1's header no longer
    states the 4-SM minimum for 8.x; keeping it costs at most one tiny split and never a refused one.
    """
    del minor  # the guideline only distinguishes major architectures
    if major >= 9:
        return SMGranularity(minimum=8, alignment=8)
    if major == 8:
        return SMGranularity(minimum=4, alignment=2)
    if major in (6, 7):
        return SMGranularity(minimum=2, alignment=2)
    raise ValueError(f"compute capability {major}.x predates CUDA green contexts (6.0+ documented)")


def round_sms(requested: int, total: int, granularity: SMGranularity) -> int | None:
    """Round a requested finetune SM count *down* to something the driver will grant exactly.

    Down, because the driver rounds up, and a finetune split that silently grows eats into the SMs the
    scheduler believed decode had to itself. Two limits override that: at least the driver's minimum
    (so a small share still means *some* partition, never 0), and strictly fewer than all SMs (a split
    holding the whole device would not fence anything). ``None`` when the device is too small for both.
    """
    if requested < 0:
        raise ValueError(f"requested SM count must be >= 0, got {requested}")
    if total <= 0:
        raise ValueError(f"total SM count must be > 0, got {total}")
    align = granularity.alignment
    largest = (total - 1) // align * align
    smallest = math.ceil(granularity.minimum / align) * align
    count = max(min(requested, largest) // align * align, smallest)
    return count if count <= largest else None


def split_name(share: float) -> str:
    return f"ft-{share:.0%}"


def plan_splits(
    total_sms: int | None, shares: Sequence[float], granularity: SMGranularity | None
) -> tuple[SMSplit, ...]:
    """The menu: ``shared`` first, then one split per distinct rounded SM count, smallest first.

    Distinct, because two shares that round to the same count would be the same partition under two
    names and give the scheduler a choice that is no choice. Ordered by size so a controller can step
    up or down the list. Without a device (``total_sms``/``granularity`` ``None``) only ``shared``.
    """
    for share in shares:
        if not 0.0 < share < 1.0:
            raise ValueError(f"finetune SM shares must lie in (0, 1), got {share}")
    shared = SMSplit(name=SHARED, finetune_sms=None, total_sms=total_sms)
    if total_sms is None or granularity is None:
        return (shared,)
    by_count: dict[int, SMSplit] = {}
    for share in shares:
        count = round_sms(math.floor(share * total_sms), total_sms, granularity)
        if count is not None and count not in by_count:
            by_count[count] = SMSplit(name=split_name(share), finetune_sms=count, total_sms=total_sms)
    return (shared, *(by_count[c] for c in sorted(by_count)))


class Partitioner(ABC):
    """Runs finetune work inside the split the scheduler picked for this step."""

    splits: tuple[SMSplit, ...]
    """The menu; ``splits[0]`` is always ``shared``."""
    device: torch.device

    @property
    @abstractmethod
    def available(self) -> bool:
        """Whether any split other than ``shared`` really fences finetune."""

    @property
    @abstractmethod
    def reason(self) -> str | None:
        """Why partitions are unavailable, for ``/harli/stats``; ``None`` while they work."""

    @abstractmethod
    def finetune(self, split: SMSplit) -> contextlib.AbstractContextManager[None]:
        """Enter to launch finetune kernels inside ``split``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able state for ``/harli/stats``."""

    @property
    def shared(self) -> SMSplit:
        return self.splits[0]

    def split(self, name: str) -> SMSplit:
        """Look a split up by the name ``/harli/stats`` and logs show."""
        for split in self.splits:
            if split.name == name:
                return split
        raise KeyError(f"no split named {name!r}; menu: {[s.name for s in self.splits]}")

    def prepare(self) -> None:
        """Build every partition now, so the first decode step that picks one does not pay for it."""
        return None

    def _check(self, split: SMSplit) -> None:
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not on this partitioner's menu {self.splits!r}")

    def _describe_splits(self) -> list[dict[str, Any]]:
        return [{**msgspec.structs.asdict(s), "share": s.share} for s in self.splits]


class SharedPartitioner(Partitioner):
    """No partitions: finetune shares the whole device with decode, as it would without Harli."""

    def __init__(self, device: torch.device | str, reason: str, *, total_sms: int | None = None):
        self.device = torch.device(device)
        self._reason = reason
        self.total_sms = total_sms
        self.splits = plan_splits(total_sms, (), None)

    @property
    def available(self) -> bool:
        return False

    @property
    def reason(self) -> str | None:
        return self._reason

    def finetune(self, split: SMSplit) -> contextlib.AbstractContextManager[None]:
        self._check(split)
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "shared",
            "device": str(self.device),
            "available": False,
            "reason": self._reason,
            "total_sms": self.total_sms,
            "splits": self._describe_splits(),
        }


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


def _pick_backend() -> tuple[GreenContextBackend | None, str]:
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


def _query_granularity(device: torch.device) -> SMGranularity | None:
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


def make_partitioner(
    device: torch.device | str, *, shares: Sequence[float] = DEFAULT_SHARES, enabled: bool = True
) -> Partitioner:
    """Green-context partitions where the platform has them, the lone ``shared`` split elsewhere.

    Cheap: nothing is created on the GPU until a split is first used (or :meth:`Partitioner.prepare`).
    """
    plan_splits(None, shares, None)  # reject bad shares on every platform, not only on GPUs
    device = torch.device(device)
    if not enabled:
        return SharedPartitioner(device, "SM partitioning is disabled")
    if device.type != "cuda":
        return SharedPartitioner(device, f"SM partitions need a CUDA device, not {device.type}")
    if torch.version.hip is not None:
        return SharedPartitioner(device, "green contexts are NVIDIA-only; this torch is built for ROCm")
    if not torch.cuda.is_available():
        return SharedPartitioner(device, f"CUDA is not available to torch {torch.__version__}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    total = props.multi_processor_count
    try:
        granularity = _query_granularity(device) or sm_granularity(props.major, props.minor)
    except ValueError as exc:
        return SharedPartitioner(device, str(exc), total_sms=total)
    backend, why = _pick_backend()
    if backend is None:
        return SharedPartitioner(device, why, total_sms=total)
    return GreenContextPartitioner(
        device, total_sms=total, granularity=granularity, backend=backend, shares=shares
    )
