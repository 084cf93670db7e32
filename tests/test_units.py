"""The systemd units in contrib/: what they must say for the daemons to behave under systemd.

No systemd runs here, so the units are read, their directives checked against what the daemons
need, and, where `systemd-analyze` is installed, verified by systemd's own parser.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import cannot_run

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
BIN = Path(__file__).resolve().parent.parent / "bin"


def directives(unit: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, in order (systemd allows a key more than once)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict[str, dict[str, list[str]]], key: str) -> str:
    (value,) = unit["Service"][key]
    return value


def environment(unit: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    pairs = [v.partition("=") for v in unit["Service"].get("Environment", [])]
    return {k: v for k, _, v in pairs}


def test_the_worker_unit_gives_the_worker_its_cgroup_and_a_drain() -> None:
    unit = directives(CONTRIB / "banyan-worker.service")
    # Without delegation the worker cannot make a cgroup per job (systemd owns the tree).
    assert one(unit, "Delegate") == "yes"
    # SIGTERM to the worker alone drains it; its jobs are not signalled by systemd.
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "KillSignal") == "SIGTERM"
    assert one(unit, "TimeoutStopSec")  # a drain gets time before systemd kills everything
    assert Path(one(unit, "ExecStart").split()[0]).name == "banyan-worker"
    env = environment(unit)
    assert env["BANYAN_HOME"] == f"/var/lib/{one(unit, 'StateDirectory')}"
    assert "BANYAN_BROKER" in env
    assert one(unit, "Restart") == "on-failure"


def test_the_broker_unit_keeps_its_state_in_its_home() -> None:
    unit = directives(CONTRIB / "banyan-broker.service")
    assert Path(one(unit, "ExecStart").split()[0]).name == "banyan-broker"
    assert environment(unit)["BANYAN_HOME"] == f"/var/lib/{one(unit, 'StateDirectory')}"
    assert one(unit, "KillSignal") == "SIGTERM"
    assert one(unit, "UMask") == "0077"  # keys and state readable by the broker's account only


@pytest.mark.parametrize("name", ["banyan-broker.service", "banyan-worker.service"])
def test_systemd_reads_the_unit_without_a_complaint(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        cannot_run("systemd-analyze is not installed")
    # The programs as installed here, so that systemd can check that ExecStart exists.
    text = (
        (CONTRIB / name).read_text().replace("/usr/local/bin/", f"{Path(sys.executable).parent}/")
    )
    (tmp_path / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done


def test_every_program_a_unit_starts_exists() -> None:
    for unit in CONTRIB.glob("*.service"):
        program = Path(one(directives(unit), "ExecStart").split()[0]).name
        assert (BIN / program).exists(), unit
