"""The worker's spool retention: old output goes, and the oldest first when the disk is low."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from banyan.worker import accounts
from banyan.worker.spool import Spool, SpoolPolicy
from tests.cluster import ALLOW_ROOT, Cluster, wait_for

DAY = 86400.0
NOW = 1_700_000_000.0


def make(spool: Path, job: int, attempt: int, age: float, size: int = 10, cwd: bool = False):
    """A stem's output files (and working directory), last changed `age` seconds before NOW."""
    paths = [spool / f"{job}.{attempt}.out", spool / f"{job}.{attempt}.err"]
    for p in paths:
        p.write_bytes(b"x" * size)
    if cwd:
        d = spool / f"{job}.{attempt}"
        (d / "deep" / "deeper").mkdir(parents=True)
        (d / "deep" / "deeper" / "result.csv").write_text("1,2\n")
        paths += [d / "deep" / "deeper" / "result.csv", d / "deep" / "deeper", d / "deep", d]
    for p in paths:
        os.utime(p, (NOW - age, NOW - age), follow_symlinks=False)


def names(spool: Path) -> set[str]:
    return {p.name for p in spool.iterdir()}


def step_until_idle(spool: Spool, busy: set[int], budget: float = 1.0) -> int:
    """Steps (of `budget` seconds each) until a pass has run and finished."""
    for n in range(1, 10_000):
        spool.step(float(n), NOW, busy, budget)
        if spool._work is None:
            return n
    raise AssertionError("the spool never finished its pass")


def test_output_older_than_the_retention_goes_unless_its_job_is_busy(tmp_path: Path):
    d = tmp_path / "spool"
    d.mkdir()
    make(d, 1, 1, 8 * DAY, cwd=True)  # old: goes, directory tree and all
    make(d, 2, 1, 8 * DAY)  # old, but its result is not acknowledged yet
    make(d, 3, 2, 6 * DAY)  # younger than the retention
    make(d, 4, 1, 8 * DAY)
    os.utime(d / "4.1.err", (NOW - DAY, NOW - DAY))  # its newest part is a day old
    (d / "notes.txt").write_text("not ours")
    os.utime(d / "notes.txt", (NOW - 90 * DAY, NOW - 90 * DAY))
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "file").write_text("keep")
    make(d, 5, 1, 8 * DAY, cwd=True)
    (d / "5.1" / "dir-link").symlink_to(outside / "sub")  # a job's links out of its directory
    (d / "5.1" / "file-link").symlink_to(outside / "sub" / "file")
    os.utime(d / "5.1", (NOW - 8 * DAY, NOW - 8 * DAY))
    spool = Spool(str(d), SpoolPolicy(retention=7 * DAY, min_free=0))
    step_until_idle(spool, busy={2})
    assert names(d) == {"2.1.out", "2.1.err", "3.2.out", "3.2.err", "4.1.out", "4.1.err"} | {
        "notes.txt"
    }
    assert (outside / "sub" / "file").read_text() == "keep" and spool.deleted == 2


def test_each_accounts_directory_is_kept_tidy_and_its_links_lead_nowhere(tmp_path: Path):
    d = tmp_path / "spool"
    alice, bob = d / "alice", d / "bob"
    alice.mkdir(parents=True)
    bob.mkdir()
    make(alice, 1, 1, 8 * DAY, cwd=True)  # old: goes
    make(bob, 2, 1, 6 * DAY, cwd=True)  # young: stays
    make(d, 3, 1, 8 * DAY)  # a spool from before accounts had directories: goes too
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "file").write_text("keep")
    make(alice, 4, 1, 8 * DAY)
    (alice / "4.1").symlink_to(outside)  # the account's own link where a job directory goes
    (alice / "5.1.out").symlink_to(outside / "sub" / "file")
    for link in (alice / "4.1", alice / "5.1.out"):
        os.utime(link, (NOW - 8 * DAY, NOW - 8 * DAY), follow_symlinks=False)
    spool = Spool(str(d), SpoolPolicy(retention=7 * DAY, min_free=0))
    step_until_idle(spool, busy=set())
    assert names(d) == {"alice", "bob"} and names(alice) == set()
    assert names(bob) == {"2.1", "2.1.out", "2.1.err"}
    assert (outside / "sub" / "file").read_text() == "keep" and spool.deleted == 4


def test_a_link_swapped_in_for_a_jobs_directory_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The account owns its directory in the spool, so its job may swap its own job directory
    for a link just after the worker looked at it; the deletion must not follow it."""
    d = tmp_path / "spool" / "alice"
    d.mkdir(parents=True)
    make(d, 1, 1, 8 * DAY, cwd=True)
    outside = tmp_path / "precious"
    (outside / "deep" / "deeper").mkdir(parents=True)
    (outside / "deep" / "deeper" / "result.csv").write_text("keep")
    target, real_lstat, swapped = str(d / "1.1"), os.lstat, []

    def lstat_then_swap(path: Any, *args: Any, **kw: Any) -> os.stat_result:
        st = real_lstat(path, *args, **kw)
        if os.fspath(path) == target:
            swapped.append(True)
        if len(swapped) == 2:  # the look just before deleting its tree
            swapped.append(True)
            os.rename(target, tmp_path / "moved")  # the job wins the race here
            os.symlink(outside, target)
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    spool = Spool(str(d.parent), SpoolPolicy(retention=7 * DAY, min_free=0))
    step_until_idle(spool, busy=set())
    monkeypatch.undo()
    assert len(swapped) == 3  # it did swap
    assert (outside / "deep" / "deeper" / "result.csv").read_text() == "keep"
    assert names(d) == {"1.1"} and (d / "1.1").is_symlink()  # new: it goes when it is old


def test_the_work_goes_a_slice_at_a_time(tmp_path: Path):
    d = tmp_path / "spool"
    d.mkdir()
    for job in range(1, 41):
        make(d, job, 1, 8 * DAY, cwd=job % 2 == 0)
    spool = Spool(str(d), SpoolPolicy(retention=7 * DAY, min_free=0))
    steps = step_until_idle(spool, busy=set(), budget=0.0)  # one item a step
    assert steps > 40 and names(d) == set()


def test_a_low_disk_makes_room_oldest_first(tmp_path: Path):
    d = tmp_path / "spool"
    d.mkdir()
    for job, age in ((1, 3 * DAY), (2, 2 * DAY), (3, 4 * DAY), (4, 1 * DAY), (5, 5 * DAY)):
        make(d, job, 1, age, size=1000)  # 2,000 bytes a job, all younger than the retention
    capacity = 11_000  # a disk holding the spool alone: free is what the files leave

    def free(path: str) -> int:
        return capacity - sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

    spool = Spool(str(d), SpoolPolicy(retention=7 * DAY, min_free=6_000), free=free)
    spool.step(0.0, NOW, {5}, 1.0)
    assert not spool.urgent  # done in one step
    # 1,000 free, 6,000 wanted: three jobs' output goes, oldest first (3, 1, 2), but not that
    # of busy 5, the oldest of all; 4, the youngest, stays.
    assert sorted(names(d)) == ["4.1.err", "4.1.out", "5.1.err", "5.1.out"]
    assert free(str(d)) == 7_000


def test_a_worker_deletes_a_jobs_output_after_its_retention(tmp_path: Path):
    c = Cluster(tmp_path)
    try:
        c.start_broker()
        c.start_worker("w1", extra=(*ALLOW_ROOT, "--spool-retention", "3s"))
        client = c.client()
        (job,) = client.submit("echo kept by the broker").jobs
        assert client.wait([job], timeout=20).jobs[0].succeeded
        spool = tmp_path / "spool" / "w1" / accounts.own().name  # its account's directory
        assert (spool / f"{job}.1.out").read_text() == "kept by the broker\n"
        wait_for(lambda: not (spool / f"{job}.1.out").exists(), 20, what="the output to go")
        assert not (spool / f"{job}.1").exists()  # its working directory too
        logs = client.logs(job)
        assert logs.data == b"kept by the broker\n"
    finally:
        c.stop()
