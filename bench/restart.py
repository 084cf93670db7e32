"""Restart: how long a broker takes to answer on a store of 1,000,000 jobs, and its RSS.

The store is filled through the store API directly (`Store.write_batch`, 50,000 jobs per
transaction, unsynced, then one sync): per job a record, an attempt and the three events of
its life (submitted, running, terminated), as a broker would have left them. 99% have ended;
every 100th is still queued. Ten workers are on record, as after a cluster's normal life.

Each run starts `banyan-broker` on the store and times from the spawn to the first answered
`status` request (the default listing: active jobs, first 1,000), then reads its RSS. The
reference, in the same run, is the same start on an empty store: Python, imports, keys and
sockets, everything but the data. "Cold" first evicts the store's files from the page cache
(posix_fadvise DONTNEED), as after a reboot.

    python bench/restart.py               # 1,000,000 jobs (a few minutes to fill)
    python bench/restart.py --quick       # 20,000 jobs
    python bench/restart.py --dir D       # keep (or reuse) the filled store in D
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.broker.records import Attempt, Job, JobState, Worker
from banyan.broker.store import Store, WriteTx
from bench.common import Cluster, Figure, Report, median, parser, repeated, workdir

CHUNK = 50_000
QUEUED_EVERY = 100
TIME_TARGET = 3.0
RSS_TARGET = 200.0  # MiB


def fill_chunk(tx: WriteTx, lo: int, hi: int) -> None:
    t = 1.7e9
    for job_id in range(lo, hi):
        submitted = t + job_id * 0.01
        job = Job(job_id, f"case-{job_id}", f"./simulate --case {job_id}", "bench", submitted)
        job.cpus, job.memory, job.groups = 1.0, 256, [1 + job_id // 10_000]
        tx.append_event(submitted, job_id, None, JobState.AVAILABLE.value, "submitted")
        if job_id % QUEUED_EVERY:
            worker = f"w{job_id % 10}"
            job.state, job.outcome, job.exit_code = JobState.TERMINATED.value, "success", 0
            job.attempts, job.worker = 1, worker
            job.started, job.ended = submitted + 1, submitted + 61
            attempt = Attempt(job_id, 1, job_id, worker, submitted + 1)
            attempt.started, attempt.ended = submitted + 1.01, submitted + 61
            attempt.outcome, attempt.exit_code = "success", 0
            attempt.stdout_tail = f"case {job_id}: converged after 812 iterations\n"
            tx.put_attempt(attempt)
            tx.append_event(job.started, job_id, "available", "running", f"claimed by {worker}")
            tx.append_event(job.ended, job_id, "running", "terminated", "success")
        tx.put_job(job)
    tx.put_meta("bench_filled", hi - 1)


def fill(path: Path, n: int) -> float:
    """Fill the store at `path` with n jobs, unless it already holds exactly that."""
    with Store(path, sync=False) as store:
        with store.read() as tx:
            if tx.get_meta("bench_filled") == n:
                return 0.0
        started = time.perf_counter()
        with store.write() as tx:
            for i in range(10):
                tx.put_worker(Worker(f"w{i}", f"node{i}", 32.0, 128 * 1024, 0, state="lost"))
        for lo in range(1, n + 1, CHUNK):
            hi = min(lo + CHUNK, n + 1)
            store.write_batch(functools.partial(fill_chunk, lo=lo, hi=hi))
            print(f"  filled {hi - 1:,} of {n:,}", file=sys.stderr)
        store.sync()
        return time.perf_counter() - started


def evict(path: Path) -> None:
    """Drop the store's clean pages from the page cache (no root needed)."""
    for name in ("data.mdb", "lock.mdb"):
        fd = os.open(path / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def memory(pid: int) -> dict[str, float]:
    """RSS in MiB, and its part that is the store's mapped file (RssFile) vs the heap."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return {
        "rss_mib": fields["VmRSS"],
        "anon_mib": fields["RssAnon"],
        "file_mib": fields["RssFile"],
    }


def start(root: Path, state: Path, cold: bool = False) -> dict[str, float]:
    """Spawn a broker on `state`; seconds until `status` answers, and its RSS then."""
    c = Cluster(root, state)
    try:
        if cold:
            evict(state)
        started = time.perf_counter()
        c.start_broker(wait=False)
        while True:
            try:
                with c.client(timeout=0.2) as client:
                    client.status()
                break
            except Exception:
                if c.procs["broker"].poll() is not None:
                    raise RuntimeError(f"the broker exited: see {root}/broker.log") from None
                if time.perf_counter() - started > 120:
                    raise
        elapsed = time.perf_counter() - started
        return {"seconds": elapsed, **memory(c.procs["broker"].pid)}
    finally:
        c.stop()


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs in the store (default 1,000,000; --quick 20,000)")
    p.add_argument("--dir", type=Path, help="keep (or reuse) the filled store here")
    args = p.parse_args()
    n = args.jobs or (20_000 if args.quick else 1_000_000)
    report = Report("restart", args.quick, args.repeat, {"jobs": n, "queued_every": QUEUED_EVERY})
    with workdir(args.keep, "restart") as tmp:
        base = args.dir or tmp
        big, empty = base / f"store-{n}", tmp / "empty"
        big.mkdir(parents=True, exist_ok=True)
        fill_s = fill(big, n)
        report.params["fill_s"] = fill_s
        report.params["store_mib"] = (big / "data.mdb").stat().st_size / 2**20
        Store(empty).close()
        start(tmp / "warm-empty", empty)  # keys made, files cached: every run starts alike
        start(tmp / "warm-big", big)

        def run(i: int) -> dict[str, Any]:
            return {
                "empty": start(tmp / f"empty{i}", empty),
                "full": start(tmp / f"full{i}", big),
                "cold": start(tmp / f"cold{i}", big, cold=True),
            }

        report.runs = repeated(args.repeat, run)

    def med(kind: str, key: str) -> float:
        return median([r[kind][key] for r in report.runs])

    full_s, cold_s = med("full", "seconds"), med("cold", "seconds")
    rss = med("full", "rss_mib")
    report.add(
        Figure(
            f"restart to status, {n:,} jobs",
            full_s,
            "s",
            "empty store",
            med("empty", "seconds"),
            full_s / med("empty", "seconds"),
            f"<= {TIME_TARGET:g} s",
            full_s <= TIME_TARGET,
        ),
        Figure(
            "same, page cache dropped",
            cold_s,
            "s",
            "empty store",
            med("empty", "seconds"),
            cold_s / med("empty", "seconds"),
            f"<= {TIME_TARGET:g} s",
            cold_s <= TIME_TARGET,
        ),
        Figure(
            f"broker RSS, {n:,} jobs",
            rss,
            "MiB",
            "empty store",
            med("empty", "rss_mib"),
            rss / med("empty", "rss_mib"),
            f"<= {RSS_TARGET:g} MiB",
            rss <= RSS_TARGET,
        ),
        Figure("  of which heap (RssAnon)", med("full", "anon_mib"), "MiB"),
        Figure("  of which mapped store (RssFile)", med("full", "file_mib"), "MiB"),
        Figure("store size", report.params["store_mib"], "MiB"),
    )
    if fill_s:
        report.add(Figure("fill rate", n / fill_s, "jobs/s"))
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
