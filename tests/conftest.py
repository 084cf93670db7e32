from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A real broker subprocess on loopback ports (workers are started by each test).

    BANYAN_HOME points at the cluster's home, so in-process tools find its keys."""
    c = Cluster(tmp_path)
    monkeypatch.setenv("BANYAN_HOME", str(c.home))
    c.start_broker()
    try:
        yield c
    finally:
        c.stop()
