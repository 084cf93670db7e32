"""`make demo` end to end: its script exits 0 and the final status shows the expected outcomes."""

from __future__ import annotations

import subprocess
import sys

from tests.cluster import scaled


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
    final = out[out.index("$ banyan-status --all") :]
    assert "cancelled by" in final and "not needed after all" in final
    assert final.count("success: exit 0") == 22  # 20 sweep jobs, reduce, flaky
    assert "flaky" in final and "2/2" in final
    assert "$ banyan-workers" in out and "node-a" in out and "node-b" in out
    assert "$ banyan-stats" in out and "queue wait" in out
