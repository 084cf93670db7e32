"""The summary table: each scenario records one row, printed when it ends and again, all
together, at the end of the session. `BANYAN_FAULTS_REPORT=FILE` also writes the table there."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster
from tests.faults.harness import FULL, Row, orphans, table

_ROWS = pytest.StashKey[list[Row]]()


class Summary:
    """The session's rows; `add` prints the row at once, outside pytest's output capture."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.rows = config.stash.setdefault(_ROWS, [])

    def add(self, row: Row) -> None:
        self.rows.append(row)
        capture: Any = self.config.pluginmanager.getplugin("capturemanager")
        quiet = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with quiet:
            print(f"\n[faults] {' | '.join(row.cells())}", flush=True)


@pytest.fixture
def summary(request: pytest.FixtureRequest) -> Summary:
    return Summary(request.config)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A cluster not yet started (each scenario starts what it needs); every process it started
    is stopped afterwards, and no job process may be left behind."""
    c = Cluster(tmp_path)
    monkeypatch.setenv("BANYAN_HOME", str(c.home))
    try:
        yield c
    finally:
        c.stop()
        orphans(tmp_path, grace=0)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    size = "full" if FULL else "reduced"
    terminalreporter.write_sep("=", f"fault scenarios ({size} sizes)")
    lines = table(sorted(rows, key=lambda r: r.scenario))
    for line in lines:
        terminalreporter.write_line(line)
    report = os.environ.get("BANYAN_FAULTS_REPORT")
    if report:
        Path(report).write_text("\n".join(lines) + "\n")
