"""Output text for the ingress: the tokenizer's incremental detokenizer plus stop strings.

``TextStream`` turns token ids into text deltas as they arrive (``Tokenizer.decode_stream``
never releases half a UTF-8 character). Stop strings are matched on the text; text that might
be the start of a stop string is held back until it is not, so a stop string never reaches the
client, even split across tokens.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Token ids in, text deltas out; ``is_stopped`` once a stop string matched."""

    def __init__(self, tokenizer: Any, stop: list[str] = ()) -> None:
        self._decoder = tokenizer.decode_stream()
        self._stops = list(stop)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""  # decoded text not yet released
        self.is_stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; the text that is now safe to send."""
        if self.is_stopped:
            return ""
        self._text += "".join(self._decoder.step(t) for t in token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        if self.is_stopped:
            return ""
        self._text += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [at for at in (self._text.find(s) for s in self._stops) if at >= 0]
        if hits:
            out, self._text = self._text[: min(hits)], ""
            self.is_stopped = True
            return out
        keep = 0 if final else self._hold
        n = max(len(self._text) - keep, 0)
        out, self._text = self._text[:n], self._text[n:]
        return out
