"""`make demo` end to end: its script exits 0 and the final status shows the expected outcomes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from banyan.demo import ENDS
from tests.cluster import scaled


@pytest.mark.timeout(180)  # 15-25 s; the demo is given 120
def test_demo_runs_the_whole_workflow() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "banyan.demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=scaled(120),
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:]
    assert "demo finished: every outcome as expected" in out
    final = out[out.index("$ banyan-status --all") : out.index("$ banyan-workers")]
    table = [line.split() for line in final.splitlines()[2:]]
    rows = {cols[1]: " ".join(cols) for cols in table if len(cols) > 6 and cols[0].isdigit()}
    assert set(rows) == set(ENDS), final
    for name, end in ENDS.items():
        if end == "success":
            assert " terminated " in rows[name] and "success: exit 0" in rows[name], rows[name]
        else:
            assert " cancelled " in rows[name] and "not needed after all" in rows[name]
    assert final.count("success: exit 0") == list(ENDS.values()).count("success")
    assert " 2/2 " in rows["flaky"]
    assert "$ banyan-workers" in out and "node-a" in out and "node-b" in out
    assert "$ banyan-stats" in out and "queue wait" in out
