"""W1 throughput: 2,000 `true` jobs through one worker with 2 cpus, against `xargs -P2`.

Timed from the submit (one request carrying all the jobs) to the moment `wait` returns with
every result durable. The reference runs the same 2,000 commands, one `sh -c` each, with
`xargs -P2` in the same run: the physical limit of starting processes two at a time. Celery +
Redis and HyperQueue, where `make bench-peers-setup` made them ready, run the same jobs on 2
slots in every round (bench/peers/harness.py); the ratios to them carry the targets.

    python bench/throughput.py            # 2,000 jobs, 3 rounds
    python bench/throughput.py --quick    # 200 jobs
    python bench/throughput.py --peers none
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import psutil

from banyan.client import Client
from bench.common import Figure, Report, cluster, median, parser, repeated, workdir
from bench.peers import harness

# Banyan's W1 rate as a multiple of each peer's, in the same rounds.
TARGETS = {"celery": 1.5, "hyperqueue": 1.2}
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
    harness.add_argument(p)
    args = p.parse_args()
    n = args.jobs or (200 if args.quick else 2000)
    report = Report("throughput", args.quick, args.repeat, {"jobs": n, "worker_cpus": 2})
    with (
        workdir(args.keep, "w1") as root,
        cluster(root) as c,
        harness.started(args.peers, root / "peers", report) as peers,
    ):
        c.start_broker()
        c.start_worker("w1", cpus=2)
        broker, worker = c.procs["broker"].pid, c.procs["w1"].pid
        with c.client() as client:
            through_banyan(client, min(n, 50))  # warm up: page cache, first spawns
            if args.profile:
                c.profile("broker", args.profile / "w1-broker.txt")
                c.profile("w1", args.profile / "w1-worker.txt")

            def banyan() -> dict[str, float]:
                broker0, worker0 = cpu_times(broker), cpu_times(worker)
                got_s = through_banyan(client, n)
                broker1, worker1 = cpu_times(broker), cpu_times(worker)
                return {
                    "banyan_s": got_s,
                    "broker_cpu_ms_per_job": 1e3 * (broker1[0] - broker0[0]) / n,
                    "worker_cpu_ms_per_job": 1e3 * (worker1[0] - worker0[0]) / n,
                    "jobs_cpu_ms_per_job": 1e3 * (worker1[1] - worker0[1]) / n,
                }

            def reference() -> dict[str, float]:
                ref_s, ref_cpu = xargs_cpu(n)
                return {"xargs_s": ref_s, "xargs_cpu_ms_per_job": 1e3 * ref_cpu / n}

            def peer(other: harness.Peer) -> Callable[[], dict[str, Any]]:
                def measure() -> dict[str, Any]:
                    before = other.cpu()
                    seconds = other.batch(n, "true")
                    return {
                        "seconds": seconds,
                        "cpu_ms_per_job": harness.cpu_delta(before, other.cpu(), n),
                    }

                return measure

            def run(i: int) -> dict[str, Any]:
                steps = {"xargs": reference, "banyan": banyan}
                steps.update({other.name: peer(other) for other in peers})
                done = harness.round_robin(i, steps)
                return {**done.pop("xargs"), **done.pop("banyan"), **done}

            report.runs = repeated(args.repeat, run)
            c.stop_profilers()
    ref_rate = n / median([r["xargs_s"] for r in report.runs])
    rate = n / median([r["banyan_s"] for r in report.runs])
    ratio = median([r["xargs_s"] / r["banyan_s"] for r in report.runs])
    report.add(Figure("W1 throughput", rate, "jobs/s", "xargs -P2", ref_rate, ratio))
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
        Figure("W1 cores busy, Banyan", total * rate / 1e3, "cores"),
    )
    for other in peers:
        peer_rate = n / median([r[other.name]["seconds"] for r in report.runs])
        vs_xargs = median([r["xargs_s"] / r[other.name]["seconds"] for r in report.runs])
        report.add(
            Figure(
                f"W1 throughput, {other.label}",
                peer_rate,
                "jobs/s",
                "xargs -P2",
                ref_rate,
                vs_xargs,
            )
        )
        parts = {
            k: median([r[other.name]["cpu_ms_per_job"][k] for r in report.runs])
            for k in report.runs[0][other.name]["cpu_ms_per_job"]
        }
        for k, v in parts.items():
            report.add(
                Figure(
                    f"W1 CPU per job, {other.label}: {'the jobs' if k == 'jobs' else k}", v, "ms"
                )
            )
        peer_total = sum(parts.values())
        report.add(
            Figure(
                f"W1 CPU per job, {other.label}: all",
                peer_total,
                "ms",
                "xargs + sh",
                per_job["xargs"],
                peer_total / per_job["xargs"],
            ),
            Figure(f"W1 cores busy, {other.label}", peer_total * peer_rate / 1e3, "cores"),
        )
    for other in peers:  # the targets: Banyan's rate over each peer's, round by round
        over = median([r[other.name]["seconds"] / r["banyan_s"] for r in report.runs])
        target = TARGETS.get(other.name)
        report.add(
            Figure(
                f"W1 throughput vs {other.label}",
                rate,
                "jobs/s",
                other.label,
                n / median([r[other.name]["seconds"] for r in report.runs]),
                over,
                f">= {target:g} x {other.label}" if target else "",
                over >= target if target else None,
            )
        )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
