"""Text the other peer chose, made safe to show a person.

A peer's text (a tag, a description, an error message, a denial reason, a request's
reason) may carry terminal escape sequences that recolour, clear or retitle the terminal,
hyperlinks hidden in OSC sequences, carriage returns and backspaces that overwrite what was
printed, bidi overrides that reorder it, or zero-width characters that hide it. Every such
text passes through :func:`printable` before it reaches a repr, a table, a log line meant
for people or an exception message.
"""

from __future__ import annotations

import re
import reprlib

ELLIPSIS = "…"
_ESCAPE_SEQUENCE = re.compile(
    r"""
    (?:\x1b\[|\x9b) [\x30-\x3f]* [\x20-\x2f]* [\x40-\x7e]?      # CSI: colours, cursor, erase
  | (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]) [^\x07\x1b\x9c]*     # OSC, DCS, SOS, PM, APC ...
        (?:\x07|\x1b\\|\x9c)?                                    # ... up to their terminator
  | \x1b [\x20-\x2f]* [\x30-\x7e]?                               # any other escape
    """,
    re.VERBOSE,
)
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 200


def printable(text: object, limit: int, *, multiline: bool = False) -> str:
    """``text`` without control or invisible characters, at most ``limit`` characters.

    Escape sequences (ESC or CSI and all their parameters, OSC up to its terminator) are
    removed whole; every other character ``str.isprintable`` refuses (C0 and C1 controls
    such as BEL, backspace and DEL, bidi overrides and isolates, zero-width and other
    format characters, surrogates, private-use and unassigned code points) is removed.
    Line breaks (CR included) become a space, or a newline when ``multiline``; a tab
    becomes a space unless ``multiline``; other spaces become a plain space. Longer text is
    cut with an ellipsis. Anything not a ``str`` is shown by a short ``repr``.
    """
    limit = max(1, limit)
    raw = text if isinstance(text, str) else _SHORT.repr(text)
    if raw.isprintable() and len(raw) <= limit:
        return raw  # the common case: nothing to do
    cleaned = _ESCAPE_SEQUENCE.sub("", raw)
    kept: list[str] = []
    for index, ch in enumerate(cleaned):
        if len(kept) > limit:
            break
        piece = _character(ch, cleaned[index - 1] if index else "", multiline)
        if piece:
            kept.append(piece)
    if len(kept) > limit:
        return "".join(kept[: limit - 1]) + ELLIPSIS
    return "".join(kept)


def _character(ch: str, previous: str, multiline: bool) -> str:
    """What one character becomes: itself, a space, a newline, a tab or nothing."""
    if ch.isprintable():
        return ch
    if ch in _LINE_BREAKS:
        if ch == "\n" and previous == "\r":
            return ""  # CR LF: one break, already made for the CR
        return "\n" if multiline else " "
    if ch == "\t":
        return "\t" if multiline else " "
    if ch.isspace():
        return " "
    return ""
