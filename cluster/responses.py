"""One response being written: its choices' text, tool calls and logprobs, in OpenAI's shapes.

A request with ``n`` choices runs ``n`` generations forked from one prefill
(``Flow.generate_choices``); each one's events go through a ``Choice`` (stop strings and
incremental UTF-8 in ``TextStream``, K2's tool-call section in ``ToolCallParser``, tokens and
logprobs kept for the answer), and ``Response`` merges the choices into one JSON answer or one
SSE stream. Usage counts the prompt once and every choice's tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import ApiError, StreamError
from cluster.flow import Finished, Tokens
from cluster.text import TextStream
from cluster.tool_calls import ToolCallDelta, ToolCallParser
from common.sampling import TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf; what a logprob that underflowed reports (as vLLM)


@dataclass
class ChoiceDelta:
    """What one choice adds to the response at one moment."""

    index: int
    text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # set on a choice's last delta

    @property
    def is_empty(self) -> bool:
        return not (self.text or self.tool_calls or self.token_ids or self.logprobs)


class Choice:
    """One choice's output. ``tool_mode`` "off" leaves K2's tool-call tokens as text;
    ``forced`` is text the ingress put at the start of the assistant turn (``tool_choice``
    "required" or a named function) that the parser must see before the model's tokens."""

    def __init__(
        self,
        index: int,
        tokenizer: Any,
        stop: list[str],
        tool_mode: str = "off",
        forced: str = "",
        is_parallel_tool_calls: bool = True,
    ) -> None:
        self.index = index
        self.text = TextStream(tokenizer, stop)
        self.parser = ToolCallParser() if tool_mode != "off" else None
        self.is_parallel_tool_calls = is_parallel_tool_calls
        self.content = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.engine_finish_reason: str | None = None
        self._pending = self._parse(forced) if forced else ChoiceDelta(index)

    def add(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> ChoiceDelta:
        self.token_ids += token_ids
        self.logprobs += logprobs or []
        delta = self._parse(self.text.add(token_ids))
        delta.token_ids, delta.logprobs = token_ids, list(logprobs or [])
        return self._with_pending(delta)

    def finish(self, reason: str) -> ChoiceDelta:
        self.engine_finish_reason = reason
        delta = self._parse(self.text.finish())
        if self.parser is not None:
            rest = self.parser.finish()
            delta.text += rest.content
            delta.tool_calls += self._keep(rest.calls)
            self.content += rest.content
        delta = self._with_pending(delta)
        delta.finish_reason = self.finish_reason
        return delta

    @property
    def is_stopped(self) -> bool:
        return self.text.is_stopped

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        calls = self.parser.calls if self.parser is not None else []
        calls = calls if self.is_parallel_tool_calls else calls[:1]
        return [c.to_openai() for c in calls]

    @property
    def finish_reason(self) -> str | None:
        """``tool_calls`` when the model ended its turn after calling tools (OpenAI's rule: a
        call cut by max_tokens stays ``length``)."""
        if self.engine_finish_reason == "stop" and self.tool_calls:
            return "tool_calls"
        return self.engine_finish_reason

    def _parse(self, text: str) -> ChoiceDelta:
        if self.parser is None:
            self.content += text
            return ChoiceDelta(self.index, text)
        out = self.parser.feed(text)
        self.content += out.content
        return ChoiceDelta(self.index, out.content, self._keep(out.calls))

    def _keep(self, calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
        return calls if self.is_parallel_tool_calls else [c for c in calls if c.index == 0]

    def _with_pending(self, delta: ChoiceDelta) -> ChoiceDelta:
        pending, self._pending = self._pending, None
        if pending is not None:
            delta.text = pending.text + delta.text
            delta.tool_calls = pending.tool_calls + delta.tool_calls
        return delta


class LogprobFormat:
    """TokenLogprobs -> OpenAI's chat (``content`` entries) or legacy completion shapes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def token(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self._cache:
            raw = self._tokenizer.token_bytes(token_id)
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token_id]

    def chat(self, token_ids: list[int], logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        out = []
        for token_id, lp in zip(token_ids, logprobs, strict=False):
            out.append({**self._entry(token_id, lp.logprob), "top_logprobs": self._tops(lp)})
        return out

    def completion(
        self, token_ids: list[int], logprobs: list[TokenLogprob], offset: int
    ) -> dict[str, Any]:
        tokens = [self.token(t)[0] for t in token_ids[: len(logprobs)]]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_clamp(lp.logprob) for lp in logprobs],
            "top_logprobs": [
                {
                    self.token(t)[0]: _clamp(v)
                    for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
                }
                for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self.token(token_id)
        return {"token": text, "logprob": _clamp(logprob), "bytes": raw}

    def _tops(self, lp: TokenLogprob) -> list[dict[str, Any]]:
        return [self._entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Items of several async iterators as they come; an error in one ends all. Closing the
    merged iterator closes every stream (which cancels their requests)."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((item, None))
        except Exception as e:  # StreamError, ApiError: the consumer raises it
            await queue.put((None, e))
        finally:
            await queue.put((end, None))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        num_open = len(streams)
        while num_open:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is end:
                num_open -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


class Response:
    """A response of ``len(choices)`` choices for one prompt; ``streams[i]`` are choice i's
    flow events after ``Started``."""

    def __init__(
        self,
        ingress: Any,
        body: Any,
        request_id: str,
        prompt_ids: list[int],
        kind: str,
        num_cached: int,
        t0: float,
        choices: list[Choice],
    ) -> None:
        self.ingress = ingress
        self.body = body
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.kind = kind
        self.num_cached = num_cached
        self.t0 = t0
        self.choices = choices
        self.created = int(time.time())
        self.logprob_format = (
            LogprobFormat(ingress.tokenizer) if body.num_logprobs is not None else None
        )
        self._text_offsets = [0] * len(choices)

    # ---- events -> deltas ---------------------------------------------------------------------
    async def _deltas(
        self, choice: Choice, events: AsyncIterator[Any]
    ) -> AsyncIterator[ChoiceDelta]:
        """One choice's deltas until it ends (its last delta has the finish reason)."""
        metrics, tags = self.ingress.metrics, self.ingress._tags
        t_last: float | None = None
        try:
            async for ev in events:
                if isinstance(ev, Tokens):
                    now = time.monotonic()
                    if t_last is None:
                        metrics.ttft.observe(now - self.t0, tags)
                    else:
                        metrics.itl.observe((now - t_last) / len(ev.token_ids), tags)
                    t_last = now
                    metrics.output_tokens.inc(float(len(ev.token_ids)), tags)
                    delta = choice.add(ev.token_ids, ev.logprobs)
                    if choice.is_stopped:  # a stop string: closing `events` cancels the request
                        yield self._merge_last(delta, choice.finish("stop"))
                        return
                    yield delta
                elif isinstance(ev, Finished):
                    yield choice.finish(ev.finish_reason)
                    return
        finally:
            await events.aclose()
            outcome = choice.engine_finish_reason or "aborted"
            metrics.requests.inc(1.0, {**tags, "outcome": outcome})
            metrics.e2e.observe(time.monotonic() - self.t0, tags)
            metrics.prompt_tokens.inc(float(len(self.prompt_ids)), tags)
            if self.num_cached and choice.index == 0:
                metrics.cached_tokens.inc(float(self.num_cached), tags)

    @staticmethod
    def _merge_last(delta: ChoiceDelta, last: ChoiceDelta) -> ChoiceDelta:
        delta.text += last.text
        delta.tool_calls += last.tool_calls
        delta.finish_reason = last.finish_reason
        return delta

    def _all_deltas(self, streams: list[AsyncIterator[Any]]) -> AsyncIterator[ChoiceDelta]:
        return merge([self._deltas(c, s) for c, s in zip(self.choices, streams, strict=True)])

    # ---- the two answers --------------------------------------------------------------------
    async def json(self, streams: list[AsyncIterator[Any]]) -> dict[str, Any]:
        try:
            async for _ in self._all_deltas(streams):
                pass
        except StreamError as e:
            raise ApiError(503, str(e), code="worker_failed", retry_after_s=1.0) from None
        answer = {
            **self._envelope(chunk=False),
            "choices": [self._whole_choice(c) for c in self.choices],
            "usage": self.usage(),
        }
        if self.body.return_token_ids:
            answer["prompt_token_ids"] = self.prompt_ids
        return answer

    async def sse(self, streams: list[AsyncIterator[Any]]) -> AsyncIterator[str]:
        deltas = self._all_deltas(streams)
        try:
            if self.kind == "chat":
                for c in self.choices:
                    yield self._chunk(c.index, {"delta": {"role": "assistant", "content": ""}})
            async for d in deltas:
                if not d.is_empty or d.finish_reason is not None:
                    yield self._chunk(d.index, self._delta_choice(d))
            if self.body.include_usage:
                yield _sse({**self._envelope(chunk=True), "choices": [], "usage": self.usage()})
        except StreamError as e:
            yield _sse(ApiError(503, str(e), code="worker_failed").body())
        finally:
            # Closed at a yield (client gone): close the chain now, not whenever the garbage
            # collector finalizes it, so the requests are cancelled and their pages freed at once.
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    # ---- shapes -----------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        n_prompt = len(self.prompt_ids)
        n_out = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": self.num_cached},
        }

    def _whole_choice(self, c: Choice) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason}
        choice["logprobs"] = self._logprobs(c.index, c.token_ids, c.logprobs)
        if self.kind == "chat":
            calls = c.tool_calls
            message: dict[str, Any] = {"role": "assistant", "content": c.content}
            if calls:
                message["content"] = c.content or None
                message["tool_calls"] = calls
            choice["message"] = message
        else:
            choice["text"] = c.content
        if self.body.return_token_ids:
            choice["token_ids"] = c.token_ids
        return choice

    def _delta_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        out: dict[str, Any] = {"finish_reason": d.finish_reason}
        out["logprobs"] = self._logprobs(d.index, d.token_ids, d.logprobs) if d.logprobs else None
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if d.text or not (d.tool_calls or d.finish_reason):
                delta["content"] = d.text
            if d.tool_calls:
                delta["tool_calls"] = [_tool_call_delta(t) for t in d.tool_calls]
            out["delta"] = delta
        else:
            out["text"] = d.text
        if self.body.return_token_ids:
            out["token_ids"] = d.token_ids
        return out

    def _logprobs(
        self, index: int, token_ids: list[int], logprobs: list[TokenLogprob]
    ) -> dict[str, Any] | None:
        if self.logprob_format is None:
            return None
        if self.kind == "chat":
            return {"content": self.logprob_format.chat(token_ids, logprobs), "refusal": None}
        out = self.logprob_format.completion(token_ids, logprobs, self._text_offsets[index])
        self._text_offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.request_id,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
        }

    def _chunk(self, index: int, choice: dict[str, Any]) -> str:
        choice = {"index": index, "logprobs": None, "finish_reason": None, **choice}
        return _sse({**self._envelope(chunk=True), "choices": [choice], "usage": None})


def _tool_call_delta(t: ToolCallDelta) -> dict[str, Any]:
    if t.id is not None:
        return {
            "index": t.index,
            "id": t.id,
            "type": "function",
            "function": {"name": t.name, "arguments": t.arguments},
        }
    return {"index": t.index, "function": {"arguments": t.arguments}}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
