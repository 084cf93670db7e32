"""Every benchmark runs at --quick size and writes its report. No timing is asserted: these
prove the benchmarks work, `make bench` measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
FIGURE_KEYS = {"name", "value", "unit", "reference", "reference_value", "ratio", "target", "met"}
REPORT_KEYS = {"bench", "quick", "repeat", "params", "figures", "runs", "notes", "machine"}

# Each benchmark, and a figure its report must carry.
EXPECTED = {
    "throughput": "W1 throughput",
    "latency": "W2 submit→finish p99",
    "start_cost": "start, spawn: worker CPU per job",
    "overhead": "W3 overhead over ideal",
    "submit_rate": "submits/s, sync x4",
    "broker_cpu": "broker CPU per submit, pipelined",
    "claim_scaling": "claim via Core.match, 20,000 queued",
    "many_workers": "false losses (worst run)",
    "restart": "restart to status, 20,000 jobs",
    "soak": "store file after 40,000 jobs",
    "futures_map": "calls/s, a job each",
    "snakemake_workflow": "job end -> next job submitted, p99",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick(name: str, tmp_path: Path) -> None:
    argv = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--repeat", "1"]
    done = subprocess.run(
        [*argv, "--out", str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["bench"] == name and report["quick"] is True
    assert len(report["runs"]) == 1
    names = [f["name"] for f in report["figures"]]
    assert EXPECTED[name] in names
    for figure in report["figures"]:
        assert set(figure) == FIGURE_KEYS
        assert isinstance(figure["value"], (int, float))
