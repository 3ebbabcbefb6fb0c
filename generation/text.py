"""Text from outside made safe to write on one line: a PNG's A1111 `parameters` chunk, a terminal.

    one_line("fox\nSteps: 999")        -> "fox Steps: 999"
    one_line("\x1b[2Jgone", 500)       -> " [2Jgone"

A line break in a prompt would start a new A1111 field (a forged "Negative prompt:" or "Seed:"),
and an escape sequence in an adapter's description would drive the terminal of whoever lists it.
Floor: part of generation/, standard library only.
"""

from __future__ import annotations

import unicodedata

# Control characters (C0, DEL, C1: newline, ESC, NEL, CSI ...) and the Unicode line and paragraph separators.
_BREAKING_CATEGORIES = {"Cc", "Zl", "Zp"}


def one_line(text: str, max_chars: int | None = None) -> str:
    """`text` with every control character and line separator replaced by a space, cut to `max_chars`."""
    cleaned = "".join(" " if unicodedata.category(c) in _BREAKING_CATEGORIES else c for c in text)
    if max_chars is not None and len(cleaned) > max_chars:
        return cleaned[: max_chars - 1] + "…"
    return cleaned
