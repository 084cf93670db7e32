"""The worker's advice about slow cgroup joins (the cgroup per job itself is tested through the
runner and the fault scenarios)."""

from __future__ import annotations

from pathlib import Path

import pytest

from banyan.worker import cgroups


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
