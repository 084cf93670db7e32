"""The suite's own rules: a test that cannot run its real scenario skips only through
tests.cluster.cannot_run, which fails it under CI instead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cluster import cannot_run, shrunk

TESTS = Path(__file__).parent
# Every other way to skip or give up: pytest.skip, the skip and skipif marks, importorskip,
# and xfail (which turns a failure into a pass).
SKIPS = re.compile(r"pytest\.(skip\b|importorskip|xfail)|mark\.(skip|skipif|xfail)\b")


def test_nothing_skips_around_the_ci_rule() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{n}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name not in ("cluster.py", Path(__file__).name)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if SKIPS.search(line)
    ]
    assert not found, "skips that CI would not see (use tests.cluster.cannot_run):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize("ci", ["1", "true"])
def test_under_ci_a_test_that_cannot_run_fails(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI must run this test's real scenario"):
        cannot_run("no such thing here")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test's whole scenario"):
        shrunk("half of it is left out")


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_elsewhere_it_skips(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no such thing here"):
        cannot_run("no such thing here")
    shrunk("half of it is left out")  # goes on
