"""Shell globs (`*`, `?`, `[...]`, `[!...]`, as fnmatch) matched in linear time.

fnmatch makes a regular expression with one `.*` per star, and Python's regular expressions
backtrack: `*a*a*a...*b` against a long name of a's takes seconds, and a broker matches one
against thousands of names in a turn. Split at its stars, a glob is a row of fixed-length
pieces: the first must start the text, the last must end it, and each one between is found,
leftmost, after the one before; leftmost is always as good as any later place, so nothing is
ever tried twice."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable


def _pieces(pattern: str) -> list[list[str]]:
    """The glob's pieces between stars, each a list of one-character regular expressions."""
    pieces: list[list[str]] = [[]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            pieces.append([])
        elif c == "?":
            pieces[-1].append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                pieces[-1].append(re.escape(c))  # no closing bracket: a plain '['
                continue
            pieces[-1].append(_one_of(pattern[i - 1 : j + 1]))
            i = j + 1
        else:
            pieces[-1].append(re.escape(c))
    return pieces


def _one_of(bracket: str) -> str:
    """A `[...]` as fnmatch translates it (its escapes, negation and ranges): one character."""
    translated = fnmatch.translate(bracket)
    inner = re.fullmatch(r"\(\?s:(.*)\)\\[Zz]", translated, re.DOTALL)
    assert inner is not None, translated  # fnmatch's form since Python 3.7
    return inner.group(1)


@functools.lru_cache(maxsize=64)
def matcher(pattern: str) -> Callable[[str], bool]:
    """A test of whole texts against `pattern`, as fnmatch.fnmatchcase."""
    pieces = [(len(p), re.compile("".join(p), re.DOTALL)) for p in _pieces(pattern)]
    if len(pieces) == 1:
        ((_, whole),) = pieces
        return lambda text: whole.fullmatch(text) is not None
    (head_len, head), *middle, (tail_len, tail) = pieces

    def match(text: str) -> bool:
        end = len(text) - tail_len
        if end < head_len or not head.match(text, 0, head_len):
            return False
        if not tail.fullmatch(text, end):
            return False
        at = head_len
        for size, piece in middle:
            if size == 0:
                continue
            found = piece.search(text, at, end)
            if found is None:
                return False
            at = found.end()
        return True

    return match
