"""Fast copies of packed records between a sequence's pages and a contiguous buffer.

``PagedLatentCache.export_layer/import_layer`` index row by row (about 0.4 GB/s on CPU for
1,152-byte rows). Tokens of a sequence sit in runs of consecutive slots (a page, or several
pages the allocator handed out in order), so copying run by run moves the same bytes at memcpy
speed. Same results as export_layer/import_layer; used by the transfer on both sides.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from model.kv_cache import PagedLatentCache


def slot_runs(
    block_table: Sequence[int], page_size: int, start: int, end: int
) -> list[tuple[int, int, int]]:
    """Tokens [start, end) as maximal runs of consecutive cache slots: (slot, token, length)."""
    if end > len(block_table) * page_size:
        raise IndexError(
            f"tokens [{start}, {end}) exceed the {len(block_table) * page_size}-token reservation"
        )
    runs: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        page, offset = divmod(pos, page_size)
        n = min(page_size - offset, end - pos)
        slot = block_table[page] * page_size + offset
        if runs and runs[-1][0] + runs[-1][2] == slot:
            s, t, m = runs[-1]
            runs[-1] = (s, t, m + n)
        else:
            runs.append((slot, pos, n))
        pos += n
    return runs


def export_records(
    cache: PagedLatentCache, seq_id: Hashable, layer: int, start: int, end: int
) -> torch.Tensor:
    """= ``cache.export_layer(seq_id, layer, start, end)``: uint8 [end - start, bytes_per_token]."""
    flat = cache.pages[layer].view(-1, cache.bytes_per_token)
    table = cache.allocator.block_table(seq_id)
    runs = slot_runs(table, cache.page_size, start, end)
    if len(runs) == 1:
        slot, _, n = runs[0]
        return flat[slot : slot + n].clone()
    out = torch.empty(end - start, cache.bytes_per_token, dtype=torch.uint8, device=flat.device)
    for slot, pos, n in runs:
        out[pos - start : pos - start + n].copy_(flat[slot : slot + n])
    return out


def import_records(
    cache: PagedLatentCache,
    block_table: Sequence[int],
    layer: int,
    start: int,
    records: torch.Tensor,
) -> None:
    """= ``cache.import_layer``: records uint8 [n, bytes_per_token] into tokens [start, start+n)."""
    flat = cache.pages[layer].view(-1, cache.bytes_per_token)
    assert records.dtype == torch.uint8 and records.shape[1:] == (cache.bytes_per_token,), (
        f"records must be uint8 [n, {cache.bytes_per_token}], got {records.dtype} {tuple(records.shape)}"
    )
    for slot, pos, n in slot_runs(block_table, cache.page_size, start, start + records.shape[0]):
        flat[slot : slot + n].copy_(records[pos - start : pos - start + n], non_blocking=True)
