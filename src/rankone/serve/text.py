"""Generated tokens to text: end-of-sequence, stop strings, and safe pieces for streaming.

The text of a response is always `tok.decode(generated ids, skip_special_tokens=True)`, as in
`rankone generate`, cut before the first stop string. A stream sends pieces of that same text:
it holds back an incomplete character (a multi-byte character split over tokens decodes to
U+FFFD until its last byte arrives) and any tail that could still become a stop string, so the
pieces always add up to the final text.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextTracker:
    """Follows one row's generated ids; `push` says what to send and whether the row is done."""

    def __init__(self, tok: Any, max_tokens: int, stop: list[str]) -> None:
        self.tok = tok
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.eos = tok.eos_token_id
        self.ids: list[int] = []
        self.text = ""  # the text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already sent
        self.finish: str | None = None  # "stop" | "length" once done

    def push(self, token: int) -> str:
        """Take one generated token; return the new text that is safe to send."""
        if self.finish is not None:
            return ""
        if self.eos is not None and token == self.eos:
            self.finish = "stop"
            return self._flush()
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.text, self.finish = text[:cut], "stop"
            return self._flush()
        self.text = text
        if len(self.ids) >= self.max_tokens:
            self.finish = "length"
            return self._flush()
        safe = len(text)
        while safe > self.sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        safe -= self._held_for_stop(text[:safe])
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent:safe], safe
        return piece

    def _flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
