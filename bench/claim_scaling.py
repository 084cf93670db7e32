"""Does taking the next job cost the same with 1,000 or 1,000,000 jobs queued?

Fills a fresh store with N eligible jobs, then times one claim as the broker does it: open a
write transaction, take the first eligible job, write it back as running, commit. The median
over many claims should stay within 2x between the small and the large queue.

    python bench/claim_scaling.py            # N = 1,000 and 1,000,000
    python bench/claim_scaling.py --quick    # N = 1,000 and 100,000
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.broker.records import Job, JobState
from banyan.broker.store import Store, WriteTx

CHUNK = 50_000
RESULTS = Path(__file__).parent / "results" / "claim_scaling.json"


def fill(store: Store, n: int) -> float:
    """Queue n available jobs in chunks; returns the seconds it took (map growth included)."""
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
                    memory=256,
                    priority=rng.randint(-2, 2),
                    groups=[1 + job_id // 10_000],
                )
            )
        tx.put_meta("filled", hi - 1)

    for lo in range(1, n + 1, CHUNK):
        hi = min(lo + CHUNK, n + 1)
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


def measure(n: int, claims: int, sync: bool, workdir: Path) -> dict[str, float]:
    with Store(workdir / f"n{n}", sync=sync) as store:
        fill_s = fill(store, n)
        for _ in range(20):  # warm the cursor paths and the page cache
            claim(store)
        times = sorted(claim(store) for _ in range(claims))
        map_size = store.map_size
    data = workdir / f"n{n}" / "data.mdb"
    return {
        "jobs": n,
        "fill_s": round(fill_s, 2),
        "fill_jobs_per_s": round(n / fill_s),
        "claim_median_us": round(statistics.median(times) * 1e6, 1),
        "claim_p90_us": round(times[int(0.9 * len(times))] * 1e6, 1),
        "claim_max_us": round(times[-1] * 1e6, 1),
        "map_size_mib": map_size // 2**20,
        "data_mib": round(data.stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 100,000 jobs")
    parser.add_argument("--claims", type=int, default=200, help="claims timed per size")
    parser.add_argument(
        "--sync", action="store_true", help="fsync every commit (measures the disk, not the index)"
    )
    parser.add_argument("--dir", type=Path, help="where to build the stores (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    sizes = [1_000, 100_000 if args.quick else 1_000_000]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [measure(n, args.claims, args.sync, Path(tmp)) for n in sizes]
    ratio = rows[1]["claim_median_us"] / rows[0]["claim_median_us"]

    print(f"{'jobs':>10} {'fill s':>8} {'jobs/s':>8} {'median us':>10} {'p90 us':>8} {'MiB':>7}")
    for r in rows:
        print(
            f"{r['jobs']:>10,} {r['fill_s']:>8} {r['fill_jobs_per_s']:>8,} "
            f"{r['claim_median_us']:>10} {r['claim_p90_us']:>8} {r['data_mib']:>7}"
        )
    verdict = "ok" if ratio <= 2 else "TOO SLOW"
    print(
        f"median claim ratio {sizes[1]:,} / {sizes[0]:,} jobs: {ratio:.2f} (target <= 2: {verdict})"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "claims": args.claims,
        "sync": args.sync,
        "quick": args.quick,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rows": rows,
        "ratio": round(ratio, 3),
        "target": 2.0,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
