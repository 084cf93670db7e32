"""Scenarios 1, 5 and 6: the broker killed again and again, away for a long while, and out of
disk space."""

from __future__ import annotations

import os
import random
import threading
import time

from banyan.client import BrokerUnavailable, Client
from tests.cluster import Cluster, scaled, wait_for
from tests.faults.conftest import Summary
from tests.faults.harness import JobLog, audit, size


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
                jobs = [{"command": self.log.command()} for _ in range(n)]
                ids = self._submit(c, jobs, key)
                with self.lock:
                    self.acked += ids
        except BaseException as e:  # reported by join()
            self.errors.append(e)
        finally:
            c.close()

    def _submit(self, c: Client, jobs: list[dict[str, object]], key: str) -> list[int]:
        deadline = time.monotonic() + scaled(120)
        while time.monotonic() < deadline:
            try:
                return c.submit(jobs=jobs, submit_key=key).jobs
            except BrokerUnavailable:
                with self.lock:
                    self.retries += 1
        raise AssertionError(f"{key} never acknowledged")


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

    def progress() -> float:
        ended = sum(1 for line in log.path.read_text().splitlines() if not line.endswith("-"))
        return (len(subs.acked) + ended) / (2 * n)

    for moment in moments:
        wait_for(lambda m=moment: progress() >= m, 120, interval=0.01, what=f"progress {moment}")
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
    assert a.row.completed == n
