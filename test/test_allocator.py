"""The lending mixin on SGLang's own token and paged allocators, over a real ``MHATokenToKVPool``."""

import pytest
import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from sglang_harli.srt.memory.allocator import POISON, LendingAllocator, install_lending

SIZE, LAYERS, HEADS, HEAD_DIM = 256, 3, 2, 8


def make(page_size: int, **kwargs) -> LendingAllocator:
    kv = MHATokenToKVPool(SIZE, page_size, torch.float32, HEADS, HEAD_DIM, LAYERS, "cpu", False)
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(SIZE, torch.float32, "cpu", kv, False)
    else:
        allocator = PagedTokenToKVPoolAllocator(SIZE, page_size, torch.float32, "cpu", kv, False)
    return install_lending(allocator, **kwargs)


def free_tokens(allocator) -> set[int]:
    pages = allocator.get_all_free_pages().tolist()
    return {p * allocator.page_size + i for p in pages for i in range(allocator.page_size)}


@pytest.fixture(params=[1, 4], ids=["token", "paged"])
def page_size(request):
    return request.param


def test_lent_pages_are_contiguous_top_runs_and_invisible_to_allocation(page_size):
    allocator = make(page_size)
    assert type(allocator).__name__.startswith("Lending")
    total = allocator.available_size()
    runs = allocator.lend(40)
    lent = allocator.lent_tokens
    assert lent >= 40 and lent % page_size == 0
    assert allocator.available_size() == total - lent
    assert len(runs) == 1 and runs[0][1] == SIZE // page_size + 1  # the highest pages, in one run
    lent_ids = set(range(runs[0][0] * page_size, runs[0][1] * page_size))
    assert not lent_ids & free_tokens(allocator)
    handed_out = allocator.alloc(allocator.available_size())
    assert handed_out is not None and not lent_ids & set(handed_out.tolist())
    assert allocator.alloc(page_size) is not None  # the shortage reclaims instead of failing
    assert allocator.lent_tokens == 0 and allocator.reclaims == 1


def test_runs_follow_fragmented_free_lists_and_come_back_whole(page_size):
    allocator = make(page_size)
    held = allocator.alloc(SIZE // 2 // page_size * page_size)
    allocator.free(held[page_size * 2 : page_size * 6])  # a hole low in the pool
    before = free_tokens(allocator)
    runs = allocator.lend(allocator.available_size())
    assert sum(b - a for a, b in runs) * page_size == allocator.lent_tokens == len(before)
    assert len(runs) == 2
    assert allocator.available_size() == 0
    allocator.reclaim()
    assert free_tokens(allocator) == before


def test_regions_are_the_kv_rows_of_every_layer_and_poison_shows_who_wrote(page_size):
    events = []
    allocator = make(page_size, on_reclaim=lambda: events.append(allocator.lent_tokens), poison=True)
    (first, end), *_ = allocator.lend(32)
    regions = allocator.lent_regions()
    kv = allocator.get_kvcache()
    assert len(regions) == 2 * LAYERS
    row_bytes = HEADS * HEAD_DIM * 4
    assert all(r.numel() == (end - first) * page_size * row_bytes for r in regions)
    assert torch.isnan(kv.k_buffer[1][first * page_size : end * page_size]).all()  # poisoned: 0xFF..
    regions[LAYERS + 1][:8] = 0  # the borrower writes the first 8 bytes of layer 1's V rows
    assert (kv.v_buffer[1][first * page_size].flatten().view(torch.uint8)[:8] == 0).all()
    untouched = [(0, r.numel()) for r in regions]
    untouched[LAYERS + 1] = (8, regions[LAYERS + 1].numel())
    assert allocator.check_poison(untouched) == 0
    kv.k_buffer[2][first * page_size, 0, 0] = 1.0  # someone else writes a lent row
    assert allocator.check_poison(untouched) == 4 and allocator.poison_violations == 1
    allocator.reclaim()
    assert events == [(end - first) * page_size]  # the borrower let go before the pages were freed
    assert (kv.v_buffer[1][first * page_size].view(torch.uint8) == POISON).all()  # poisoned for decode


def test_decode_capacity_and_cache_flush_take_the_loan_back(page_size):
    reclaimed = []
    allocator = make(page_size, on_reclaim=lambda: reclaimed.append(True))
    allocator.lend(allocator.available_size() - page_size)
    assert allocator.check_decode_capacity(num_tokens=8 * page_size, tree_cache=None)
    assert allocator.lent_tokens == 0 and reclaimed == [True]
    allocator.lend(64)
    allocator.clear()  # /flush_cache: nothing may be handed out twice
    assert allocator.lent_tokens == 0 and len(reclaimed) == 2
    assert len(free_tokens(allocator)) == SIZE


def test_only_sglang_kv_allocators_are_wrapped():
    with pytest.raises(TypeError, match="KV lending is not possible"):
        install_lending(object())
