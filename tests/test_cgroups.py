"""The worker's advice about slow cgroup joins, and its cleanup of what dead workers left (the
cgroup per job itself is tested through the runner and the fault scenarios)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from banyan.worker import cgroups
from tests.cluster import need_cgroups, wait_for


@pytest.mark.parametrize(
    ("features", "options", "slow"),
    [
        ("nsdelegate\nfavordynmods\nmemory_localevents\n", ["rw", "nsdelegate"], True),
        ("nsdelegate\nfavordynmods\n", ["rw", "nsdelegate", "favordynmods"], False),
        ("nsdelegate\nmemory_localevents\n", ["rw"], False),  # an older kernel: no remedy
    ],
)
def test_remount_hint_names_the_mount(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, features: str, options: list[str], slow: bool
) -> None:
    path = tmp_path / "features"
    path.write_text(features)
    monkeypatch.setattr(cgroups, "_mount", lambda: ("/sys/fs/cgroup/w", "/sys/fs/cgroup", options))
    hint = "mount -o remount,favordynmods /sys/fs/cgroup"
    assert cgroups.remount_hint(str(path)) == (hint if slow else None)


def test_no_advice_without_cgroup2_or_the_features_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "features"
    path.write_text("favordynmods\n")
    monkeypatch.setattr(cgroups, "_mount", lambda: None)
    assert cgroups.remount_hint(str(path)) is None
    monkeypatch.setattr(cgroups, "_mount", lambda: ("/a", "/", ["rw"]))
    assert cgroups.remount_hint(str(tmp_path / "missing")) is None


def test_a_new_worker_removes_what_dead_workers_left() -> None:
    need_cgroups()
    own = cgroups._hierarchy()
    assert own is not None
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    stale = os.path.join(own, f"banyan-{gone.pid}-0123abcd")
    busy = os.path.join(own, f"banyan-{gone.pid}-4567abcd")  # dead owner, a job still in it
    mine = os.path.join(own, f"banyan-{os.getpid()}-89abcdef")  # a live worker's
    other = os.path.join(own, f"banyan-probe-{gone.pid}")  # not a worker's name
    for path in (stale, os.path.join(stale, "job-1-1"), busy, mine, other):
        os.mkdir(path)
    sleeper = subprocess.Popen(["sleep", "60"])
    made: cgroups.Cgroups | None = None
    try:
        with open(os.path.join(busy, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        made = cgroups.Cgroups.make(f"{os.getpid()}-fedcba98")
        assert made is not None
        assert not os.path.exists(stale)
        assert all(os.path.isdir(p) for p in (busy, mine, other))
    finally:
        sleeper.kill()
        sleeper.wait()
        if made is not None:
            made.close()
        for path in (stale, busy, mine, other):
            wait_for(functools.partial(cgroups.remove, path), 10, what=f"{path} to be removed")
