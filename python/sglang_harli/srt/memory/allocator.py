"""``LendingAllocator``: SGLang's token-to-KV allocator, able to lend free KV pages and take them back.

On a decode instance the KV pool is most of the memory, and below peak load most of it is free. This
mixin lends runs of free pages to the trainer, whose activations live in their bytes
(``core.training.memory``), and takes them back the moment decode needs them. It is installed on the *live*
allocator instance by swapping its class (``install_lending``), because the model runner, the tree cache,
every batch and the pool-stats observer already hold that instance.

Lent pages are simply absent from the free list, so admission, retraction and allocation never see
them, and nothing else about the allocator changes. ``reclaim`` first tells the borrower (which spills
or drops what it keeps there) and then frees the pages as SGLang frees any page. Every path by which
decode can run short of pages reclaims before reporting a shortage: the decode capacity check, cache
eviction for an allocation, the allocations themselves, and ``clear`` (``/flush_cache``).

SGLang's idle leak check counts every token of the pool; ``LendingInvariantChecker`` tells it about
the lent ones, so lending never reads as a leak and a lost page still does.

Pages only, never token ids: for the token allocator a page is one token, for the paged allocator
``page_size`` tokens, and a lent run of pages ``[p, q)`` is KV rows ``[p * page_size, q * page_size)``
of every layer's K and V buffers, one contiguous byte range each (``lent_regions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

logger = logging.getLogger(__name__)

POISON = 0xFF  # every byte: NaN in fp32/bf16/fp16, so a row read before it is written shows up
_LENDABLE = (TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator)


class LendingAllocator(BaseTokenToKVPoolAllocator):
    """Mixin over ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` (see ``install_lending``).

    It derives from their common base, adding no slots, only so that the live instance's class can be
    swapped: CPython allows that only between classes of one memory layout.
    """

    __slots__ = ()
    # Set by install_lending(); class-level defaults keep the mixin's attributes in one place.
    on_reclaim: Callable[[], None] | None = None
    poison: bool = False

    def _lending_init(self) -> None:
        self.lent_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.reclaims = 0
        self.reclaim_seconds = 0.0
        self.last_reclaim_s = 0.0
        self.poison_violations = 0
        self.lent_allocations = 0  # with poison: allocations that returned a lent page (must stay 0)
        self._lent_runs: list[tuple[int, int]] = []

    # -- lending -------------------------------------------------------------------------------------
    @property
    def lent_tokens(self) -> int:
        return int(self.lent_pages.numel()) * self.page_size

    def lend(self, num_tokens: int, tree_cache=None) -> list[tuple[int, int]]:
        """Take about ``num_tokens`` of free pages, in as few contiguous runs as possible, preferring the
        highest ids (allocation takes from the front); returns the runs lent now as ``(first, end)``
        page ids. With ``tree_cache``, prefix-cache entries are
        evicted first if free pages are short, as an allocation would. Never inside a free group, where
        frees are still pending."""
        assert self.free_group is None, "lending inside a free group"
        pages_wanted = -(-num_tokens // self.page_size)
        if pages_wanted <= 0:
            return []
        if tree_cache is not None and self.available_size() < num_tokens:
            super().evict_to_free_tokens(tree_cache, num_tokens)  # SGLang's eviction, not our reclaim
        self.merge_and_sort_free()  # staged/released pages join the free list
        free = torch.sort(self.get_all_free_pages().cpu()).values  # a new tensor: never edit in place
        if free.numel() == 0:
            return []
        breaks = torch.nonzero(free[1:] != free[:-1] + 1).flatten() + 1
        starts = torch.cat((torch.tensor([0]), breaks)).tolist()
        ends = [*breaks.tolist(), free.numel()]
        runs = sorted(zip(starts, ends, strict=True), key=lambda r: (r[1] - r[0], r[0]), reverse=True)
        taken, chosen = 0, []
        for start, end in runs:
            if taken >= pages_wanted:
                break
            count = min(end - start, pages_wanted - taken)
            chosen.append((int(free[end - count]), int(free[end - 1]) + 1))  # the top of the run
            taken += count
        if not chosen:
            return []
        lent = torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in chosen])
        keep = free[~torch.isin(free, lent)].to(self.device)
        self._set_free_pages(keep)
        self.lent_pages = torch.cat((self.lent_pages, lent.to(self.device)))
        self._lent_runs.extend(chosen)
        if self.poison:
            for region in self.lent_regions(chosen):
                region.fill_(POISON)
        return chosen

    def reclaim(self) -> int:
        """Take every lent page back: the borrower lets go first, then the pages are free again."""
        if self.lent_pages.numel() == 0:
            return 0
        started = time.perf_counter()
        if self.on_reclaim is not None:
            self.on_reclaim()
        tokens = self.lent_tokens
        if self.poison:
            for region in self.lent_regions(self._lent_runs):
                region.fill_(POISON)
        pages, self.lent_pages, self._lent_runs = self.lent_pages, self.lent_pages[:0], []
        free_group, self.free_group = self.free_group, None  # reclaim may run inside one: free now
        try:
            self.free_page_ids(pages)
        finally:
            self.free_group = free_group
        self.reclaims += 1
        self.last_reclaim_s = time.perf_counter() - started
        self.reclaim_seconds += self.last_reclaim_s
        return tokens

    def lent_regions(self, runs: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """The lent KV rows as raw bytes: one contiguous ``uint8`` range per run, layer and K/V buffer."""
        kvcache = self.get_kvcache()
        regions = []
        for first, end in self._lent_runs if runs is None else runs:
            rows = slice(first * self.page_size, end * self.page_size)
            for buffers in (kvcache.k_buffer, kvcache.v_buffer):
                for buffer in buffers:
                    regions.append(buffer[rows].reshape(-1).view(torch.uint8))
        return regions

    def check_poison(self, untouched: list[tuple[int, int]]) -> int:
        """With ``poison`` on: the byte range ``untouched[i]`` of lent region ``i``, which the borrower
        never wrote, must still hold the pattern; anything else means someone else wrote lent rows."""
        bad = 0
        for region, (start, end) in zip(self.lent_regions(), untouched, strict=True):
            bad += int((region[start:end] != POISON).sum())
        if bad:
            self.poison_violations += 1
            logger.error("lent KV pages were written by someone other than the trainer (%d bytes)", bad)
        return bad

    def _set_free_pages(self, pages: torch.Tensor) -> None:
        self.free_pages = pages
        if isinstance(self, PagedTokenToKVPoolAllocator):
            self.staged_pages, self.num_staged_pages = [], 0
        else:
            self.release_pages = self.release_pages[:0]

    # -- every way decode can run short reclaims first ----------------------------------------------
    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None):
        fits = super().check_decode_capacity(
            num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, spec_algorithm=spec_algorithm
        )
        if not fits and self.reclaim():
            fits = super().check_decode_capacity(
                num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, spec_algorithm=spec_algorithm
            )
        return fits

    def evict_to_free_tokens(self, tree_cache, num_tokens: int):
        if self.available_size() < num_tokens:
            self.reclaim()
        return super().evict_to_free_tokens(tree_cache, num_tokens)

    def alloc(self, need_size: int):
        out = super().alloc(need_size)
        if out is None and self.reclaim():
            out = super().alloc(need_size)
        return self._checked(out)

    def alloc_extend(self, *args, **kwargs):
        out = super().alloc_extend(*args, **kwargs)
        if out is None and self.reclaim():
            out = super().alloc_extend(*args, **kwargs)
        return self._checked(out)

    def alloc_decode(self, *args, **kwargs):
        out = super().alloc_decode(*args, **kwargs)
        if out is None and self.reclaim():
            out = super().alloc_decode(*args, **kwargs)
        return self._checked(out)

    def _checked(self, out):
        """With ``poison`` on: no allocation (a request's KV, a PD transfer's target) gets a lent page."""
        if self.poison and out is not None and self.lent_pages.numel():
            pages = torch.unique(out // self.page_size)
            if bool(torch.isin(pages, self.lent_pages).any()):
                self.lent_allocations += 1
                logger.error("an allocation returned KV pages that are lent to the trainer")
        return out

    def clear(self):
        if getattr(self, "lent_pages", None) is not None and self.lent_pages.numel():
            if self.on_reclaim is not None:
                self.on_reclaim()
            self.lent_pages, self._lent_runs = self.lent_pages[:0], []
        super().clear()


def lending_unsupported(allocator) -> str | None:
    """Why lending cannot work on this allocator, or ``None`` when it can."""
    if not isinstance(allocator, _LENDABLE):
        return f"{type(allocator).__name__} is not SGLang's token or paged allocator"
    kvcache = allocator.get_kvcache()
    buffers = [*(getattr(kvcache, "k_buffer", None) or ()), *(getattr(kvcache, "v_buffer", None) or ())]
    if not buffers:
        return f"{type(kvcache).__name__} has no per-layer K/V buffers"
    if not all(b.is_contiguous() and b.shape[0] >= allocator.size + allocator.page_size for b in buffers):
        return "the K/V buffers are not contiguous rows of the pool"
    return None


def install_lending(allocator, *, on_reclaim: Callable[[], None] | None = None, poison: bool = False):
    """Turn the live ``allocator`` into a ``LendingAllocator`` in place; returns it."""
    if isinstance(allocator, LendingAllocator):
        return allocator
    reason = lending_unsupported(allocator)
    if reason:
        raise TypeError(f"KV lending is not possible: {reason}")
    base = type(allocator)
    allocator.__class__ = type(f"Lending{base.__name__}", (LendingAllocator, base), {"__slots__": ()})
    allocator._lending_init()
    allocator.on_reclaim, allocator.poison = on_reclaim, poison
    return allocator


class LendingInvariantChecker(SchedulerInvariantChecker):
    """SGLang's pool invariant check, with lent tokens counted as held (by the trainer)."""

    __slots__ = ()

    def _check_full_pool(self, ps, uncached: int = 0):
        lent = getattr(self.token_to_kv_pool_allocator, "lent_tokens", 0)
        return super()._check_full_pool(ps, uncached + lent)
