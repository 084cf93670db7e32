"""W2 latency: 200 sequential `true` jobs, each submitted and then waited for by the client.

Submit → finish is the client's own clock, from just before `submit` to `wait` returning.
Submit → start ends at the broker's record of the attempt's `started` report (same machine,
same clock), which is just after the worker spawned the shell. The reference, in the same
run, is the same process started directly: `posix_spawn("/bin/sh -c true")` and `waitpid`.

    python bench/latency.py            # 200 jobs, 3 runs
    python bench/latency.py --quick    # 30 jobs
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.client import Client
from bench.common import Figure, Report, cluster, median, parser, percentile, repeated, workdir

FINISH_OVER_SPAWN_MS = 1.5
P99_MS = 10.0


def direct_spawn(n: int) -> list[float]:
    """Seconds for each of n `sh -c true`, started with posix_spawn and waited for."""
    out = []
    env = dict(os.environ)
    for _ in range(n):
        started = time.perf_counter()
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "true"], env)
        os.waitpid(pid, 0)
        out.append(time.perf_counter() - started)
    return out


def through_banyan(client: Client, n: int) -> dict[str, list[float]]:
    """Per job: submit → start and submit → finish, in seconds."""
    submitted: list[tuple[int, float]] = []
    finish = []
    for _ in range(n):
        t0 = time.time()
        (job,) = client.submit("true").jobs
        done = client.wait([job])
        finish.append(time.time() - t0)
        if not done.jobs[0].succeeded:
            raise RuntimeError(f"job {job} did not succeed: {done.jobs[0]}")
        submitted.append((job, t0))
    start = []
    for job, t0 in submitted:  # read back after the timed loop, not inside it
        (attempt,) = client.job(job).raw["history"]
        start.append(attempt["started"] - t0)
    return {"start": start, "finish": finish}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 50) * 1e3,
        "p99_ms": percentile(values, 99) * 1e3,
        "max_ms": max(values) * 1e3,
    }


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs per run (default 200; --quick 30)")
    args = p.parse_args()
    n = args.jobs or (30 if args.quick else 200)
    report = Report("latency", args.quick, args.repeat, {"jobs": n, "worker_cpus": 2})
    with workdir(args.keep, "w2") as root, cluster(root) as c:
        c.start_broker()
        c.start_worker("w1", cpus=2)
        with c.client() as client:
            through_banyan(client, 10)  # warm up
            direct_spawn(10)
            if args.profile:
                c.profile("broker", args.profile / "w2-broker.txt")
                c.profile("w1", args.profile / "w2-worker.txt")

            def run(_: int) -> dict[str, dict[str, float]]:
                ref = direct_spawn(n)
                got = through_banyan(client, n)
                return {
                    "direct_spawn": summary(ref),
                    "submit_to_start": summary(got["start"]),
                    "submit_to_finish": summary(got["finish"]),
                }

            report.runs = repeated(args.repeat, run)
            c.stop_profilers()

    def med(what: str, key: str) -> float:
        return median([r[what][key] for r in report.runs])

    spawn50, spawn99 = med("direct_spawn", "p50_ms"), med("direct_spawn", "p99_ms")
    extra = median(
        [r["submit_to_finish"]["p50_ms"] - r["direct_spawn"]["p50_ms"] for r in report.runs]
    )
    fin99 = med("submit_to_finish", "p99_ms")
    fin50 = med("submit_to_finish", "p50_ms")
    report.add(
        Figure("W2 submit→start p50", med("submit_to_start", "p50_ms"), "ms"),
        Figure("W2 submit→start p99", med("submit_to_start", "p99_ms"), "ms"),
        Figure("W2 submit→finish p50", fin50, "ms", "direct spawn p50", spawn50, fin50 / spawn50),
        Figure(
            "W2 finish p50 over spawn p50",
            extra,
            "ms",
            target=f"<= {FINISH_OVER_SPAWN_MS} ms",
            met=extra <= FINISH_OVER_SPAWN_MS,
        ),
        Figure(
            "W2 submit→finish p99",
            fin99,
            "ms",
            "direct spawn p99",
            spawn99,
            fin99 / spawn99,
            f"<= {P99_MS:g} ms",
            fin99 <= P99_MS,
        ),
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
