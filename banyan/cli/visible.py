"""Text that other people and jobs wrote, made safe to show on a terminal.

Job names, commands, directories, environments, cancel reasons, group names, worker names,
tags and hosts come from other users; progress and output come from jobs. Printed as they
are, an escape sequence in them acts on the reader's terminal: it clears the screen, moves
the cursor to hide or forge rows, sets the window title, or writes the clipboard (OSC 52).
`visible` shows each control character as an escape instead (`\\x1b`, `\\n`, `\\u202e`), so
the text reads as what it is and a table row stays one row. `--json` needs none of this:
JSON escapes control characters itself.
"""

from __future__ import annotations

import re

# C0 controls (newline and tab too: a cell or a log line is one line), DEL and C1 controls,
# and the Unicode line separators and bidirectional controls, which reorder what a terminal
# shows ("Trojan Source").
_UNICODE = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_UNICODE}]")
_BUT_TAB = re.compile(f"[\x00-\x08\x0a-\x1f\x7f-\x9f{_UNICODE}]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, tabs: bool = False) -> str:
    """`text` with every control character shown as an escape; with `tabs`, tabs stay (a
    job's output lines, where they line up columns and can hide nothing)."""
    if text.isprintable():  # the common case, and a fast one
        return text
    return (_BUT_TAB if tabs else _CONTROL).sub(_escape, text)
