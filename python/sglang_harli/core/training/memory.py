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
micro-batch's saved tensors all die together when its backward finishes; for the same reason the budget
counts a micro-batch's ordinary bytes until it ends. A tensor saved more than once (one input feeding
several LoRA branches) is placed, or counted, once.

The LoRA gradient buffers, which live across the micro-batches of an optimizer step, take the back of the
regions (``place_grads``): backward accumulates into them in place. A reclaim always moves them out whole,
since accumulated gradients cannot be recomputed without replaying the step.

The store knows nothing about the engine: regions are plain ``uint8`` tensors, so the same code runs on
the KV pages of SGLang's pool, on a GPU benchmark's buffers and in tests.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

from sglang_harli.core.wire.memory import MemoryStats

ALIGN = 64  # bytes; keeps every placed tensor aligned for vectorised kernels
MIN_PLACED_BYTES = 4096  # smaller tensors are not worth a copy
CONTIGUOUS_LOOKAHEAD = 16  # regions searched for room to place a tensor whole before splitting it


class TrainerMemoryError(MemoryError):
    """The activations of one micro-batch need more than the trainer may hold in ordinary memory."""


class _Placed:
    """A saved activation living in lent regions, or spilled back out of them.

    Its bytes are one piece when a region had room for all of them (unpacked as a view, no copy), or
    several pieces across regions when none had: KV pages freed by decode are scattered, so lent runs
    may be short, and a large tensor is then gathered back when backward needs it.
    """

    __slots__ = ("pieces", "dtype", "shape", "spilled")

    def __init__(self, pieces: list[tuple[int, int, int]], dtype: torch.dtype, shape: torch.Size):
        self.pieces = pieces  # (region, offset, bytes)
        self.dtype, self.shape = dtype, shape
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
        self._top: list[int] = []  # per region, where the gradient buffers at its end begin
        self._top_low: list[int] = []  # the lowest that has been since it was lent
        self._grads: list[torch.nn.Parameter] = []  # parameters whose .grad lives in a region
        self._cursor = 0  # regions before it are full
        self._mb_bytes = self._mb_largest = 0
        self._last_bytes = self._last_largest = 0
        self._placed: list[_Placed] = []  # this micro-batch's, in order
        self._ordinary = 0  # this micro-batch's saved bytes outside lent regions, spilled ones included
        self._peak_ordinary = 0
        self._seen: dict[int, tuple[weakref.ref, object]] = {}  # id(tensor) -> (tensor, what pack gave)
        self._placed_total = 0
        self._spilled = 0
        self._grads_moved = 0
        self._reclaims = 0

    def keep(self, tensors: Iterable[torch.Tensor]) -> None:
        """Tensors autograd may save that must stay where they are (weights: frozen or updated in place)."""
        self._kept.update(t.untyped_storage().data_ptr() for t in tensors)

    # -- regions -------------------------------------------------------------------------------------
    @property
    def lent_bytes(self) -> int:
        return sum(r.numel() for r in self._regions)

    @property
    def untouched(self) -> list[tuple[int, int]]:
        """Per lent region, the byte range the store has never written since it was lent: activations
        fill regions from the front, gradient buffers from the back."""
        return list(zip(self._high, self._top_low, strict=True))

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
            self._top.append(region.numel())
            self._top_low.append(region.numel())

    def reclaim(self, *, spill: bool = True) -> list[torch.Tensor]:
        """Give every region back now. With ``spill``, activations in them move to ordinary memory (the
        budget permitting) so the micro-batch in flight goes on; without, the caller drops that
        micro-batch. Either way nothing refers to the returned regions afterwards."""
        for param in self._grads:  # accumulated gradients are never dropped: they move out whole
            if param.grad is not None and self._in_regions(param.grad):
                param.grad = param.grad.clone()
                self._grads_moved += param.grad.numel() * param.grad.element_size()
        self._grads = []
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
        self._top, self._top_low = [], []
        self._cursor = 0
        self._reclaims += 1
        return regions

    def micro_batch_done(self) -> None:
        """Its saved tensors are gone with its graph (finished or dropped): refill regions from the front."""
        self._ordinary = 0  # everything it saved, placed, spilled or ordinary, died with its graph
        self._seen.clear()
        for placed in self._placed:
            placed.spilled = None
        self._placed = []
        self._fill = [0] * len(self._regions)
        self._cursor = 0
        if self._grads and all(p.grad is None for p in self._grads):  # the optimizer step freed them
            self._release_grads()
        if self._mb_bytes:
            self._last_bytes, self._last_largest = self._mb_bytes, self._mb_largest
        self._mb_bytes = self._mb_largest = 0

    # -- gradient buffers ----------------------------------------------------------------------------
    def place_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Give ``params`` zeroed gradient buffers at the back of the lent regions, where backward then
        accumulates in place across the micro-batches of a step; a parameter they cannot hold keeps
        autograd's own. The trainer calls this when a step's first backward starts."""
        self._release_grads()
        for param in params:
            nbytes = param.numel() * param.element_size()
            for index in reversed(range(len(self._regions))):
                region = self._regions[index]
                offset = (self._top[index] - nbytes) // ALIGN * ALIGN
                if region.device == param.device and offset >= self._fill[index]:
                    self._top[index] = offset
                    self._top_low[index] = min(self._top_low[index], offset)
                    raw = region[offset : offset + nbytes]
                    param.grad = raw.view(param.dtype).view(param.shape).zero_()
                    self._grads.append(param)
                    break

    def _release_grads(self) -> None:
        self._grads = []
        self._top = [r.numel() for r in self._regions]

    def _in_regions(self, tensor: torch.Tensor) -> bool:
        pointer = tensor.data_ptr()
        return any(r.data_ptr() <= pointer < r.data_ptr() + r.numel() for r in self._regions)

    # -- saved-tensor hooks ----------------------------------------------------------------------------
    @property
    def hooks(self):
        return self.pack, self.unpack

    def pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().data_ptr() in self._kept or nbytes < MIN_PLACED_BYTES:
            return tensor
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor:  # saved again (one input, several LoRA branches)
            return seen[1]
        self._mb_bytes += nbytes
        self._mb_largest = max(self._mb_largest, nbytes)
        pieces = self._find_room(nbytes, tensor.device)
        if pieces is None:
            self._charge(nbytes, "this micro-batch's activations")
            packed = tensor.detach()  # an alias without grad_fn: no reference cycle through the graph
        else:
            packed = _Placed(pieces, tensor.dtype, tensor.shape)
            if len(pieces) == 1:
                self._view(packed).copy_(tensor)
            else:
                raw, start = tensor.detach().contiguous().reshape(-1).view(torch.uint8), 0
                for region, offset, length in pieces:
                    self._regions[region][offset : offset + length].copy_(raw[start : start + length])
                    start += length
            self._placed.append(packed)
            self._placed_total += 1
        self._seen[id(tensor)] = (weakref.ref(tensor), packed)
        return packed

    def unpack(self, packed) -> torch.Tensor:
        if not isinstance(packed, _Placed):
            return packed
        return packed.spilled if packed.spilled is not None else self._view(packed)

    # -- internals -------------------------------------------------------------------------------------
    def _find_room(self, nbytes: int, device: torch.device) -> list[tuple[int, int, int]] | None:
        """Room in one region if one of the next few has it, else pieces over the free tails in order.

        Regions before ``_cursor`` are full; a loan made of scattered KV pages may be thousands of short
        regions, so neither search looks at more of them than it needs."""
        regions, fill = self._regions, self._fill
        while self._cursor < len(regions) and self._top[self._cursor] - fill[self._cursor] < ALIGN:
            self._cursor += 1
        tails, left = [], nbytes
        for index in range(self._cursor, len(regions)):
            if regions[index].device != device:
                continue
            offset = -(-fill[index] // ALIGN) * ALIGN
            room = self._top[index] - offset
            if room >= nbytes and index < self._cursor + CONTIGUOUS_LOOKAHEAD:
                return self._take([(index, offset, nbytes)])
            if room > 0 and left > 0:
                tails.append((index, offset, min(room, left)))
                left -= tails[-1][2]
            if left == 0 and index >= self._cursor + CONTIGUOUS_LOOKAHEAD:
                break
        return self._take(tails) if left == 0 else None

    def _take(self, pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        for index, offset, length in pieces:
            self._fill[index] = offset + length
            self._high[index] = max(self._high[index], offset + length)
        return pieces

    def _view(self, placed: _Placed) -> torch.Tensor:
        """The tensor in its region (a view), or gathered from its pieces (a copy)."""
        raws = [self._regions[r][offset : offset + length] for r, offset, length in placed.pieces]
        raw = raws[0] if len(raws) == 1 else torch.cat(raws)
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
            grad_bytes=sum(p.grad.numel() * p.grad.element_size() for p in self._grads if p.grad is not None),
            grads_moved_bytes=self._grads_moved,
        )


class TrainerMemory:
    """A trainer's memory with no pages lent to it (``core.runner.host.Lending``): its saved activations in
    ordinary memory, held to the trainer budget (``--harli-trainer-memory-mb``) when there is one. A
    micro-batch that needs more fails its job with ``TrainerMemoryError``, naming the budget; nothing is
    replayed, since no larger loan could come. ``srt.memory.lending.KvLending`` is this plus the KV pages
    decode lends."""

    place_grads = None  # gradient buffers live in ordinary memory

    def __init__(self, store: ActivationStore):
        self.store = store
        self.trainer = None

    @property
    def hooks(self):
        """The trainer's saved-tensor hooks; none without a budget to keep (nothing to place or count)."""
        return self.store.hooks if self.store.budget_bytes is not None else None

    def attach(self, trainer) -> None:
        self.trainer = trainer
        self.store.keep(trainer.params)

    def detach(self) -> None:
        """The job ended: its micro-batch in flight, if any, is dropped."""
        if self.trainer is not None:
            self.trainer.abort_micro_batch()
        self.trainer = None
        self.store.micro_batch_done()

    def prepare(self, tokens: int) -> bool:
        return True

    def out_of_memory(self) -> bool:
        return False

    def micro_batch_done(self, tokens: int) -> None:
        self.store.micro_batch_done()
