"""The worker's cost of starting one job: its CPU and the wall time from `start` to the job's
end, for `true`, through the worker's own runner in this process (no broker, no sockets).

Each way a worker starts a job is measured where this machine allows it:

- `spawn`: posix_spawn, the job keeping the worker's identity (its shell joins its cgroup);
- `launcher`: the launcher helper cloning the job straight into its cgroup, same identity;
- `as-account`: a root worker starting the job as another Unix account (the launcher, which
  drops privileges), by default `nobody`.

The reference, in the same run: `os.posix_spawn` of `/bin/sh -c true` and `waitpid`.

    python bench/start_cost.py                 # 300 jobs per way, 3 runs
    python bench/start_cost.py --quick         # 50 jobs
    python bench/start_cost.py --account alice
"""

from __future__ import annotations

import os
import resource
import select
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.worker import accounts
from banyan.worker.runner import STREAM_SPAN, WARM_MOVES, Launch, Runner
from bench.common import Figure, Report, median, parser, repeated


def run_jobs(runner: Runner, n: int, first: int, account: Any) -> tuple[float, float, float]:
    """CPU ms of this process, wall ms, and CPU ms of the jobs (from their clone to their end:
    what a child does before its exec counts as the job's), per job, one job at a time."""
    cpu0, wall0, jobs0 = time.process_time(), time.perf_counter(), _children()
    for job in range(first, first + n):
        launch = Launch(job, job, 1, "true", None, {}, [], None, 5.0, None, account=account)
        runner.start(launch, time.monotonic())
        for _ in range(10_000):
            if runner.poll(time.monotonic()):
                break
            select.select(runner.wakeup_fds(), [], [], 0.05)  # the pidfd wakes us at its exit
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return 1e3 * cpu / n, 1e3 * wall / n, 1e3 * (_children() - jobs0) / n


def _children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def direct(n: int) -> tuple[float, float]:
    """The reference: CPU ms and wall ms per `sh -c true` from os.posix_spawn and waitpid."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "true"], {}, setsid=True)
        os.waitpid(pid, 0)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return 1e3 * cpu / n, 1e3 * wall / n


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs per way and run (default 300; --quick 50)")
    p.add_argument("--account", default="nobody", help="the account of `as-account`")
    args = p.parse_args()
    n = args.jobs or (50 if args.quick else 300)
    report = Report("start_cost", args.quick, args.repeat, {"jobs": n, "account": args.account})
    ways = ["spawn", "launcher"]
    other = accounts.lookup(args.account) if os.geteuid() == 0 else None
    if other is not None:
        ways.append("as-account")
    spool = Path(tempfile.mkdtemp(prefix="banyan-start-cost-"))
    os.chmod(spool, 0o711)  # the other account reaches its own directory in it
    runner = Runner(spool / "spool", [], cgroups=True)
    counter = iter(range(1, 10**9, n))
    try:
        run_jobs(runner, 10, next(counter), None)  # warm up: page cache, the helper

        def run(_: int) -> dict[str, float]:
            out: dict[str, float] = {}
            out["direct_cpu_ms"], out["direct_wall_ms"] = direct(n)
            for way in ways:
                runner.clone_into_cgroups = way == "launcher" and runner.cgroups is not None
                # One job at a time, each starts soon after the last: the launcher's own cost
                # is measured with none moving itself for that (runner.WARM_MOVES).
                runner.warm_moves = 0.0 if way == "launcher" else WARM_MOVES
                runner.stream_span = 0.0 if way == "launcher" else STREAM_SPAN
                account = other if way == "as-account" else None
                cpu, wall, jobs = run_jobs(runner, n, next(counter), account)
                out[f"{way}_cpu_ms"], out[f"{way}_wall_ms"] = cpu, wall
                out[f"{way}_jobs_cpu_ms"] = jobs
            return out

        report.runs = repeated(args.repeat, run)
    finally:
        runner.launcher.close()
        if runner.cgroups is not None:
            runner.cgroups.close()
        shutil.rmtree(spool, ignore_errors=True)
    ref_cpu = median([r["direct_cpu_ms"] for r in report.runs])
    ref_wall = median([r["direct_wall_ms"] for r in report.runs])
    for way in ways:
        cpu = median([r[f"{way}_cpu_ms"] for r in report.runs])
        wall = median([r[f"{way}_wall_ms"] for r in report.runs])
        report.add(
            Figure(f"start, {way}: worker CPU per job", cpu, "ms", "posix_spawn", ref_cpu),
            Figure(f"start, {way}: start to end", wall, "ms", "posix_spawn", ref_wall),
        )
        report.figures[-2].ratio = cpu / ref_cpu
        report.figures[-1].ratio = wall / ref_wall
        jobs = median([r[f"{way}_jobs_cpu_ms"] for r in report.runs])
        report.add(Figure(f"start, {way}: the job's CPU (`sh -c true`)", jobs, "ms"))
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
