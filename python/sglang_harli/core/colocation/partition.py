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
branch on the platform and ``/harli/stats`` can say why. This module holds the menu, the
:class:`Partitioner` interface and that fallback; the green contexts themselves live in ``green_contexts``.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import torch

from sglang_harli.core.colocation.work import SHARED

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
    numbers win when they are available, see :func:`.green_contexts.query_granularity`. CUDA 13.1's
    header no longer states the 4-SM minimum for 8.x; keeping it costs at most one tiny split and never
    a refused one.
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


def make_partitioner(
    device: torch.device | str, *, shares: Sequence[float] = DEFAULT_SHARES, enabled: bool = True
) -> Partitioner:
    """Green-context partitions where the platform has them, the lone ``shared`` split elsewhere.

    Cheap: nothing is created on the GPU until a split is first used (or :meth:`Partitioner.prepare`).
    """
    # Imported here, not at the top: the green-context backends build on this module's menu and ABC, so
    # importing them at module level would be circular.
    from sglang_harli.core.colocation.green_contexts import (
        GreenContextPartitioner,
        pick_backend,
        query_granularity,
    )

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
        granularity = query_granularity(device) or sm_granularity(props.major, props.minor)
    except ValueError as exc:
        return SharedPartitioner(device, str(exc), total_sms=total)
    backend, why = pick_backend()
    if backend is None:
        return SharedPartitioner(device, why, total_sms=total)
    return GreenContextPartitioner(
        device, total_sms=total, granularity=granularity, backend=backend, shares=shares
    )
