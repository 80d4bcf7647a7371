"""The demo's readable lines: aligned columns, a mark per kind of line, colour only on a terminal."""

from __future__ import annotations

import os
from typing import Final, TextIO

_STYLES: Final = {"green": "32", "yellow": "33", "red": "31", "magenta": "35", "cyan": "36", "dim": "2", "bold": "1"}

#: kind -> (mark, ASCII fallback, style) of the lines about one change.
_MARKS: Final = {
    "queued": ("→", "->", "dim"),
    "succeeded": ("✔", "ok", "green"),
    "retrying": ("↻", "..", "yellow"),
    "failed": ("✘", "xx", "red"),
    "superseded": ("≈", "~~", "dim"),
    "refused": ("⊘", "!!", "magenta"),
    "duplicate": ("≡", "==", "cyan"),
}


class Printer:
    """The demo's readable lines: aligned columns, colour only on a terminal (and not under NO_COLOR)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        try:
            self.colour = bool(out.isatty()) and "NO_COLOR" not in os.environ
        except (AttributeError, OSError, ValueError):  # a closed or unusual stream is no terminal
            self.colour = False
        # A terminal or pipe that cannot show the marks (a Latin-1 locale) gets ASCII ones.
        try:
            "".join(mark for mark, _, _ in _MARKS.values()).encode(getattr(out, "encoding", None) or "utf-8")
            self.unicode = True
        except (UnicodeEncodeError, LookupError):
            self.unicode = False

    def paint(self, text: str, style: str) -> str:
        return f"\x1b[{_STYLES[style]}m{text}\x1b[0m" if self.colour else text

    def line(self, text: str = "", style: str | None = None) -> None:
        self.out.write((self.paint(text, style) if style else text) + "\n")
        self.out.flush()

    def heading(self, text: str) -> None:
        self.line()
        self.line(text, "bold")

    def note(self, text: str) -> None:
        self.line(f"    {text}", "dim")

    def change(self, kind: str, operation: str, subject: str, detail: str) -> None:
        """One line about one change: mark and kind, operation, subject, then what happened."""
        mark, ascii_mark, style = _MARKS[kind]
        head = self.paint(f"{mark if self.unicode else ascii_mark} {kind:<10}", style)
        self.line(f"  {head} {operation:<7} {subject:<26} {detail}".rstrip())
