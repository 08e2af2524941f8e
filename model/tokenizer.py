"""The tokenizer of a model directory: HF ``tokenizer.json`` or Kimi's ``tiktoken.model``.

``Tokenizer.load(model_dir)`` picks whichever file exists. Special tokens written in the text
(``<|im_end|>``) encode to their ids, but none are added implicitly. The chat template is the
jinja string in ``tokenizer_config.json``, rendered in a sandbox after the messages are checked.
``DecodeStream`` turns a token stream into text without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import base64
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
REPLACEMENT = "\ufffd"

# Kimi-K2's pre-tokenisation: Han runs, cased words with English contractions, digit groups of
# up to three, punctuation runs, newlines, then spaces.
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


# tiktoken's BPE is quadratic in the length of one pre-tokenised piece; a prompt that is one
# 100K-character "word" would stall the ingress. Runs are cut into bounded slices first.
MAX_RUN_CHARS = 25_000


def _bounded_runs(text: str) -> list[str]:
    """``text`` cut so no run of only-whitespace or only-non-whitespace exceeds MAX_RUN_CHARS."""
    if len(text) <= MAX_RUN_CHARS:
        return [text]
    out, start, run_start = [], 0, 0
    for i in range(1, len(text) + 1):
        if i == len(text) or text[i].isspace() != text[i - 1].isspace():
            run_start = i
        elif i - run_start >= MAX_RUN_CHARS:
            out.append(text[start:i])
            start = run_start = i
    out.append(text[start:])
    return out


class TokenizerError(ValueError):
    """A model directory whose tokenizer files are missing or unreadable."""


class _Backend(ABC):
    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode_bytes(self, ids: list[int]) -> bytes: ...

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...


class _HFBackend(_Backend):
    """``tokenizer.json`` through the ``tokenizers`` package."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        # Byte-level decoders turn an incomplete UTF-8 sequence into U+FFFD; DecodeStream copes.
        return self._tok.decode(list(ids), skip_special_tokens=False).encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class _TiktokenBackend(_Backend):
    """Kimi's ``tiktoken.model`` (base64 token + rank per line) with its special tokens."""

    def __init__(self, path: Path, specials: dict[str, int]):
        import tiktoken

        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(
                    f"{path}:{lineno}: expected '<base64 token> <rank>': {e}"
                ) from e
        self._specials = specials
        self._enc = tiktoken.Encoding(
            name=f"tidal:{path}",
            pat_str=KIMI_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self._vocab_size = max([*ranks.values(), *specials.values()]) + 1
        self._known = {*ranks.values(), *specials.values()}
        by_length = sorted(specials, key=len, reverse=True)  # longest first: no prefix wins
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text) if self._specials else [text]):
            if i % 2:  # the capture group: a special token
                ids.append(self._specials[part])
                continue
            for chunk in _bounded_runs(part):
                ids.extend(self._enc.encode_ordinary(chunk))
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return self._enc.decode_bytes(list(ids))
        except KeyError:  # ids past the vocabulary (padded embedding rows) decode to nothing
            return self._enc.decode_bytes([i for i in ids if i in self._known])

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        try:
            return self._enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


def _token_text(value: Any) -> str | None:
    """A token in tokenizer_config.json is a string or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class Tokenizer:
    """Text <-> token ids and the chat template of one model directory."""

    def __init__(self, backend: _Backend, config: dict[str, Any], generation: dict[str, Any]):
        self._backend = backend
        self._config = config
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        eos = {self._id_of(self.eos_token), *_as_ids(generation.get("eos_token_id"))}
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(i for i in eos if i is not None))
        self._template: jinja2.Template | None = None

    @classmethod
    def load(cls, model_dir: str | Path) -> Tokenizer:
        """Read ``tokenizer.json`` (preferred) or ``tiktoken.model`` plus ``tokenizer_config.json``."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        if (model_dir / "tokenizer.json").exists():
            backend: _Backend = _HFBackend(model_dir / "tokenizer.json")
        elif (model_dir / "tiktoken.model").exists():
            decoder = config.get("added_tokens_decoder") or {}
            specials = {_token_text(v): int(k) for k, v in decoder.items()}
            backend = _TiktokenBackend(model_dir / "tiktoken.model", specials)
        else:
            raise TokenizerError(
                f"{model_dir}: no tokenizer found; expected tokenizer.json or tiktoken.model"
            )
        return cls(backend, config, generation)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are recognised, none are added."""
        return self._backend.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; an incomplete UTF-8 sequence becomes U+FFFD."""
        return self._backend.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (part of a UTF-8 character, for some byte-level tokens)."""
        return self._backend.decode_bytes([token_id])

    def decode_stream(self) -> DecodeStream:
        """An incremental detokenizer for one output stream."""
        return DecodeStream(self)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` (and the OpenAI-style ``tools`` they may call) with the model's
        jinja chat template.

        Each message needs a ``role`` in system/user/assistant/tool and a ``content`` string (or a
        list of ``{"type": "text", "text": ...}`` parts); an assistant message carrying
        ``tool_calls`` may have no content. Raises ``ValueError`` saying which message is wrong.
        """
        if self.chat_template is None:
            raise ValueError("tokenizer_config.json has no chat_template; send a plain prompt")
        checked = [_check_message(i, m) for i, m in enumerate(messages)]
        if not checked:
            raise ValueError("messages is empty; send at least one message")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        try:
            return self._template.render(
                messages=checked,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e


def _check_message(i: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{i}]: unknown role {role!r}; use one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ValueError(f"messages[{i}]: only text content parts are supported")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if content is None and not (role == "assistant" and message.get("tool_calls")):
        raise ValueError(f"messages[{i}] (role {role!r}) has no 'content'")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"messages[{i}]: 'content' must be a string, got {type(content).__name__}")
    return {**message, "content": content}


def _raise(message: str) -> None:
    raise ValueError(message)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env


class DecodeStream:
    """Text deltas for a stream of token ids, never emitting half a UTF-8 character.

    Decodes a short window of recent tokens and releases only text that is complete: while the
    window's text ends in U+FFFD (an incomplete byte sequence) nothing is emitted, and the bytes
    are released once the character's last token arrives.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this have been emitted

    def step(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self._ids.append(int(token_id))
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (invalid bytes as U+FFFD)."""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]
