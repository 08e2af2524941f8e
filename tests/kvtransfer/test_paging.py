"""Run-by-run page copies give exactly the records at the sequence's slots, on scattered pages."""

from __future__ import annotations

import torch
from kvt_helpers import fill, make_cache

from kvtransfer import export_records, import_records
from kvtransfer.paging import slot_runs


def _gather(cache, seq_id, layer: int, start: int, end: int) -> torch.Tensor:
    """The reference: index every token's slot one by one."""
    flat = cache.pages[layer].view(-1, cache.bytes_per_token)
    return flat[cache.slots(seq_id, start, end)]


def test_slot_runs_merge_consecutive_pages() -> None:
    assert slot_runs([4, 5, 9], 16, 3, 40) == [(67, 3, 29), (144, 32, 8)]
    assert slot_runs([2], 16, 5, 6) == [(37, 5, 1)]


def test_export_and_import_match_the_cache_on_fragmented_pages() -> None:
    cache = make_cache("bf16", num_pages=64)
    for i in range(6):  # interleave sequences so each one's pages are scattered
        cache.allocator.allocate(f"pad{i}", 20)
        if i % 2:
            cache.allocator.free(f"pad{i - 1}")
    fill(cache, "s", 150, seed=5)
    for start, end in [(0, 150), (0, 1), (17, 18), (15, 97), (149, 150)]:
        for layer in range(cache.num_layers):
            assert torch.equal(
                export_records(cache, "s", layer, start, end),
                _gather(cache, "s", layer, start, end),
            )
    records = torch.randint(0, 255, (83, cache.bytes_per_token), dtype=torch.uint8)
    import_records(cache, cache.allocator.block_table("s"), 1, 40, records)
    assert torch.equal(_gather(cache, "s", 1, 40, 123), records)
