"""The OpenAI-compatible request bodies, validated with pydantic at the edge.

Unknown fields are refused (422 names them). OpenAI fields tidal does not implement are
accepted only at their neutral values (``n=1``, penalties 0, no logprobs) so clients that send
defaults keep working. vLLM-style extensions: ``top_k``, ``ignore_eos``, ``stop_token_ids``,
``return_token_ids``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.sampling import SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

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
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0

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

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
        )


TokenIds = list[int]


class CompletionRequest(_Sampling):
    """POST /v1/completions: ``prompt`` as text or token ids (one prompt per request)."""

    prompt: str | TokenIds | list[str] | list[TokenIds]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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
