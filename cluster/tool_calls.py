"""Kimi-K2's tool-call section in generated text -> OpenAI ``tool_calls``. Plain Python.

K2 writes its calls after any plain content, as special tokens around each call::

    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>
      ...
    <|tool_calls_section_end|>

The call id is ``functions.NAME:IDX``; tidal returns it unchanged as the OpenAI call id, so a
client that sends the assistant message back and answers with ``tool_call_id`` gives the chat
template the id K2 wrote. ``ToolCallParser`` reads the text as it streams (deltas of any size,
split anywhere, even inside a marker) and yields content and OpenAI-style call deltas: the
first delta of a call carries its id and name, later ones argument fragments.

Malformed output never fails a request, it becomes text. While no call has been announced, the
whole section (from its begin marker) falls back to content when it breaks the format (a bad
id, stray text between calls, a missing marker before the text ends). Once a call has gone out
it cannot be taken back: whatever breaks the format after it is content from there on. The same
parser runs for streamed and whole answers, so both give the same result for the same text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

SECTION_BEGIN = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")  # K2 writes both
SECTION_END = ("<|tool_calls_section_end|>", "<|tool_call_section_end|>")
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS = (*SECTION_BEGIN, *SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)

_CALL_ID = re.compile(r"functions\.([A-Za-z0-9_\-.]+?):(\d+)")
MAX_HEADER_LEN = 256  # a call's id and the whitespace around it; longer is not a call


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call ``index`` (position in ``tool_calls``): the first piece of a call has
    ``id`` and ``name``; the others carry argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    """A whole call, in OpenAI's ``message.tool_calls[i]`` shape by ``to_openai``."""

    id: str
    name: str
    arguments: str = ""

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class _State(Enum):
    CONTENT = "content"  # plain text, watching for the section's begin marker
    SECTION = "section"  # inside the section, between calls
    HEADER = "header"  # after a call's begin marker, reading its id
    ARGUMENTS = "arguments"  # after the argument marker, until the call's end marker
    TEXT = "text"  # the section is over (closed or broken): everything is content


@dataclass
class Parsed:
    """What one ``feed``/``finish`` produced."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def parse_call_id(text: str) -> tuple[str, str] | None:
    """``functions.NAME:IDX`` (surrounding whitespace allowed) -> (id, name), or None."""
    m = _CALL_ID.fullmatch(text.strip()) if len(text) <= MAX_HEADER_LEN else None
    return (m.group(0), m.group(1)) if m else None


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def _find_first(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    hits = [(at, m) for m in markers if (at := text.find(m)) >= 0]
    return min(hits) if hits else None


class ToolCallParser:
    """Incremental parser of one choice's text: ``feed`` deltas, then ``finish`` once."""

    def __init__(self) -> None:
        self._state = _State.CONTENT
        self._buf = ""  # text not yet handled (at most a partial marker, or a call header)
        self._section_raw = ""  # the section's text so far, replayed as content if it breaks
        self.calls: list[ToolCall] = []

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str) -> Parsed:
        """Take a text delta; the content and call deltas that are now certain."""
        out = Parsed()
        self._buf += text
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> Parsed:
        """The text ended: flush what was held back; an unclosed section that announced no
        call becomes content."""
        out = Parsed()
        while self._step(out, final=True):
            pass
        if self._state is _State.SECTION and self.calls and not self._buf.strip():
            self._buf = ""  # calls done, only the end marker missing
        elif self._state in (_State.SECTION, _State.HEADER):
            self._break(out)
        out.content += self._buf
        self._buf = ""
        return out

    # ---- one transition per call; True while it made progress -----------------------------
    def _step(self, out: Parsed, final: bool) -> bool:
        if self._state is _State.TEXT:
            out.content += self._buf
            self._buf = ""
            return False
        if self._state is _State.CONTENT:
            return self._in_content(out, final)
        if self._state is _State.SECTION:
            return self._in_section(out)
        if self._state is _State.HEADER:
            return self._in_header(out)
        return self._in_arguments(out, final)

    def _in_content(self, out: Parsed, final: bool) -> bool:
        hit = _find_first(self._buf, SECTION_BEGIN)
        if hit is None:
            keep = 0 if final else _partial_marker_len(self._buf, SECTION_BEGIN)
            out.content += self._buf[: len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        at, marker = hit
        out.content += self._buf[:at]
        self._section_raw = marker
        self._buf = self._buf[at + len(marker) :]
        self._state = _State.SECTION
        return True

    def _in_section(self, out: Parsed) -> bool:
        stripped = self._buf.lstrip()
        for marker in SECTION_END:
            if stripped.startswith(marker):
                self._consume(len(self._buf) - len(stripped) + len(marker))
                self._break(out)  # closed: after calls nothing to replay; empty, all text
                return True
        if stripped.startswith(CALL_BEGIN):
            self._consume(len(self._buf) - len(stripped) + len(CALL_BEGIN))
            self._state = _State.HEADER
            return True
        if stripped and not any(m.startswith(stripped) for m in (*SECTION_END, CALL_BEGIN)):
            self._break(out)  # text between calls: not K2's format
            return True
        return False  # only whitespace or part of a marker so far

    def _in_header(self, out: Parsed) -> bool:
        at = self._buf.find(ARGUMENT_BEGIN)
        other = _find_first(self._buf, tuple(m for m in MARKERS if m != ARGUMENT_BEGIN))
        if other is not None and (at < 0 or other[0] < at):
            self._break(out)  # another marker before the arguments began
            return True
        if at < 0:
            held = len(self._buf) - _partial_marker_len(self._buf, (ARGUMENT_BEGIN,))
            if held > MAX_HEADER_LEN:  # no id is this long: this is not a call
                self._break(out)
                return True
            return False
        parsed = parse_call_id(self._buf[:at])
        if parsed is None:
            self._break(out)
            return True
        call_id, name = parsed
        self._consume(at + len(ARGUMENT_BEGIN))
        self.calls.append(ToolCall(call_id, name))
        out.calls.append(ToolCallDelta(len(self.calls) - 1, call_id, name))
        self._state = _State.ARGUMENTS
        return True

    def _in_arguments(self, out: Parsed, final: bool) -> bool:
        hit = _find_first(self._buf, MARKERS)
        if hit is None:
            keep = 0 if final else _partial_marker_len(self._buf, MARKERS)
            self._arguments(out, self._buf[: len(self._buf) - keep])
            return False
        at, marker = hit
        self._arguments(out, self._buf[:at])
        if marker != CALL_END:
            self._break(out)  # the call never ended: the rest is text
            return True
        self._consume(len(marker))  # the arguments before it are consumed already
        self._state = _State.SECTION
        return True

    # ---- helpers ----------------------------------------------------------------------------
    def _arguments(self, out: Parsed, text: str) -> None:
        if not text:
            return
        self._consume(len(text))
        self.calls[-1].arguments += text
        out.calls.append(ToolCallDelta(len(self.calls) - 1, arguments=text))

    def _consume(self, n: int) -> None:
        self._section_raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _break(self, out: Parsed) -> None:
        """The format broke: before any call, the whole section is content; after one, the
        text from here on is."""
        if not self.calls:
            out.content += self._section_raw
        self._section_raw = ""
        self._state = _State.TEXT


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole text -> (content, calls); the same answer as feeding it in any pieces."""
    parser = ToolCallParser()
    content = parser.feed(text).content + parser.finish().content
    return content, parser.calls
