"""Scenarios 1, 5 and 6: the broker killed again and again, away for a long while, and out of
disk space."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from banyan.client import BrokerUnavailable, Client
from banyan.errors import NoSpace
from tests.cluster import Cluster, cannot_run, scaled, wait_for
from tests.faults.conftest import Summary
from tests.faults.harness import JobLog, Row, audit, size


class Submitters:
    """Threads that submit batches with a submit_key, retrying each until it is acknowledged."""

    def __init__(self, fleet: Cluster, log: JobLog, jobs: int, threads: int, batch: int) -> None:
        self.fleet, self.log, self.batch = fleet, log, batch
        self.acked: list[int] = []
        self.retries = 0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        per = -(-jobs // threads)
        counts = [min(per, jobs - i * per) for i in range(threads)]
        self.threads = [
            threading.Thread(target=self._run, args=(i, n), daemon=True)
            for i, n in enumerate(counts)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + scaled(timeout)
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "submitters still running"
        assert not self.errors, self.errors

    def _run(self, me: int, count: int) -> None:
        c = Client(f"127.0.0.1:{self.fleet.client_port}", self.fleet.home, timeout=1.0)
        try:
            for first in range(0, count, self.batch):
                key = f"submitter-{me}-batch-{first}"
                n = min(self.batch, count - first)
                jobs: list[dict[str, Any]] = [{"command": self.log.command()} for _ in range(n)]
                ids = self._submit(c, jobs, key)
                with self.lock:
                    self.acked += ids
        except BaseException as e:  # reported by join()
            self.errors.append(e)
        finally:
            c.close()

    def _submit(self, c: Client, jobs: list[dict[str, Any]], key: str) -> list[int]:
        deadline = time.monotonic() + scaled(120)
        while time.monotonic() < deadline:
            try:
                return c.submit(jobs=jobs, submit_key=key).jobs
            except BrokerUnavailable:
                with self.lock:
                    self.retries += 1
        raise AssertionError(f"{key} never acknowledged")


@pytest.mark.timeout(300)  # `make faults` size: 20-35 s idle; its audit may wait 300
def test_broker_crash_loop(fleet: Cluster, summary: Summary) -> None:
    """1. kill -9 the broker at 10 random moments while submitters and two workers are busy;
    restart it each time. Nothing acknowledged is lost, duplicated or run twice."""
    t0 = time.monotonic()
    n = int(size(5000, 2000))
    kills = 10
    seed = int(os.environ.get("BANYAN_FAULTS_SEED", str(time.time_ns() % 10**6)))
    rng = random.Random(seed)
    log = JobLog(fleet.root / "jobs.log")
    fleet.start_broker()
    fleet.start_worker("w1", cpus=2)
    fleet.start_worker("w2", cpus=2)
    subs = Submitters(fleet, log, n, threads=4, batch=10)
    # A moment is a point of progress (acknowledged jobs, then ended runs), so the kills fall
    # across submission and execution whatever the machine's speed.
    moments = sorted(rng.uniform(0.02, 0.95) for _ in range(kills))
    subs.start()

    def reached(moment: float) -> bool:
        ended = sum(1 for line in log.path.read_text().splitlines() if not line.endswith("-"))
        return (len(subs.acked) + ended) / (2 * n) >= moment

    for moment in moments:
        wait_for(partial(reached, moment), 120, interval=0.01, what=f"progress {moment}")
        fleet.kill("broker")
        fleet.start_broker()
    subs.join(120)
    c = fleet.client(timeout=10)
    a = audit(c, "1 broker crash loop", log, subs.acked, n, fleet.root, timeout=300)
    a.row.seconds = time.monotonic() - t0
    a.row.note = (
        f"{kills} kill -9 at progress {', '.join(f'{m:.2f}' for m in moments)} "
        f"(seed {seed}); {subs.retries} submit retries"
    )
    summary.add(a.row)
    a.check()
    assert a.outcomes == {"success": n}


@pytest.mark.timeout(300)  # `make faults` size: 20-35 s idle; its audit may wait 300
def test_broker_away(fleet: Cluster, summary: Summary) -> None:
    """5. The broker stopped for 30 s (8 s in the reduced run), then restarted on the same
    state. Workers keep running their jobs, keep the results of those that end meanwhile,
    and deliver every one after the restart: each job runs exactly once."""
    t0 = time.monotonic()
    away = size(30, 8)
    n = int(size(12, 6))
    log = JobLog(fleet.root / "jobs.log")
    fleet.start_broker()
    fleet.start_worker("w1", cpus=n)
    fleet.start_worker("w2", cpus=n)
    c = fleet.client()
    # From ending soon after the stop to ending after the restart.
    durations = [1 + (away + 3) * i / (n - 1) for i in range(n)]
    ids = c.submit(jobs=[{"command": log.command(f"sleep {d:.2f}")} for d in durations]).jobs
    wait_for(lambda: len(log.runs()) >= n, 20, what="every job to start")
    fleet.kill("broker", signal.SIGTERM)
    stopped = time.time()
    time.sleep(away)  # the scenario itself: the broker is away this long
    during = [r for r in log.runs() if r.end is not None]
    fleet.start_broker()
    restarted = time.time()
    a = audit(c, "5 broker away", log, ids, n, fleet.root, timeout=away + 30)
    a.row.seconds = time.monotonic() - t0
    a.row.note = (
        f"away {restarted - stopped:.1f} s; {len(during)} of {n} jobs ended while it was away, "
        "their results delivered after the restart; every job ran once"
    )
    summary.add(a.row)
    a.check()
    assert during and len(during) < n, "some jobs must end while away, some after"
    for job_id in ids:
        history = a.jobs[job_id]["history"]
        assert len(history) == 1 and history[0]["outcome"] == "success", history
    assert a.row.runs == n


@contextlib.contextmanager
def small_disk(path: Path, megabytes: int, summary: Summary) -> Iterator[Path]:
    """A tmpfs of the given size at `path`, unmounted afterwards."""
    path.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        error = done.stderr.strip() if done.returncode else None
    except OSError as e:  # no mount(8) here
        error = str(e)
    if error is not None:
        why = f"cannot mount a tmpfs: {error}"
        summary.add(Row("6 disk full", note=f"SKIPPED: {why}"))
        cannot_run(why)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


FULL_FOR = 3.0  # > RESULT_RESEND: results are sent again into the full disk


@pytest.mark.timeout(300)  # `make faults` size: 20-35 s idle; its audit may wait 300
def test_disk_full(fleet: Cluster, summary: Summary) -> None:
    """6. The broker's state dir on a small tmpfs; submit until it is full. Submitters get a
    clear "no space" error, the broker stays up and keeps answering, what was acknowledged is
    intact, and everything works again once space is freed."""
    t0 = time.monotonic()
    megabytes = int(size(16, 4))
    log = JobLog(fleet.root / "jobs.log")
    with small_disk(fleet.root / "disk", megabytes, summary) as disk:
        # What is freed at the end must hold what finishing every acknowledged job writes (its
        # attempt, events, new state), a few hundred bytes each: a quarter of the disk.
        freed = max(1, megabytes // 4)
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (freed << 20))
        fleet.state_dir = disk / "state"
        fleet.start_broker()
        fleet.start_worker("w1", cpus=2)
        c = fleet.client(timeout=10)
        padding = " # " + "x" * 1000  # bigger records: the disk fills in fewer jobs
        acked: list[int] = []
        tried = 0
        refusal: NoSpace | None = None
        for per in (20, 1):  # big batches until one is refused, then single jobs
            for batch in range(10_000):
                jobs = [{"command": log.command() + padding} for _ in range(per)]
                tried += len(jobs)
                try:
                    acked += c.submit(jobs=jobs, submit_key=f"fill-{per}-{batch}").jobs
                except NoSpace as e:
                    refusal = e
                    break
        assert refusal is not None, "the disk never filled"
        full_at = len(acked)
        # Full for a while: the worker's results and claims cannot be stored, yet the broker
        # answers every read, shows every acknowledged job as it was sent, and refuses writes
        # with no_space.
        reads, refused_reads, refused_writes = 0, [], 0
        deadline = time.monotonic() + FULL_FOR
        while time.monotonic() < deadline:
            try:
                c.ping()
                status = c.status(acked[:20], detail=True, limit=20)
                assert all(j.raw["command"].endswith(padding) for j in status.jobs)
                reads += 2
            except NoSpace as e:
                refused_reads.append(e)
            with contextlib.suppress(NoSpace):
                acked += c.submit(log.command() + padding).jobs
                tried += 1
                continue
            tried += 1
            refused_writes += 1
        assert not refused_reads, f"{len(refused_reads)} reads refused: {refused_reads[0]}"
        ballast.unlink()
        after = wait_for(lambda: _submits(c, log.command()), 30, what="submissions to work")
        acked += after
        tried += len(after)
        a = audit(c, "6 disk full", log, acked, tried, fleet.root, timeout=120)
    a.row.seconds = time.monotonic() - t0
    a.row.note = (
        f"{megabytes} MiB tmpfs full after {full_at} jobs: {refusal.code}: "
        f"{refusal.message!r}; full for {FULL_FOR:g} s: {reads} reads answered, "
        f"{refused_writes} submits refused; all work again once {freed} MiB is freed"
    )
    summary.add(a.row)
    a.check()
    assert refusal.code == "no_space" and "no space" in refusal.message.lower()
    assert a.outcomes == {"success": len(acked)}


def _submits(c: Client, command: str) -> list[int] | None:
    try:
        return c.submit(command).jobs
    except NoSpace:
        return None
