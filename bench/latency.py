"""W2 latency: 200 sequential `true` jobs, each submitted and then waited for by the client.

Submit → finish is the client's own clock, from just before `submit` to `wait` returning.
Submit → start ends at the broker's record of the attempt's `started` report (same machine,
same clock), which is just after the worker spawned the shell. The reference, in the same
run, is the same process started directly: `posix_spawn("/bin/sh -c true")` and `waitpid`.
Celery + Redis and HyperQueue, where `make bench-peers-setup` made them ready, run the same
sequence in every round (bench/peers/harness.py), each timed by its own client from submit to
result; the ratios to Celery carry the targets.

    python bench/latency.py            # 200 jobs, 3 rounds
    python bench/latency.py --quick    # 30 jobs
    python bench/latency.py --peers none
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.client import Client
from bench.common import Figure, Report, cluster, median, parser, percentile, repeated, workdir
from bench.peers import harness

# Banyan's submit → finish p50 and p99 as a multiple of each peer's, at most.
TARGETS = {"celery": 1.0}


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
    harness.add_argument(p)
    args = p.parse_args()
    n = args.jobs or (30 if args.quick else 200)
    report = Report("latency", args.quick, args.repeat, {"jobs": n, "worker_cpus": 2})
    with (
        workdir(args.keep, "w2") as root,
        cluster(root) as c,
        harness.started(args.peers, root / "peers", report) as peers,
    ):
        c.start_broker()
        c.start_worker("w1", cpus=2)
        with c.client() as client:
            through_banyan(client, 10)  # warm up
            direct_spawn(10)
            for other in peers:
                other.sequential(10)
            if args.profile:
                c.profile("broker", args.profile / "w2-broker.txt")
                c.profile("w1", args.profile / "w2-worker.txt")

            def banyan() -> dict[str, dict[str, float]]:
                got = through_banyan(client, n)
                return {
                    "submit_to_start": summary(got["start"]),
                    "submit_to_finish": summary(got["finish"]),
                }

            def peer(other: harness.Peer) -> Callable[[], dict[str, Any]]:
                return lambda: {"submit_to_finish": summary(other.sequential(n))}

            def run(i: int) -> dict[str, Any]:
                steps: dict[str, Callable[[], dict[str, Any]]] = {
                    "direct_spawn": lambda: {"direct_spawn": summary(direct_spawn(n))},
                    "banyan": banyan,
                }
                steps.update({other.name: peer(other) for other in peers})
                done = harness.round_robin(i, steps)
                return {**done.pop("direct_spawn"), **done.pop("banyan"), **done}

            report.runs = repeated(args.repeat, run)
            c.stop_profilers()

    def med(what: str, key: str, system: str = "") -> float:
        return median([(r[system] if system else r)[what][key] for r in report.runs])

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
        Figure("W2 finish p50 over spawn p50", extra, "ms"),
        Figure("W2 submit→finish p99", fin99, "ms", "direct spawn p99", spawn99, fin99 / spawn99),
    )
    for other in peers:
        for q, spawn in (("p50", spawn50), ("p99", spawn99)):
            value = med("submit_to_finish", f"{q}_ms", other.name)
            report.add(
                Figure(
                    f"W2 submit→finish {q}, {other.label}",
                    value,
                    "ms",
                    f"direct spawn {q}",
                    spawn,
                    value / spawn,
                )
            )
    for other in peers:  # the targets: Banyan's latency over each peer's, round by round
        target = TARGETS.get(other.name)
        for q, value in (("p50", fin50), ("p99", fin99)):
            key = f"{q}_ms"
            over = median(
                [
                    r["submit_to_finish"][key] / r[other.name]["submit_to_finish"][key]
                    for r in report.runs
                ]
            )
            report.add(
                Figure(
                    f"W2 submit→finish {q} vs {other.label}",
                    value,
                    "ms",
                    other.label,
                    med("submit_to_finish", key, other.name),
                    over,
                    f"<= {target:g} x {other.label}" if target else "",
                    over <= target if target else None,
                )
            )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
