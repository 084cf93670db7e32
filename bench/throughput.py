"""W1 throughput: 2,000 `true` jobs through one worker with 2 cpus, against `xargs -P2`.

Timed from the submit (one request carrying all the jobs) to the moment `wait` returns with
every result durable. The reference runs the same 2,000 commands, one `sh -c` each, with
`xargs -P2` in the same run: the physical limit of starting processes two at a time.

    python bench/throughput.py            # 2,000 jobs, 3 runs each
    python bench/throughput.py --quick    # 200 jobs
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import psutil

from banyan.client import Client
from bench.common import Figure, Report, cluster, median, parser, repeated, workdir

TARGET = 0.6
CPU_KEYS = ("xargs", "broker", "worker", "jobs")


def xargs(n: int, command: str = "true", slots: int = 2) -> float:
    """Seconds for `xargs -P2` to run `sh -c COMMAND` n times."""
    return xargs_cpu(n, command, slots)[0]


def xargs_cpu(n: int, command: str = "true", slots: int = 2) -> tuple[float, float]:
    """Seconds for `xargs -P2` to run `sh -c COMMAND` n times, and the CPU seconds it used."""
    data = (command + "\n") * n
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    argv = ["xargs", "-d", "\\n", "-P", str(slots), "-n", "1", "sh", "-c"]
    subprocess.run(argv, input=data.encode(), check=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu


def cpu_times(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system, t.children_user + t.children_system


def through_banyan(client: Client, n: int, command: str = "true") -> float:
    """Seconds from submitting n jobs (one request) until all of them have ended."""
    started = time.perf_counter()
    ids = client.submit(jobs=[{"command": command}] * n).jobs
    done = client.wait(ids)
    elapsed = time.perf_counter() - started
    bad = [j for j in done.jobs if not j.succeeded]
    if bad or done.timed_out:
        raise RuntimeError(f"{len(bad)} of {n} jobs did not succeed, e.g. {bad[:1]}")
    return elapsed


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs per run (default 2,000; --quick 200)")
    args = p.parse_args()
    n = args.jobs or (200 if args.quick else 2000)
    report = Report("throughput", args.quick, args.repeat, {"jobs": n, "worker_cpus": 2})
    with workdir(args.keep, "w1") as root, cluster(root) as c:
        c.start_broker()
        c.start_worker("w1", cpus=2)
        broker, worker = c.procs["broker"].pid, c.procs["w1"].pid
        with c.client() as client:
            through_banyan(client, min(n, 50))  # warm up: page cache, first spawns
            if args.profile:
                c.profile("broker", args.profile / "w1-broker.txt")
                c.profile("w1", args.profile / "w1-worker.txt")

            def run(_: int) -> dict[str, float]:
                ref_s, ref_cpu = xargs_cpu(n)
                broker0, worker0 = cpu_times(broker), cpu_times(worker)
                got_s = through_banyan(client, n)
                broker1, worker1 = cpu_times(broker), cpu_times(worker)
                return {
                    "xargs_s": ref_s,
                    "banyan_s": got_s,
                    "xargs_cpu_ms_per_job": 1e3 * ref_cpu / n,
                    "broker_cpu_ms_per_job": 1e3 * (broker1[0] - broker0[0]) / n,
                    "worker_cpu_ms_per_job": 1e3 * (worker1[0] - worker0[0]) / n,
                    "jobs_cpu_ms_per_job": 1e3 * (worker1[1] - worker0[1]) / n,
                }

            report.runs = repeated(args.repeat, run)
            c.stop_profilers()
    ref_rate = n / median([r["xargs_s"] for r in report.runs])
    rate = n / median([r["banyan_s"] for r in report.runs])
    ratio = median([r["xargs_s"] / r["banyan_s"] for r in report.runs])
    report.add(
        Figure(
            "W1 throughput",
            rate,
            "jobs/s",
            "xargs -P2",
            ref_rate,
            ratio,
            f">= {TARGET} x xargs",
            ratio >= TARGET,
        )
    )
    per_job = {k: median([r[f"{k}_cpu_ms_per_job"] for r in report.runs]) for k in CPU_KEYS}
    total = per_job["broker"] + per_job["worker"] + per_job["jobs"]
    report.add(
        Figure("W1 CPU per job, broker", per_job["broker"], "ms"),
        Figure("W1 CPU per job, worker", per_job["worker"], "ms"),
        Figure("W1 CPU per job, the jobs", per_job["jobs"], "ms"),
        Figure(
            "W1 CPU per job, all",
            total,
            "ms",
            "xargs + sh",
            per_job["xargs"],
            total / per_job["xargs"],
        ),
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
