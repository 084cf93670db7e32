from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A real broker subprocess on loopback ports (workers are started by each test)."""
    c = Cluster(tmp_path)
    c.start_broker()
    try:
        yield c
    finally:
        c.stop()
