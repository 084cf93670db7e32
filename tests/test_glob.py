"""Name globs: the same answers as fnmatch, in linear time."""

from __future__ import annotations

from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st

from banyan.broker.glob import matcher

PATTERN = st.text(alphabet="ab-*?[]!^\\.", max_size=12)
TEXT = st.text(alphabet="ab-[]!^\\.\n", max_size=12)


@settings(max_examples=3000, deadline=None, database=None)
@given(pattern=PATTERN, text=TEXT)
def test_a_glob_matches_as_fnmatch_does(pattern: str, text: str) -> None:
    assert matcher(pattern)(text) == fnmatchcase(text, pattern), (pattern, text)


def test_the_usual_globs() -> None:
    cases = [
        ("seed-*", "seed-17", True),
        ("seed-*", "sweep-1", False),
        ("*.csv", "data/x.csv", True),
        ("a*b*c", "a-c-b", False),
        ("a*b*c", "axxbyyc", True),
        ("job-[0-9][!x]", "job-7y", True),
        ("job-[0-9][!x]", "job-7x", False),
        ("[", "[", True),
        ("*", "", True),
        ("?", "", False),
    ]
    for pattern, text, expected in cases:
        assert matcher(pattern)(text) is expected, (pattern, text)


def test_many_stars_against_a_long_name_do_not_backtrack() -> None:
    """fnmatch's regular expression takes seconds on this (`.*a` sixty times, then `b`);
    pieces found leftmost take one pass. The test's own time bound catches a regression."""
    pattern = "*a" * 60 + "*b"
    names = ["a" * 256] * 2000
    assert not any(matcher(pattern)(name) for name in names)
    assert matcher(pattern)("a" * 255 + "b")
