"""``Engine``: one model replica's weights, paged latent KV cache, and forward passes.

The offline API (``prefill_logits``, ``generate``) manages its own pages; the worker API
(``prefill``, ``decode``) runs sequences whose pages the caller allocated in
``engine.cache.allocator`` (see docs/interfaces.md).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.fingerprint import model_fingerprint
from model.kv_cache import KVFormat, PagedLatentCache, resolve_kv_format
from model.parallel import ExpertParallel
from model.sampling import SamplingParams, sample_token
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from model.weights import (
    Fp8Weight,
    Weight,
    WeightFormat,
    WeightsError,
    load_weights,
    resident_bytes,
    weight_map,
)

DEFAULT_MAX_NUM_TOKENS = 32768
STAGE_DUTY = 0.1  # the share of the time an EPLB staging thread works (see stage_placement)


class Engine:
    """A loaded model: ``config``, ``tokenizer``, ``cache`` and the forward passes over them."""

    def __init__(
        self,
        config: ModelConfig,
        model: Transformer,
        cache: PagedLatentCache,
        tokenizer: Tokenizer | None,
        *,
        dtype: torch.dtype,
        device: torch.device,
        chunk_size: int,
        ep: ExpertParallel | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.config = config
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = device
        self.chunk_size = chunk_size
        self.ep = ep
        self._source: tuple[Path, str] | None = None  # checkpoint and weight format (reshard)
        self._staged: _StagedPlacement | None = None  # a new expert placement being swapped in
        self.num_peer_bytes = 0  # expert weight bytes staged from peer ranks, ever
        self._offline_ids = itertools.count()

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        kv_format: KVFormat | str = "auto",
        num_pages: int | None = None,
        page_size: int = 64,
        chunk_size: int = 512,
        expert_ids: list[int] | None = None,
        max_num_tokens: int | None = None,
        weight_format: WeightFormat | str = "auto",
        ep: ExpertParallel | None = None,
    ) -> Engine:
        """Read ``config.json``, the tokenizer and the weights of a model directory.

        ``kv_format`` "auto" keeps the KV in the model ``dtype`` (fp32 or bf16); "bf16", "fp8"
        and "fp32" choose it by name. The cache holds ``num_pages`` pages, or enough for
        ``max_num_tokens`` tokens (default min(32K, max_position_embeddings)). ``weight_format``
        "auto" keeps a block-FP8 checkpoint's linears FP8 in memory (FP8 GEMM), "fp8" requires
        that, "dequantize" widens them to ``dtype``; other checkpoints load in ``dtype``.
        With ``ep`` (a joined expert-parallel group) this rank loads and runs its block of the
        routed experts, and every forward is a lockstep tick (see ``idle_tick``).
        """
        path = Path(path)
        device = torch.device(device)
        config = ModelConfig.from_json(path / "config.json")
        if ep is not None:
            if expert_ids is not None:
                raise ValueError("pass expert_ids or ep, not both: ep decides the rank's experts")
            expert_ids = ep.local_experts
        state = load_weights(
            path,
            config,
            weight_format=weight_format,
            dtype=dtype,
            device=device,
            expert_ids=expert_ids,
        )
        model = Transformer(config, state, device, expert_ids, ep)
        if num_pages is None:
            tokens = max_num_tokens or min(DEFAULT_MAX_NUM_TOKENS, config.max_position_embeddings)
            num_pages = -(-tokens // page_size)
        cache = PagedLatentCache(
            config.num_hidden_layers,
            config.kv_lora_rank,
            config.qk_rope_head_dim,
            num_pages,
            page_size,
            resolve_kv_format(kv_format, str(dtype)),
            device,
        )
        tokenizer = Tokenizer.load(path)
        engine = cls(
            config,
            model,
            cache,
            tokenizer,
            dtype=dtype,
            device=device,
            chunk_size=chunk_size,
            ep=ep,
        )
        engine._source = (path, str(WeightFormat(weight_format).value))
        return engine

    @property
    def fingerprint(self) -> str:
        """Hash of the config and KV format; kvtransfer refuses KV from a different one."""
        return model_fingerprint(self.config, self.cache.fmt)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights resident in memory (e4m3 1 B/value + fp32 block scales for FP8
        linears); a storage shared by views or tied weights counts once."""
        return resident_bytes(self.model.weights())

    @property
    def expert_counts(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each global expert so far, per MoE layer (for EPLB)."""
        return {i: moe.counts for i, moe in self.model.moe_layers.items()}

    # ---- worker API -----------------------------------------------------------------------------
    def _ids(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(token_ids, dtype=torch.long).to(self.device).reshape(-1)

    @torch.inference_mode()
    def prefill(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int] | torch.Tensor,
        start_pos: int = 0,
        on_layer: Callable[[int, int, int], None] | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run tokens at [start_pos, start_pos+n) in chunks over the cached prefix of seq_id.

        Returns the last token's logits fp32 [vocab] (``all_logits``: every token's, [n, vocab]).
        """
        ids = self._ids(token_ids)
        n = ids.shape[0]
        if n == 0:
            raise ValueError("prefill needs at least one token")
        end = start_pos + n
        if not self.cache.allocator.has(seq_id):
            raise ValueError(
                f"sequence {seq_id!r} holds no pages; allocate them in engine.cache.allocator first"
            )
        if end > self.cache.allocator.capacity(seq_id):
            raise ValueError(
                f"sequence {seq_id!r} holds pages for {self.cache.allocator.capacity(seq_id)} "
                f"tokens but prefill reaches position {end}; allocate or append pages first"
            )
        outs = []
        # single rank: an on_layer exception stops the forward at once; expert-parallel ranks
        # finish the chunk's collectives first
        calls = _LayerCalls(on_layer) if on_layer is not None and self.ep is not None else None
        for lo in range(0, n, self.chunk_size):
            hi = min(lo + self.chunk_size, n)
            self._tick()
            outs.append(
                self.model.prefill(
                    ids[lo:hi], self.cache, seq_id, start_pos + lo, calls or on_layer, all_logits
                )
            )
            if calls is not None and calls.error is not None:
                raise calls.error  # after the chunk: its collectives all ran
        return torch.cat(outs) if all_logits else outs[-1][0]

    @torch.inference_mode()
    def decode(
        self,
        seq_ids: Sequence[Hashable],
        token_ids: Sequence[int] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """One step: token_ids[i] at positions[i] for each sequence -> logits fp32 [B, vocab]."""
        b = len(seq_ids)
        ids = self._ids(token_ids)
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if ids.shape[0] != b or pos.shape[0] != b:
            raise ValueError(
                f"decode got {b} seq_ids, {ids.shape[0]} tokens, {pos.shape[0]} positions"
            )
        if b == 0:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        alloc, s = self.cache.allocator, self.cache.page_size
        missing = [sid for sid in seq_ids if not alloc.has(sid)]
        if missing:
            raise ValueError(f"sequences {missing!r} hold no pages; allocate them first")
        tables = [alloc.block_table(sid) for sid in seq_ids]
        pos_list = pos.tolist()
        for sid, p, table in zip(seq_ids, pos_list, tables, strict=True):
            if p >= len(table) * s:
                raise ValueError(
                    f"sequence {sid!r} holds pages for {len(table) * s} tokens but decodes at "
                    f"position {p}; append pages first"
                )
        width = max(len(t) for t in tables)
        block_tables = torch.zeros(b, width, dtype=torch.int32)
        for i, table in enumerate(tables):
            block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        page = block_tables.gather(1, (pos // s).unsqueeze(1)).squeeze(1).long()
        slots = page * s + pos % s  # [B]
        dev = self.device
        self._tick()
        return self.model.decode(
            ids,
            pos.to(dev),
            self.cache,
            slots.to(dev),
            block_tables.to(dev),
            (pos + 1).to(torch.int32).to(dev),
        )

    # ---- expert parallelism -------------------------------------------------------------------
    def _tick(self, has_work: bool = True) -> bool:
        """Expert-parallel ranks: open the lockstep tick (of the forward about to run, or an
        idle one); True if any rank runs a forward in it. When every rank has staged the same
        new placement, each swaps in its next layer here, at the same tick."""
        if self.ep is None:
            return has_work
        staged = self._staged
        ready = staged.version if staged is not None else 0
        any_work, lowest, highest = self.ep.tick(has_work, ready)
        if staged is not None and lowest == highest == ready:
            self._swap_next_layer(staged)
        return any_work

    def idle_tick(self) -> bool:
        """For an expert-parallel rank's loop when it has no forward to run: join the current
        tick, and if another rank runs a forward in it, run the empty one. True if it did (call
        again at once: the busy rank may be mid-prefill); False when every rank is idle (or
        there is no expert parallelism)."""
        if self.ep is None or not self._tick(has_work=False):
            return False
        with torch.inference_mode():
            self.model.empty_forward(self.dtype)
        return True

    @property
    def placement(self) -> dict[int, list[int]]:
        """MoE layer -> the placement it serves (global slot -> logical expert)."""
        return {i: list(moe.placement) for i, moe in self.model.moe_layers.items()}

    @property
    def is_resharding(self) -> bool:
        return self._staged is not None

    def stage_placement(
        self,
        version: int,
        placement: dict[int, list[int]],
        fetch: Callable[[int, list[int]], dict[str, Weight]] | None = None,
        duty: float = STAGE_DUTY,
    ) -> int:
        """Off the step thread: read the weights of every MoE layer's new slots (experts already
        held are copied, others read from this rank's checkpoint) and publish them for the
        swap. ``version`` (> 0) must be the same on every rank. When this rank's checkpoint
        cannot give a layer's experts (its files are not on this host), ``fetch(layer,
        expert_ids)`` gets them from the peer ranks holding them (``expert_weights`` there).
        Raises on failure, leaving the served placement untouched. Returns the bytes read.

        Staging is paced so that the steps running meanwhile keep their speed: it works one
        expert weight at a time (a read, or a copy into the new stacks) on a low-priority
        thread and sleeps after each piece, working at most ``duty`` of the time (1: no
        pause). Each piece holds the GIL only briefly (the copies release it), so a step
        waits on staging at most that long per piece, and the pieces are spread out."""
        assert self.ep is not None and self._source is not None, "placement needs an EP engine"
        assert 0 < duty <= 1, f"duty must be in (0, 1], got {duty}"
        if self._staged is not None:
            raise RuntimeError(f"placement {self._staged.version} is still being swapped in")
        path, weight_format = self._source
        moe_layers = self.model.moe_layers
        unknown = sorted(set(placement) - set(moe_layers))
        if unknown:
            raise ValueError(f"layers {unknown} are not MoE layers")
        num_read = 0
        mapping: dict[str, str] | None = None  # the checkpoint's index, parsed once
        pause = _Pacer(duty)

        def read_file(layer: int, expert_ids: list[int]) -> dict[str, Weight]:
            nonlocal mapping
            if mapping is None:
                mapping = weight_map(path)
            state: dict[str, Weight] = {}
            for e in expert_ids:
                state |= load_weights(
                    path,
                    self.config,
                    weight_format=weight_format,
                    dtype=self.dtype,
                    device=self.device,
                    expert_ids=[e],
                    prefix=f"model.layers.{layer}.mlp.experts.{e}.",
                    mapping=mapping,
                )
                pause()
            return state

        def reader(layer: int) -> Callable[[list[int]], dict[str, Weight]]:
            def read(expert_ids: list[int]) -> dict[str, Weight]:
                nonlocal num_read
                if not expert_ids:
                    return {}
                try:
                    state = read_file(layer, expert_ids)
                except WeightsError:
                    if fetch is None:
                        raise
                    state = fetch(layer, expert_ids)  # from the peers: the file is not here
                    self.num_peer_bytes += resident_bytes(state.values())
                num_read += resident_bytes(state.values())
                return state

            return read

        layers = _at_low_priority(
            lambda: {
                i: (list(p), *moe_layers[i].stage(list(p), reader(i), pause))
                for i, p in sorted(placement.items())
            }
        )
        self._staged = _StagedPlacement(version, layers)  # one assignment: seen whole or not
        return num_read

    def expert_weights(self, layer: int, expert_ids: list[int]) -> dict[str, Weight]:
        """The weights of experts this rank holds in MoE layer ``layer``, for a peer staging a
        placement without the checkpoint file: ``<prefix>.experts.<e>.gate_up`` / ``.down``
        (fused, as served; CPU). ``KeyError`` naming an expert this rank does not hold."""
        moe = self.model.moe_layers[layer]
        held = {e: i for i, e in enumerate(moe.expert_ids)}
        out: dict[str, Weight] = {}
        for e in expert_ids:
            if e not in held:
                raise KeyError(f"layer {layer}: expert {e} is not held by this rank")
            q = f"{moe.prefix}.experts.{e}"
            out[f"{q}.gate_up"] = _copied(moe.gate_up[held[e]], "cpu")
            out[f"{q}.down"] = _copied(moe.down[held[e]], "cpu")
        return out

    def abort_placement(self, version: int) -> bool:
        """Drop a staged placement none of whose layers is swapped in; True if dropped."""
        staged = self._staged
        if staged is None or staged.version != version or staged.num_swapped:
            return False
        self._staged = None
        return True

    def _swap_next_layer(self, staged: _StagedPlacement) -> None:
        layer = min(staged.layers)
        placement, gate_up, down = staged.layers.pop(layer)
        self.model.moe_layers[layer].install(placement, gate_up, down)
        staged.num_swapped += 1
        if not staged.layers:
            self._staged = None

    # ---- offline API ----------------------------------------------------------------------------
    def prefill_logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits fp32 [len, vocab] of every position of one prompt (pages allocated and freed)."""
        ids = self._ids(token_ids)
        seq_id = ("offline", next(self._offline_ids))
        self.cache.allocator.allocate(seq_id, ids.shape[0])
        try:
            return self.prefill(seq_id, ids, all_logits=True)
        finally:
            self.cache.allocator.free(seq_id)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_at_eos: bool = False,
    ) -> list[list[int]]:
        """Prefill every prompt, then decode all of them together; returns the new tokens.

        Exactly ``max_new_tokens`` tokens per prompt unless ``stop_at_eos``. A seeded
        ``sampling`` draws the same tokens as the served path (``model.sampling.sample_token``).
        """
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        alloc = self.cache.allocator
        seq_ids = [("offline", next(self._offline_ids)) for _ in prompts]
        eos = set(self.config.eos_token_ids)
        outputs: list[list[int]] = [[] for _ in prompts]
        try:
            for sid, prompt in zip(seq_ids, prompts, strict=True):
                alloc.allocate(sid, len(prompt) + max_new_tokens)
            live = []
            for i, (sid, prompt) in enumerate(zip(seq_ids, prompts, strict=True)):
                logits = self.prefill(sid, prompt)
                outputs[i].append(sample_token(logits, sampling, 0))
                live.append(i)
            for _ in range(max_new_tokens - 1):
                if stop_at_eos:
                    live = [i for i in live if outputs[i][-1] not in eos]
                if not live:
                    break
                logits = self.decode(
                    [seq_ids[i] for i in live],
                    [outputs[i][-1] for i in live],
                    [len(prompts[i]) + len(outputs[i]) - 1 for i in live],
                )
                for row, i in enumerate(live):
                    outputs[i].append(sample_token(logits[row], sampling, len(outputs[i])))
        finally:
            for sid in seq_ids:
                alloc.free(sid)
        return outputs


class _LayerCalls:
    """``on_layer`` for an expert-parallel forward: the first exception it raises (a cancel, a
    failed transfer) is kept and later calls are skipped, so the forward still runs every
    layer's collectives; ``Engine.prefill`` raises it after the chunk."""

    def __init__(self, on_layer: Callable[[int, int, int], None]) -> None:
        self._on_layer = on_layer
        self.error: BaseException | None = None

    def __call__(self, layer: int, start: int, end: int) -> None:
        if self.error is not None:
            return
        try:
            self._on_layer(layer, start, end)
        except Exception as e:
            self.error = e


def _copied(w: Weight, device: str | torch.device) -> Weight:
    """A standalone copy of one weight on ``device`` (a slice of a stack would pickle the whole
    stack)."""
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.q.to(device, copy=True), w.scale_inv.to(device, copy=True), w.block)
    return w.to(device, copy=True)


class _Pacer:
    """Called by a fresh background thread after each piece of its work: sleeps so that the
    thread works at most ``duty`` of the wall time. A piece counts the thread's own CPU seconds, not
    wall seconds: a low-priority thread that waited for a core the steps hold has already
    yielded, and its pause does not grow with the wait (staging still ends in seconds on a
    busy host)."""

    def __init__(self, duty: float) -> None:
        self.duty = duty
        self._start = 0.0  # the thread's CPU seconds when its piece began (a fresh thread: 0)

    def __call__(self) -> None:
        busy = max(0.0, time.thread_time() - self._start)
        if self.duty < 1:
            time.sleep(busy * (1 / self.duty - 1))  # releases the GIL
        self._start = time.thread_time()


def _at_low_priority(fn: Callable[[], object]) -> object:
    """``fn()`` on a fresh thread at the lowest CPU priority (Linux: nice 19 for that thread
    only), so that staging weights on a host whose cores also run the step loop takes its CPU
    time when the loop waits, not from the steps. Re-raises what ``fn`` raises."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux: same priority as the caller
            pass
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    thread = threading.Thread(target=run, name="tidal-eplb-stage", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


@dataclass
class _StagedPlacement:
    """A new placement whose weights are staged: MoE layer -> (placement, gate_up, down), swapped
    in one layer per lockstep tick."""

    version: int
    layers: dict[int, tuple[list[int], Weight, Weight]]
    num_swapped: int = 0
