"""Mooncake-format traces as simulated requests (no token ids: lengths and block hashes).

A trace row holds ``timestamp`` (ms), ``input_length``, ``output_length`` and ``hash_ids``: one id
per 512-token block of the prompt, where equal ids in two rows mean the two prompts share that
block and every block before it. The scheduler hashes prompts in blocks of its own
``block_size``; scheduler block j (tokens [j*B, (j+1)*B)) gets the hash
``(hash_ids[k] << 20) | end_offset``, where k is the trace block holding the block's last token
and ``end_offset`` is where the block ends inside it. Two prompts then share exactly the
scheduler hashes of their common trace-block prefix, as real prompts built from the same blocks
do (``bench/trace.py`` builds such prompts; with ``length_scale`` 1/8 and B = 64 the two agree
block for block). Blocks past the last hash id are unique to the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces
_OFFSET_BITS = 20


@dataclass(frozen=True)
class TraceRow:
    """One request of the trace, as recorded."""

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class TraceScale:
    """How a trace is reshaped: ``rate_scale`` 2.0 replays it twice as fast; ``length_scale``
    multiplies prompt lengths (and the 512-token block of a hash id), ``output_scale`` output
    lengths; prompts are capped at ``max_input`` and outputs clipped to [min, max]."""

    rate_scale: float = 1.0
    length_scale: float = 1.0
    output_scale: float = 1.0
    max_input: int | None = None
    min_output: int = 1
    max_output: int | None = None

    @property
    def block_tokens(self) -> int:
        return max(1, round(TRACE_BLOCK_TOKENS * self.length_scale))


@dataclass(frozen=True)
class SimRequest:
    """One request to replay: arrival (s after the first row), sizes, scheduler block hashes."""

    index: int
    arrival_s: float
    prompt_len: int
    max_tokens: int
    block_hashes: tuple[int, ...]


def load_trace(path: str | Path, num_requests: int | None = None) -> list[TraceRow]:
    """The first ``num_requests`` rows of a JSONL trace (all for None)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"trace {path} not found; give a Mooncake-format JSONL file (timestamp, "
            "input_length, output_length, hash_ids per line)"
        )
    rows: list[TraceRow] = []
    with path.open() as f:
        for line in f:
            if num_requests is not None and len(rows) >= num_requests:
                break
            if line.strip():
                d = json.loads(line)
                rows.append(
                    TraceRow(
                        int(d["timestamp"]),
                        int(d["input_length"]),
                        int(d["output_length"]),
                        tuple(int(h) for h in d["hash_ids"]),
                    )
                )
    return rows


def block_hashes(
    index: int, hash_ids: tuple[int, ...], prompt_len: int, block_tokens: int, block_size: int
) -> tuple[int, ...]:
    """Scheduler block hashes of one prompt (see module doc)."""
    out = []
    for j in range(prompt_len // block_size):
        end = (j + 1) * block_size
        k = (end - 1) // block_tokens
        if k < len(hash_ids):
            out.append((hash_ids[k] << _OFFSET_BITS) | (end - k * block_tokens))
        else:  # past the recorded blocks: this request's own tokens
            out.append(-((index << _OFFSET_BITS) | j) - 1)
    return tuple(out)


def build_requests(rows: list[TraceRow], scale: TraceScale, block_size: int) -> list[SimRequest]:
    """Scaled requests in trace order; arrivals relative to the first row."""
    if not rows:
        return []
    t0 = rows[0].timestamp_ms
    out = []
    for i, row in enumerate(rows):
        n_in = max(1, round(row.input_length * scale.length_scale))
        if scale.max_input is not None:
            n_in = min(n_in, scale.max_input)
        n_out = max(round(row.output_length * scale.output_scale), scale.min_output)
        if scale.max_output is not None:
            n_out = min(n_out, scale.max_output)
        arrival_s = (row.timestamp_ms - t0) / 1000.0 / scale.rate_scale
        hashes = block_hashes(i, row.hash_ids, n_in, scale.block_tokens, block_size)
        out.append(SimRequest(i, arrival_s, n_in, n_out, hashes))
    return out


def infinite_cache_hit_rate(requests: list[SimRequest], block_size: int) -> float:
    """Prefix-hit rate with one infinite cache that every prompt passes through (the trace's
    own bound): hit tokens / prompt tokens, never counting the block of the last token."""
    seen: set[int] = set()
    hit = total = 0
    for r in requests:
        usable = (r.prompt_len - 1) // block_size
        n = 0
        for h in r.block_hashes[:usable]:
            if h not in seen:
                break
            n += 1
        hit += n * block_size
        total += r.prompt_len
        seen.update(r.block_hashes)
    return hit / total if total else 0.0
