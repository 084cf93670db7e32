"""Does taking the next job cost the same with 1,000 or 1,000,000 jobs queued?

Fills a fresh store with N eligible jobs (through `Store.write_batch` and `put_job`, 50,000
per transaction), each asking for 1 cpu and 256 MiB, then FIT jobs asking for no memory, at
the lowest priority. Then it times five things, each with its own commit:

- index: take the first eligible job, write it back as running (the store's part of a claim);
- match: a worker with room claims one job through `Core.claim` + `Core.match` (what the
  broker's turn runs: worker record, attempt, event, assignment);
- match, no queued job fits: a claim by a worker too small for every queued job: it reads
  the head of each queue (one per owner and shape), assigns nothing;
- match, worker has no free cpu: the same for a worker whose one cpu is taken (W1's case: a
  standing claim from a busy worker, matched again at every result): it reads nothing;
- claim behind N jobs that do not fit: a worker with 128 MiB claims one job; none of the N
  queued ahead of the FIT jobs fits it (head-of-line blocking, if a claim had to look past
  them). Its reference is the same claim on a queue of nothing but the FIT jobs.

The median with the big queue is compared with the median with the small one (or the FIT-only
queue), same run.

    python bench/claim_scaling.py            # N = 1,000 and 1,000,000
    python bench/claim_scaling.py --quick    # N = 1,000 and 20,000
"""

from __future__ import annotations

import functools
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.broker.records import Job, JobState
from banyan.broker.state import Core
from banyan.broker.store import Store, WriteTx
from bench.common import Figure, Report, median, parser, percentile, workdir

CHUNK = 50_000
TARGET = 2.0
FIT = 1_000  # jobs the 128 MiB worker fits, behind the N that it does not


def fill(store: Store, n: int) -> float:
    """Queue n available jobs in chunks, then FIT that ask for no memory; returns the seconds
    it took (map growth included)."""
    rng = random.Random(n)
    started = time.perf_counter()

    def chunk(tx: WriteTx, lo: int, hi: int) -> None:
        for job_id in range(lo, hi):
            tx.put_job(
                Job(
                    id=job_id,
                    name=f"job-{job_id}",
                    command=f"./simulate --case {job_id}",
                    owner="bench",
                    submitted=1.7e9 + job_id,
                    cpus=1.0,
                    memory=0 if job_id > n else 256,
                    priority=-3 if job_id > n else rng.randint(-2, 2),
                    groups=[1 + job_id // 10_000],
                )
            )
        tx.put_meta("filled", hi - 1)

    for lo in range(1, n + FIT + 1, CHUNK):
        hi = min(lo + CHUNK, n + FIT + 1)
        store.write_batch(functools.partial(chunk, lo=lo, hi=hi))
    return time.perf_counter() - started


def claim(store: Store) -> float:
    started = time.perf_counter()
    with store.write() as tx:
        job_id, _request = next(tx.eligible())
        job = tx.get_job(job_id)
        assert job is not None
        job.state = JobState.RUNNING.value
        job.worker, job.token, job.attempts = "w1", job_id, 1
        tx.put_job(job)
    return time.perf_counter() - started


def requeue(store: Store) -> None:
    """Put every running job back in the queue and empty the workers, untimed, so each run
    starts with the same queue."""
    with store.write() as tx:
        for job_id in list(tx.jobs_in_state(JobState.RUNNING.value)):
            job = tx.get_job(job_id)
            assert job is not None
            job.state, job.worker, job.token = JobState.AVAILABLE.value, None, None
            tx.put_job(job)
        for worker in list(tx.workers()):
            worker.running, worker.used_cpus, worker.wants = {}, 0.0, 0
            tx.put_worker(worker)


def match(store: Store, worker: str, expect: int) -> float:
    """One claim through the state machine, as the broker's turn does it: the worker asks for
    one job, `Core.match` answers, commit. `expect` is how many jobs it should get."""
    started = time.perf_counter()
    with store.write() as tx:
        core = Core(tx, time.time())
        core.claim(worker, 1)
        assigned = core.match()
    elapsed = time.perf_counter() - started
    if assigned != expect:
        raise RuntimeError(f"{worker} got {assigned} jobs, expected {expect}")
    return elapsed


def register(store: Store, name: str, cpus: float, memory: int = 1 << 30) -> None:
    with store.write() as tx:
        Core(tx, time.time()).register(name, "bench", (cpus, memory, 0), [], [])


def stats(times: list[float]) -> dict[str, float]:
    return {
        "median_us": median(times) * 1e6,
        "p90_us": percentile(times, 90) * 1e6,
        "max_us": max(times) * 1e6,
    }


def measure(store: Store, claims: int, only_behind: bool = False) -> dict[str, dict[str, float]]:
    """The bare index claim; a claim through Core.match by a worker with room; a match for a
    worker that has no room for any queued job; and a claim by a worker that fits only the
    FIT jobs (with `only_behind`, just that one)."""
    out = {"behind": stats([match(store, "narrow", 1) for _ in range(min(claims, FIT))])}
    requeue(store)
    if only_behind:
        return out
    out["index"] = stats([claim(store) for _ in range(claims)])
    requeue(store)
    out["match"] = stats([match(store, "roomy", 1) for _ in range(claims)])
    requeue(store)
    out["match_full"] = stats([match(store, "full", 0) for _ in range(claims)])
    requeue(store)
    match(store, "busy", 1)  # its one cpu now runs a job
    out["match_busy"] = stats([match(store, "busy", 0) for _ in range(claims)])
    requeue(store)
    return out


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--claims", type=int, default=200, help="claims timed per size and run")
    p.add_argument(
        "--sync", action="store_true", help="fsync every commit (measures the disk, not the index)"
    )
    p.add_argument("--dir", type=Path, help="where to build the stores (default: a temp dir)")
    args = p.parse_args()
    small, big = 1_000, 20_000 if args.quick else 1_000_000
    params = {
        "claims": args.claims,
        "sync": args.sync,
        "sizes": [small, big],
        "chunk": CHUNK,
        "fit": FIT,
    }
    report = Report("claim_scaling", args.quick, args.repeat, params)
    with workdir(args.keep, "claim") as tmp:
        root = args.dir or tmp
        sizes: dict[int, dict[str, Any]] = {}
        stores = {}
        for n in (0, small, big):
            stores[n] = Store(root / f"n{n}", sync=args.sync)
            fill_s = fill(stores[n], n)
            register(stores[n], "roomy", 1e6)
            register(stores[n], "full", 0.5)  # every queued job asks for 1 cpu
            register(stores[n], "busy", 1.0)
            register(stores[n], "narrow", 1e6, memory=128)  # fits only the FIT jobs
            for _ in range(20):  # warm the cursor paths and the page cache
                claim(stores[n])
            requeue(stores[n])
            data = root / f"n{n}" / "data.mdb"
            sizes[n] = {"fill_s": fill_s, "data_mib": data.stat().st_size / 2**20}
            print(f"  filled {n:,} jobs in {fill_s:.1f} s", file=sys.stderr)
        # Alternate the sizes within each run, so a busy moment hits both alike.
        for _ in range(args.repeat):
            report.runs.append(
                {str(n): measure(stores[n], args.claims, only_behind=not n) for n in stores}
            )
        for store in stores.values():
            store.close()
    report.params["stores"] = {str(n): v for n, v in sizes.items()}

    def med(n: int, kind: str, key: str = "median_us") -> float:
        return median([r[str(n)][kind][key] for r in report.runs])

    def ratio(kind: str, ref: int = small) -> float:
        return median(
            [r[str(big)][kind]["median_us"] / r[str(ref)][kind]["median_us"] for r in report.runs]
        )

    labels = {
        "index": "claim (index + commit)",
        "match": "claim via Core.match",
        "match_full": "match, no queued job fits",
        "match_busy": "match, worker has no free cpu",
    }
    for kind, label in labels.items():
        r = ratio(kind)
        report.add(
            Figure(f"{label}, {small:,} queued", med(small, kind), "us"),
            Figure(
                f"{label}, {big:,} queued",
                med(big, kind),
                "us",
                f"{small:,} queued",
                med(small, kind),
                r,
                f"ratio <= {TARGET:g}",
                r <= TARGET,
            ),
        )
    r = ratio("behind", 0)
    report.add(
        Figure(f"claim behind {small:,} jobs that do not fit", med(small, "behind"), "us"),
        Figure(
            f"claim behind {big:,} jobs that do not fit",
            med(big, "behind"),
            "us",
            "no job ahead",
            med(0, "behind"),
            r,
            f"ratio <= {TARGET:g}",
            r <= TARGET,
        ),
        Figure(f"fill rate, {big:,} jobs", big / sizes[big]["fill_s"], "jobs/s"),
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
