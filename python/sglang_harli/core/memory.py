"""``ActivationStore``: the trainer's saved activations, placed in memory decode lends and takes back.

On a decode instance most memory is the KV cache, and most of it is free below peak load. The store takes
byte regions lent out of that memory (``lend``) and, through autograd's saved-tensor hooks, copies every
activation a forward saves into them; what does not fit stays in ordinary memory, within a budget (the
trainer's own memory). Frozen weights that autograd saves (a linear layer keeps its weight) are never
copied: they already live in the served model.

Decode can want its memory back at any moment. ``reclaim`` returns every region at once: first the
activations still held in them are either spilled to ordinary memory or, when the caller prefers, left to
be dropped with the micro-batch that saved them (the trainer replays it exactly). Regions are filled from
the front like a bump allocator and emptied when the micro-batch that filled them ends, because a
micro-batch's saved tensors all die together when its backward finishes.

The store knows nothing about the engine: regions are plain ``uint8`` tensors, so the same code runs on
the KV pages of SGLang's pool, on a GPU benchmark's buffers and in tests.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import msgspec
import torch

ALIGN = 64  # bytes; keeps every placed tensor aligned for vectorised kernels
MIN_PLACED_BYTES = 4096  # smaller tensors are not worth a copy


class TrainerMemoryError(MemoryError):
    """The activations of one micro-batch need more than the trainer may hold in ordinary memory."""


class MemoryStats(msgspec.Struct, kw_only=True):
    lent_bytes: int
    """Capacity of the regions currently lent."""
    placed_bytes: int
    """Bytes of saved activations living in lent regions now."""
    ordinary_bytes: int
    """Bytes of saved activations in ordinary memory now (counted against the budget)."""
    peak_ordinary_bytes: int
    placed_total: int
    """Activations ever copied into lent regions."""
    spilled_bytes: int
    """Bytes moved back to ordinary memory by reclaims."""
    reclaims: int
    budget_bytes: int | None
    last_micro_batch_bytes: int
    """Everything the latest micro-batch saved for backward (lent and ordinary): what lending must cover."""
    last_largest_bytes: int
    """Its largest saved tensor: a lent region smaller than this cannot hold it."""


class _Placed:
    """A saved activation living in a lent region, or spilled back out of one."""

    __slots__ = ("region", "offset", "dtype", "shape", "spilled")

    def __init__(self, region: int, offset: int, dtype: torch.dtype, shape: torch.Size):
        self.region, self.offset, self.dtype, self.shape = region, offset, dtype, shape
        self.spilled: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class ActivationStore:
    def __init__(self, *, budget_bytes: int | None = None, keep: Iterable[torch.Tensor] = ()):
        self.budget_bytes = budget_bytes
        self._kept: set[int] = set()
        self.keep(keep)
        self._regions: list[torch.Tensor] = []
        self._fill: list[int] = []
        self._high: list[int] = []  # per region, the most of it ever filled since it was lent
        self._mb_bytes = self._mb_largest = 0
        self._last_bytes = self._last_largest = 0
        self._placed: list[_Placed] = []  # this micro-batch's, in order
        self._ordinary = 0
        self._peak_ordinary = 0
        self._placed_total = 0
        self._spilled = 0
        self._reclaims = 0

    def keep(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors autograd may save that must stay where they are (weights: frozen or updated in place)."""
        self._kept.update(t.untyped_storage().data_ptr() for t in tensors)

    # -- regions -------------------------------------------------------------------------------------
    @property
    def lent_bytes(self) -> int:
        return sum(r.numel() for r in self._regions)

    @property
    def high_water(self) -> list[int]:
        """Per lent region, how many leading bytes the store has written since it was lent."""
        return list(self._high)

    @property
    def demand(self) -> tuple[int, int]:
        """(bytes, largest tensor bytes) the latest finished micro-batch saved for its backward."""
        return self._last_bytes, self._last_largest

    def lend(self, regions: Iterable[torch.Tensor]) -> None:
        for region in regions:
            if region.dtype != torch.uint8 or region.dim() != 1 or not region.is_contiguous():
                raise ValueError("a lent region must be a contiguous 1-D uint8 tensor")
            self._regions.append(region)
            self._fill.append(0)
            self._high.append(0)

    def reclaim(self, *, spill: bool = True) -> list[torch.Tensor]:
        """Give every region back now. With ``spill``, activations in them move to ordinary memory (the
        budget permitting) so the micro-batch in flight goes on; without, the caller drops that
        micro-batch. Either way nothing refers to the returned regions afterwards."""
        live = [p for p in self._placed if p.spilled is None]
        if spill:
            need = sum(p.nbytes for p in live)
            self._charge(need, "spilling the micro-batch in flight")
            for placed in live:
                placed.spilled = self._view(placed).clone()
                self._spilled += placed.nbytes
        else:
            self._placed = []
        regions, self._regions, self._fill, self._high = self._regions, [], [], []
        self._reclaims += 1
        return regions

    def micro_batch_done(self) -> None:
        """Its saved tensors are gone with its graph (finished or dropped): refill regions from the front."""
        self._ordinary -= sum(p.nbytes for p in self._placed if p.spilled is not None)
        for placed in self._placed:
            placed.spilled = None
        self._placed = []
        self._fill = [0] * len(self._regions)
        if self._mb_bytes:
            self._last_bytes, self._last_largest = self._mb_bytes, self._mb_largest
        self._mb_bytes = self._mb_largest = 0

    # -- saved-tensor hooks ----------------------------------------------------------------------------
    @property
    def hooks(self):
        return self.pack, self.unpack

    def pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().data_ptr() in self._kept or nbytes < MIN_PLACED_BYTES:
            return tensor
        self._mb_bytes += nbytes
        self._mb_largest = max(self._mb_largest, nbytes)
        slot = self._find_room(nbytes, tensor.device)
        if slot is None:
            self._charge(nbytes, "this micro-batch's activations")
            weakref.finalize(tensor, self._release_ordinary, nbytes)
            return tensor
        region, offset = slot
        placed = _Placed(region, offset, tensor.dtype, tensor.shape)
        self._view(placed).copy_(tensor)
        self._placed.append(placed)
        self._placed_total += 1
        return placed

    def unpack(self, packed) -> torch.Tensor:
        if not isinstance(packed, _Placed):
            return packed
        return packed.spilled if packed.spilled is not None else self._view(packed)

    # -- internals -------------------------------------------------------------------------------------
    def _find_room(self, nbytes: int, device: torch.device) -> tuple[int, int] | None:
        for index, region in enumerate(self._regions):
            if region.device != device:
                continue
            offset = -(-self._fill[index] // ALIGN) * ALIGN
            if offset + nbytes <= region.numel():
                self._fill[index] = offset + nbytes
                self._high[index] = max(self._high[index], offset + nbytes)
                return index, offset
        return None

    def _view(self, placed: _Placed) -> torch.Tensor:
        raw = self._regions[placed.region][placed.offset : placed.offset + placed.nbytes]
        return raw.view(placed.dtype).view(placed.shape)

    def _charge(self, nbytes: int, what: str) -> None:
        if self.budget_bytes is not None and self._ordinary + nbytes > self.budget_bytes:
            raise TrainerMemoryError(
                f"{what} need {(self._ordinary + nbytes) / 2**20:.1f} MiB of ordinary memory, over the "
                f"trainer budget of {self.budget_bytes / 2**20:.1f} MiB (--harli-trainer-memory-mb); lend "
                "it KV pages, or raise the budget, or use a smaller micro_batch_size or max_seq_len"
            )
        self._ordinary += nbytes
        self._peak_ordinary = max(self._peak_ordinary, self._ordinary)

    def _release_ordinary(self, nbytes: int) -> None:
        self._ordinary -= nbytes

    def stats(self) -> MemoryStats:
        return MemoryStats(
            lent_bytes=self.lent_bytes,
            placed_bytes=sum(p.nbytes for p in self._placed if p.spilled is None),
            ordinary_bytes=self._ordinary,
            peak_ordinary_bytes=self._peak_ordinary,
            placed_total=self._placed_total,
            spilled_bytes=self._spilled,
            reclaims=self._reclaims,
            budget_bytes=self.budget_bytes,
            last_micro_batch_bytes=self._last_bytes,
            last_largest_bytes=self._last_largest,
        )
