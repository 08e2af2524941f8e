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

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.admin_auth import admin_refusal
from cluster.config import ClusterConfig
from cluster.errors import ApiError
from cluster.flow import Flow, Generation, InstanceDirectory, Started
from cluster.metrics import IngressMetrics, scrape_tidal_metrics
from cluster.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    MoveRequest,
    PlannerModeRequest,
    ResizeRequest,
)
from cluster.responses import Choice, Response
from cluster.tool_calls import ARGUMENT_BEGIN, CALL_BEGIN, SECTION_BEGIN

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # clipped to what the context has left
_warned_fields: set[str] = set()  # unknown request fields already logged (once per name)


def _warn_unknown(names: list[str]) -> None:
    for name in names:
        if name not in _warned_fields:
            _warned_fields.add(name)
            log.warning("request field %r is not used by tidal; accepted and ignored", name)


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Body bytes -> validated model: 400 not UTF-8 JSON, 422 invalid, 400 a value tidal
    cannot honour (naming the field); unknown fields are logged once and ignored."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"request body is not valid UTF-8 (bad byte at offset {e.start})"
        ) from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        where = (
            f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        )
        raise ApiError(
            400, f"malformed JSON: {getattr(e, 'msg', 'nested too deeply')}{where}"
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
    if hasattr(body, "unknown_fields"):
        _warn_unknown(body.unknown_fields())
    unsupported = body.unsupported() if hasattr(body, "unsupported") else []
    if unsupported:
        param = unsupported[0].split(":")[0]
        raise ApiError(400, "; ".join(unsupported), code="unsupported_value", param=param)
    return body


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any) -> tuple[list[int], str]:
    """The prompt's token ids (messages and tools through the chat template, then any forced
    start of the assistant turn) and that forced text; a message the template refuses is 400."""
    messages = [m.template_dict() for m in body.messages]
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=tools if body.tool_mode != "off" else None
        )
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    forced = forced_tool_prefix(body)
    return tokenizer.encode(text + forced), forced


def forced_tool_prefix(body: ChatCompletionRequest) -> str:
    """Text that starts the assistant turn so the model calls a tool: tidal has no constrained
    decoding, so ``required`` opens K2's tool-call section and a named function also opens that
    function's call (id ``functions.NAME:0``); the arguments are the model's own."""
    if body.tool_mode == "required":
        return SECTION_BEGIN[0]
    if body.tool_mode == "named":
        name = body.tool_choice.function.name
        return f"{SECTION_BEGIN[0]}{CALL_BEGIN}functions.{name}:0{ARGUMENT_BEGIN}"
    return ""


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
        prompt_ids, forced = chat_prompt(body, self.tokenizer)
        return await self._serve(body, prompt_ids, "chat", body.max_new_tokens, forced)

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
        body = parse_body(bytes(raw), model)
        if check_model and body.model != self.config.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.config.model_name!r}",
                code="model_not_found",
                param="model",
            )
        return body

    async def _get_flow(self) -> Flow:
        if self._flow is None:
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
        self,
        body: Any,
        prompt_ids: list[int],
        kind: str,
        max_tokens: int | None,
        forced: str = "",
    ) -> Any:
        """Run the request's ``n`` choices and answer. They are one request to the cluster
        (``Flow.generate_choices``: one prefill, forked on the decode instance); choice 0's
        stream places them, the others start from that placement."""
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty after tokenisation", param="prompt")
        if max_tokens is None:
            room = self.max_model_len - len(prompt_ids)
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS[kind], room))
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        gens = [
            Generation(
                request_id=request_id if body.n == 1 else f"{request_id}.c{i}",
                prompt_ids=prompt_ids,
                max_tokens=max_tokens,
                sampling=body.sampling(i),
                stop_token_ids=tuple(body.stop_token_ids),
                ignore_eos=body.ignore_eos,
            )
            for i in range(body.n)
        ]
        flow = await self._get_flow()
        t0 = time.monotonic()
        streams = flow.generate_choices(request_id, gens)
        try:
            first = await self._start(streams[0])
            # every start ends before any stream is closed (closing a running one is an error)
            starts = await asyncio.gather(*map(self._start, streams[1:]), return_exceptions=True)
            error = next((s for s in starts if isinstance(s, BaseException)), None)
            if error is not None:
                raise error
        except BaseException:
            for s in streams:
                await s.aclose()  # cancels the choices already placed
            raise
        tool_mode = getattr(body, "tool_mode", "off")
        choices = [
            Choice(
                i,
                self.tokenizer,
                body.stop_strings,
                tool_mode,
                forced,
                getattr(body, "parallel_tool_calls", True),
            )
            for i in range(body.n)
        ]
        out = Response(
            self, body, request_id, prompt_ids, kind, first.num_cached_tokens, t0, choices
        )
        if body.stream:
            return _ClosingStreamingResponse(
                out.sse(streams),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await out.json(streams)

    async def _start(self, events: Any) -> Started:
        """A choice's first event: placed, or its ApiError (400/429/503) raised here."""
        try:
            first = await events.__anext__()
        except ApiError as e:
            self.metrics.requests.inc(1.0, {**self._tags, "outcome": str(e.status)})
            if e.code is not None and e.status in (400, 429, 503):
                self.metrics.rejects.inc(1.0, {"reason": e.code})
            raise
        assert isinstance(first, Started)
        return first
