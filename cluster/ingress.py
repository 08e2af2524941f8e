"""The OpenAI-compatible HTTP ingress (a Ray Serve deployment around a FastAPI app).

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (SSE streaming or one JSON
answer), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (the cluster's ``tidal_*``
series), and the admin routes ``GET/POST /admin/pools``, ``POST /admin/move``,
``GET/POST /admin/planner`` and ``POST /admin/eplb/rebalance`` (pool sizes, live role moves,
the planner's mode, EPLB rounds), which need the admin bearer token
(cluster/admin_auth.py). The ingress validates and
tokenises, then hands the request to ``Flow`` (cluster/flow.py), which talks to the scheduler
and the workers; here only HTTP, text and usage are handled. Errors use OpenAI's JSON shape
(cluster/errors.py).
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.admin_auth import admin_refusal
from cluster.config import ClusterConfig
from cluster.errors import ApiError, StreamError
from cluster.flow import Finished, Flow, Generation, InstanceDirectory, Started, Tokens
from cluster.metrics import IngressMetrics, scrape_tidal_metrics
from cluster.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    MoveRequest,
    PlannerModeRequest,
    ResizeRequest,
)
from cluster.text import TextStream

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # clipped to what the context has left

app = FastAPI(title="tidal", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return e.to_response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return ApiError(e.status_code, str(e.detail), code="not_found").to_response()


@app.exception_handler(Exception)
async def _bug(_: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error in the ingress")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}").to_response()


class _Output:
    """One response being written: text, stop strings, usage, the OpenAI JSON shapes."""

    def __init__(
        self, ingress: Any, body: Any, gen: Generation, kind: str, num_cached: int, t0: float
    ) -> None:
        self.ingress = ingress
        self.body = body
        self.gen = gen
        self.kind = kind
        self.num_cached = num_cached
        self.t0 = t0
        self.created = int(time.time())
        self.text = TextStream(ingress.tokenizer, body.stop_strings)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._t_last: float | None = None

    # ---- events -> text ---------------------------------------------------------------------
    async def _deltas(self, events: AsyncIterator[Any]) -> AsyncIterator[tuple[str, list[int]]]:
        """(text delta, token ids delta) pairs until the request ends; sets finish_reason."""
        metrics, tags = self.ingress.metrics, self.ingress._tags
        try:
            async for ev in events:
                if isinstance(ev, Tokens):
                    now = time.monotonic()
                    if self._t_last is None:
                        metrics.ttft.observe(now - self.t0, tags)
                    else:
                        metrics.itl.observe((now - self._t_last) / len(ev.token_ids), tags)
                    self._t_last = now
                    self.token_ids += ev.token_ids
                    metrics.output_tokens.inc(float(len(ev.token_ids)), tags)
                    delta = self.text.add(ev.token_ids)
                    yield delta, ev.token_ids
                    if self.text.is_stopped:
                        self.finish_reason = "stop"
                        return  # closing `events` cancels the request and frees its pages
                elif isinstance(ev, Finished):
                    self.finish_reason = ev.finish_reason
                    yield self.text.finish(), []
                    return
        finally:
            await events.aclose()
            outcome = self.finish_reason or "aborted"
            metrics.requests.inc(1.0, {**tags, "outcome": outcome})
            metrics.e2e.observe(time.monotonic() - self.t0, tags)
            metrics.prompt_tokens.inc(float(len(self.gen.prompt_ids)), tags)
            if self.num_cached:
                metrics.cached_tokens.inc(float(self.num_cached), tags)

    async def json(self, events: AsyncIterator[Any]) -> dict[str, Any]:
        parts: list[str] = []
        try:
            async for delta, _ in self._deltas(events):
                parts.append(delta)
        except StreamError as e:
            raise ApiError(503, str(e), code="worker_failed", retry_after_s=1.0) from None
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason, "logprobs": None}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.body.return_token_ids:
            choice["token_ids"] = self.token_ids
        answer = {
            "id": self.gen.request_id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": [choice],
            "usage": self.usage(),
        }
        if self.body.return_token_ids:
            answer["prompt_token_ids"] = self.gen.prompt_ids
        return answer

    async def sse(self, events: AsyncIterator[Any]) -> AsyncIterator[str]:
        deltas = self._deltas(events)
        try:
            if self.kind == "chat":
                yield self._chunk({"delta": {"role": "assistant", "content": ""}})
            async for delta, ids in deltas:
                if delta or (ids and self.body.return_token_ids):
                    yield self._chunk(self._delta(delta, ids))
            yield self._chunk({**self._delta("", []), "finish_reason": self.finish_reason})
            if self.body.include_usage:
                yield _sse({**self._envelope(), "choices": [], "usage": self.usage()})
        except StreamError as e:
            yield _sse(ApiError(503, str(e), code="worker_failed").body())
        finally:
            # Closed at a yield (client gone): close the chain now, not whenever the garbage
            # collector finalizes it, so the request is cancelled and its pages freed at once.
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    # ---- shapes -----------------------------------------------------------------------------
    def usage(self) -> dict[str, Any]:
        n_prompt, n_out = len(self.gen.prompt_ids), len(self.token_ids)
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": self.num_cached},
        }

    def _envelope(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.gen.request_id,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
        }

    def _delta(self, text: str, ids: list[int]) -> dict[str, Any]:
        d: dict[str, Any] = {"delta": {"content": text}} if self.kind == "chat" else {"text": text}
        if self.body.return_token_ids:
            d["token_ids"] = ids
        return d

    def _chunk(self, choice: dict[str, Any]) -> str:
        choice = {"index": 0, "logprobs": None, "finish_reason": None, **choice}
        if self.kind == "chat" and "delta" not in choice:
            choice["delta"] = {}
        return _sse({**self._envelope(), "choices": [choice], "usage": None})


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator however the response ends.

    Starlette cancels the sending task when the client disconnects; if that happens while a
    chunk is being sent, the body generator is left suspended at its ``yield`` and only cleaned
    up by the garbage collector. Closing it here runs the ingress's cleanup (cancel on every
    worker, release in the scheduler) right away.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@serve.ingress(app)
class Ingress:
    """Serve deployment body (``cluster.app`` applies ``serve.deployment``). The FastAPI
    wrapping is applied here, at import, so every replica that imports this module gets it."""

    def __init__(self, config: ClusterConfig, pool: Any) -> None:
        from model.config import ModelConfig
        from model.tokenizer import Tokenizer

        self.config = config
        self.pool = pool
        self.tokenizer = Tokenizer.load(config.engine.model_dir)
        self.model_config = ModelConfig.from_json(f"{config.engine.model_dir}/config.json")
        self.max_model_len = config.scheduler.max_model_len
        self.metrics = IngressMetrics()
        self._flow: Flow | None = None
        self._tags = {"model": config.model_name}

    # ---- OpenAI routes ----------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        state = await self.pool.health.remote()
        return JSONResponse(state, status_code=200 if state["is_ready"] else 503)

    @app.get("/metrics")
    async def metrics_text(self) -> PlainTextResponse:
        """The cluster's tidal_* metrics (Prometheus text), gathered from every node."""
        return PlainTextResponse(
            await scrape_tidal_metrics(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "tidal",
                    "root": self.config.model_name,  # never the server's filesystem path
                    "max_model_len": self.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body = await self._parse(request, CompletionRequest)
        if isinstance(body.prompt, str):
            prompt_ids = self.tokenizer.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
            vocab = self.model_config.vocab_size
            bad = next((t for t in prompt_ids if t >= vocab), None)
            if bad is not None:
                raise ApiError(
                    400, f"prompt token id {bad} is out of range [0, {vocab})", param="prompt"
                )
        return await self._serve(body, prompt_ids, "completion", body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        body = await self._parse(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode(text)
        return await self._serve(body, prompt_ids, "chat", body.max_new_tokens)

    # ---- admin routes -----------------------------------------------------------------------
    @app.get("/admin/pools")
    async def pools(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return await self.pool.snapshot.remote()

    @app.post("/admin/pools")
    async def resize(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        body = await self._parse(request, ResizeRequest, check_model=False)
        return await self._admin(self.pool.resize.remote(body.sizes()))

    @app.post("/admin/move")
    async def move(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        body = await self._parse(request, MoveRequest, check_model=False)
        return await self._admin(self.pool.move.remote(body.instance, body.role))

    @app.get("/admin/planner")
    async def planner(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return await self.pool.planner_state.remote()

    @app.post("/admin/planner")
    async def set_planner(self, request: Request) -> dict[str, Any]:
        """``{"mode": "auto"}`` applies the planner's split through role moves; ``manual``
        only recommends."""
        self._authorize(request)
        body = await self._parse(request, PlannerModeRequest, check_model=False)
        return await self._admin(self.pool.set_planner_mode.remote(body.mode))

    @app.post("/admin/eplb/rebalance")
    async def eplb_rebalance(self, request: Request) -> dict[str, Any]:
        """One EPLB round now; body ``{"instance": "i3"}`` or empty for every EP instance."""
        self._authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, 'the body must be JSON: {} or {"instance": "i3"}') from None
        instance = body.get("instance") if isinstance(body, dict) else None
        if instance is not None and not isinstance(instance, str):
            raise ApiError(400, 'instance must be an instance id string, e.g. "i3"')
        return {"rebalances": await self._admin(self.pool.rebalance.remote(instance))}

    # ---- internals --------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        """401/403 unless the request carries the admin token (or admin is insecure)."""
        refusal = admin_refusal(self.config, request.headers.get("authorization"))
        if refusal is not None:
            raise refusal

    async def _admin(self, response: Any) -> dict[str, Any]:
        try:
            return await response
        except ValueError as e:
            raise ApiError(400, str(e).splitlines()[-1]) from e

    async def _parse(
        self, request: Request, model: type[BaseModel], check_model: bool = True
    ) -> Any:
        """Body -> validated model: 413 too big, 400 not UTF-8 JSON, 422 invalid, 404 model."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"request body exceeds the {limit}-byte limit")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(
                400, f"request body is not valid UTF-8 (bad byte at offset {e.start})"
            ) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(
                400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}")
        try:
            body = model.model_validate(obj)
        except ValidationError as e:
            errors = e.errors(include_url=False)
            param = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
            detail = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors
            )
            raise ApiError(422, detail, code="invalid_value", param=param) from None
        if check_model and body.model != self.config.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.config.model_name!r}",
                code="model_not_found",
                param="model",
            )
        return body

    async def _get_flow(self) -> Flow:
        if self._flow is None or self._flow.is_broken:
            scheduler = await self.pool.scheduler_handle.remote()
            self._flow = Flow(
                self.config,
                scheduler,
                InstanceDirectory(self.pool),
                on_reroute=lambda stage: self.metrics.reroutes.inc(1.0, {"stage": stage}),
                on_ttft_parts=lambda parts: self.metrics.observe_ttft_parts(parts, self._tags),
            )
        return self._flow

    async def _serve(
        self, body: Any, prompt_ids: list[int], kind: str, max_tokens: int | None
    ) -> Any:
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty after tokenisation", param="prompt")
        if max_tokens is None:
            room = self.max_model_len - len(prompt_ids)
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS[kind], room))
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        gen = Generation(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=body.sampling(),
            stop_token_ids=tuple(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
        )
        flow = await self._get_flow()
        t0 = time.monotonic()
        events = flow.generate(gen)
        try:
            first = await events.__anext__()  # placed, or ApiError (400/429/503) raised here
        except ApiError as e:
            self.metrics.requests.inc(1.0, {**self._tags, "outcome": str(e.status)})
            if e.code is not None and e.status in (400, 429, 503):
                self.metrics.rejects.inc(1.0, {"reason": e.code})
            raise
        assert isinstance(first, Started)
        out = _Output(self, body, gen, kind, first.num_cached_tokens, t0)
        if body.stream:
            return _ClosingStreamingResponse(
                out.sse(events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await out.json(events)
