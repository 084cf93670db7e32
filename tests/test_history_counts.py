"""History's counts are a floor when bounded: never fewer jobs than the rows shown, never
missing a state of a row shown, and a page from a cursor does not call itself the newest."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan import defaults
from banyan.broker import history
from banyan.cli import status
from tests.cluster import Cluster
from tests.statekit import ALICE, Harness, spec


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def _floor_holds(page: dict[str, Any]) -> None:
    """The counts cover every row shown, state by state, and `matched` their sum."""
    shown = Counter(j["state"] for j in page["jobs"])
    for state, n in shown.items():
        assert page["counts"].get(state, 0) >= n, (state, page["counts"], shown)
    if page["matched"] is not None:
        assert page["matched"] == sum(page["counts"].values()) >= len(page["jobs"])


def test_a_bounded_window_count_includes_the_states_it_shows(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted key by key, inactive ones first: the bound ran out before the cancelled ones
    (the rows shown) were counted, and the line named only `inactive`."""
    monkeypatch.setattr(defaults, "STATUS_COUNT_KEYS", 20)
    h.submit(*(spec(hold=True) for _ in range(30)))
    late = h.submit(spec(hold=True), spec(hold=True))
    h.do(lambda c: c.cancel(ALICE, late, [], None))
    with h.store.read() as tx:
        page = history.page(tx, {"all": True, "limit": 2, "until": 1e10}, [])
    assert [j["id"] for j in page["jobs"]] == late[::-1]
    assert page["exact"] is False
    _floor_holds(page)
    assert page["counts"]["cancelled"] == 2


def test_a_name_glob_past_the_scan_bound_counts_what_it_shows(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """5 named jobs under 25,000 newer unnamed ones: the first page reads 20,000 jobs and shows
    none, the next shows the 5; the line said `at least 0 jobs: ` and `matched` was 0."""
    client = cluster.client(timeout=30)
    named = client.submit("true", array="1-5", name="x-{}", hold=True).jobs
    client.submit("true", array="1-25000", hold=True)
    broker = ["--broker", f"127.0.0.1:{cluster.client_port}"]
    capsys.readouterr()
    assert status.main([*broker, "--name", "x-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in lines[1:-1]] == named[::-1]
    assert lines[-1] == "at least 5 jobs: 5 inactive", lines[-1]
    assert status.main([*broker, "--json", "--name", "x-*"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["jobs"]) == 5 and out["next"] is None
    assert (out["matched"], out["counts"], out["exact"]) == (5, {"inactive": 5}, False)


def test_a_page_from_a_cursor_is_not_called_the_newest(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    client = cluster.client()
    ids = client.submit("true", array="1-10", hold=True).jobs
    broker = ["--broker", f"127.0.0.1:{cluster.client_port}"]
    capsys.readouterr()
    assert status.main([*broker, "--all", "--limit", "2", "--cursor", str(ids[2])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in lines[1:3]] == [ids[1], ids[0]]
    assert "newest" not in lines[-1], lines[-1]
    assert lines[-1] == f"10 jobs: 10 inactive; 2 shown, those before job {ids[2]}", lines[-1]
