"""Untrusted text on a terminal, and text that is not text.

Free text (an author, a reason, a prompt from a requests file, a model's name) is stored exactly as
given and escaped only where it is shown: `shown` turns every character a terminal would act on
(newlines, carriage returns, ESC and the rest of C0 and C1, DEL, the bidirectional overrides and
invisible separators) into a visible escape such as `\\n` or `\\x1b`, so that one stored value is
one line on the screen and can neither draw a fake log row nor clear the screen.

`check_text` refuses strings that hold bytes which were not UTF-8 (Python hands them over as lone
surrogates, which tokenizers and SQLite reject with a traceback).
"""

from __future__ import annotations

import re
from typing import Any

from rankone.core.errors import RankoneError

# C0 controls (tab and newline included), DEL, C1 controls, and the Unicode format characters that
# reorder or hide text: bidi embeddings/overrides/isolates, line and paragraph separators, zero-width ones.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
                     "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def shown(value: Any, lines: bool = False) -> str:
    """`value` as text that a terminal prints as it reads, on one line (None: ''). With `lines`,
    newlines and tabs stay as they are (a model's generated text), the rest is still escaped."""
    if value is None:
        return ""
    return _UNSAFE.sub(lambda m: m.group() if lines and m.group() in "\n\t" else _escape(m), str(value))


def is_clean_unicode(text: str) -> bool:
    """False when `text` holds lone surrogates: bytes that were not UTF-8 (argv, surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, what: str) -> str:
    """`text`, or one line saying that `what` holds bytes that are not UTF-8."""
    if not is_clean_unicode(text):
        bad = next(i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff")
        raise RankoneError(f"{what} holds bytes that are not UTF-8 (at character {bad}: {shown(text[max(0, bad - 20):bad + 1])}); "
                           "give UTF-8 text")
    return text
