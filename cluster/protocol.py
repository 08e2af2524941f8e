"""The OpenAI-compatible request bodies, validated with pydantic at the edge.

Three kinds of field, as vLLM and SGLang treat them:
- fields tidal implements: validated here (a wrong type or range is a 422 naming the field);
- fields tidal understands but cannot honour at the value sent (``response_format`` asking for
  JSON, ``logit_bias``, penalties, ``echo``, ``suffix``, ``best_of``, non-text content parts,
  ``n`` above ``MAX_CHOICES``): ``unsupported()`` names them and the ingress answers 400;
  at their neutral values they are accepted, so clients that send defaults keep working;
- fields tidal does not know: accepted and ignored (``unknown_fields()``; the ingress logs each
  name once).
vLLM-style extensions: ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``return_token_ids``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.sampling import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16  # n: independent choices per request
_NAME_PATTERN = r"^[A-Za-z0-9_\-.]{1,64}$"  # OpenAI's function names (K2's ids add the dot)


class _Body(BaseModel):
    """Unknown fields are kept aside (``model_extra``), never an error."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self, prefix: str = "") -> list[str]:
        """Dotted names of the fields nobody reads, here and in nested bodies."""
        names = [f"{prefix}{k}" for k in self.model_extra or {}]
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, _Body):
                    suffix = "[]" if isinstance(value, list) else ""
                    names += item.unknown_fields(f"{prefix}{name}{suffix}.")
        return names


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    user: str | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes up to 8 non-empty strings")
        return v

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per output token to report; None: no logprobs (per endpoint)."""
        return None

    def unsupported(self) -> list[str]:
        """'field: why' for every field set to a value tidal cannot honour (-> 400)."""
        out = []
        if self.n > MAX_CHOICES:
            out.append(f"n: at most {MAX_CHOICES} choices per request, got {self.n}")
        if self.presence_penalty or self.frequency_penalty:
            out.append("presence_penalty/frequency_penalty: penalties are not implemented; send 0")
        if self.logit_bias:
            out.append("logit_bias: not implemented; leave it out or send {}")
        return out

    def sampling(self, choice: int = 0) -> SamplingParams:
        """The sampling of choice ``choice``: choice i of a seeded request draws with seed + i."""
        seed = None if self.seed is None else (self.seed + choice) % (1 << 63)
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=seed,
            num_logprobs=self.num_logprobs,
        )


TokenIds = list[int]


class CompletionRequest(_Sampling):
    """POST /v1/completions: ``prompt`` as text or token ids (one prompt per request)."""

    prompt: str | TokenIds | list[str] | list[TokenIds]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | TokenIds | list[str] | list[TokenIds]) -> str | TokenIds:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"send one prompt per request, got {len(v)}")
            v = v[0]
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt token ids are empty; send at least one token")
            if any(t < 0 for t in v):
                raise ValueError("prompt token ids must be >= 0")
        elif not v:
            raise ValueError("prompt is empty; send at least one character")
        return v

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.echo:
            out.append("echo: returning the prompt is not implemented; send false")
        if self.suffix:
            out.append("suffix: insertion is not implemented; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            out.append(f"best_of: ranking choices is not implemented; send best_of = n ({self.n})")
        return out


class ContentPart(_Body):
    """A part of a message's content; only ``text`` parts are rendered."""

    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = ""


class AssistantToolCall(_Body):
    """A call in an assistant message sent back to us (as we returned it)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def template_dict(self) -> dict[str, Any]:
        """What the chat template reads: ``developer`` is K2's ``system``."""
        role = "system" if self.role == "developer" else self.role
        d: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [
                c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls
            ]
            d["content"] = self.text() or None
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class FunctionDef(_Body):
    name: str = Field(pattern=_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function {self.tool_choice.function.name!r}, which is "
                    f"not in tools ({', '.join(names) or 'none sent'})"
                )
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError('tool_choice "required" needs at least one tool in tools')
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_mode(self) -> str:
        """One of off (no tools, or tool_choice none), auto, required, named."""
        if not self.tools or self.tool_choice == "none":
            return "off"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            out.append("top_logprobs: needs logprobs: true")
        if self.response_format is not None and self.response_format.type != "text":
            out.append(
                f"response_format: {self.response_format.type} needs constrained decoding, "
                'which tidal does not implement; send {"type": "text"} or leave it out'
            )
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                kinds = sorted({p.type for p in m.content if p.type != "text"})
                out.append(f"messages.{i}.content: only text parts are supported, got {kinds}")
        return out


class ResizeRequest(BaseModel):
    """POST /admin/pools: new pool sizes (roles left out keep theirs)."""

    model_config = ConfigDict(extra="forbid")
    prefill: int | None = Field(None, ge=0)
    decode: int | None = Field(None, ge=0)
    mixed: int | None = Field(None, ge=0)

    def sizes(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class MoveRequest(BaseModel):
    """POST /admin/move: move one instance to another pool."""

    model_config = ConfigDict(extra="forbid")
    instance: str
    role: Literal["prefill", "decode", "mixed"]


class PlannerModeRequest(BaseModel):
    """POST /admin/planner: ``auto`` applies the planner's split through role moves; ``manual``
    only recommends."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["auto", "manual"]
