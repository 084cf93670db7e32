"""Every benchmark runs at --quick size and writes its report. No timing is asserted: these
prove the benchmarks work, `make bench` measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
}


# W1-W3 also run Celery + Redis and HyperQueue, where `make bench-peers-setup` made them ready
# (a stamp in bench/peers/.venv); their figures against Banyan, in the same rounds.
PEERS = {"celery": "Celery + Redis", "hyperqueue": "HyperQueue"}
PEER_FIGURES = {
    "throughput": "W1 throughput vs {}",
    "latency": "W2 submit→finish p50 vs {}",
    "overhead": "W3 overhead vs {}",
}


def run_quick(name: str, out: Path, *flags: str) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--repeat", "1", *flags]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return report


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick(name: str, tmp_path: Path) -> None:
    # The peers have their own test below; here each benchmark runs Banyan alone.
    report = run_quick(name, tmp_path, *(["--peers", "none"] if name in PEER_FIGURES else []))
    assert set(report) >= REPORT_KEYS
    assert report["bench"] == name and report["quick"] is True
    assert len(report["runs"]) == 1
    names = [f["name"] for f in report["figures"]]
    assert EXPECTED[name] in names
    for figure in report["figures"]:
        assert set(figure) == FIGURE_KEYS
        assert isinstance(figure["value"], (int, float))


@pytest.mark.timeout(180)  # the peers' services start too
@pytest.mark.parametrize("name", sorted(PEER_FIGURES))
def test_quick_peers(name: str, tmp_path: Path) -> None:
    """The peers are benchmark-only extras: where the bench's setup has not made one ready (CI
    never runs it), there is nothing to test. Where it has, they must run (namespaces and all)."""
    ready = [p for p in PEERS if (BENCH / "peers" / ".venv" / f".ready-{p}").exists()]
    if not ready:
        pytest.skip("no peer set up (make bench-peers-setup)")
    report = run_quick(name, tmp_path, "--peers", ",".join(ready))
    assert report["params"]["peers"] == ready
    names = {f["name"]: f for f in report["figures"]}
    for peer in ready:
        figure = names[PEER_FIGURES[name].format(PEERS[peer])]
        assert figure["reference_value"] > 0 and figure["ratio"] > 0
        if name == "overhead":  # the peer really waited for its jobs, on 2 slots at most
            wall = names[f"W3 wall time, {PEERS[peer]}"]
            assert wall["value"] >= wall["reference_value"]
    assert any("durable as run" in note for note in report["notes"])
