"""Cascades: one job's end settling 200,000 dependents, and what the broker's other clients and
its worker see meanwhile.

Each scenario on a fresh broker (durable commits, default keys) with one worker, while another
process pings the broker every 50 ms from before the job ends until every dependent is settled:

- fail: P (`sleep 2`, held until its dependents exist) with N `--after-fail P` dependents; P
  succeeds, so all N are cancelled;
- cancel: P (`sleep 300`) with N `--after P` dependents; `banyan-cancel P` cancels all N + 1
  (the tool's exit code and time are reported: it waits while the broker answers pings);
- release: P (`sleep 2`) with N `--after P` dependents that no worker fits (`--tag nope`); P
  succeeds, so all N become available at once.

For each: the time from P's end (or the cancel) to the first status that answers once all are
settled (a status waits for the cascade to end), the slowest and the 99th-percentile ping
meanwhile, and the worker's "broker silent" reconnections.

    python bench/cascade.py            # 200,000 dependents, 1 run
    python bench/cascade.py --quick    # 20,000 dependents
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.client import Client
from bench.big_submit import pinging
from bench.common import Cluster, Figure, Report, median, parser, percentile, wait_for, workdir

SCENARIOS = ("fail", "cancel", "release")


def settled(client: Client, group: str, state: str, n: int) -> bool:
    counts = client.status(group=group, limit=1).groups[0]["counts"]
    return bool(counts.get(state, 0) == n)


def ended_at(client: Client, since: int, job: int) -> float:
    """The wall time of `job`'s first change from `since` on: its end, or its cancel."""
    for _ in range(10_000):
        page, since = client.events(since, 1000)
        for _seq, when, who, *_ in page:
            if who == job:
                return float(when)
        if not page:
            break
    raise RuntimeError(f"no event of job {job}")


def one(root: Path, scenario: str, n: int) -> dict[str, float]:
    c = Cluster(root)
    try:
        c.start_broker()
        c.start_worker("w")
        with c.client(timeout=600) as client:
            # Held until its dependents exist, which takes a while.
            sleep = "sleep 300" if scenario == "cancel" else "sleep 2"
            p = client.submit(sleep, hold=True).jobs[0]
            kind = "after_fail" if scenario == "fail" else "after"
            tags = ["nope"] if scenario == "release" else []  # no worker has it
            deps = client.submit(
                "true", array=f"1-{n}", depends_on=[{"kind": kind, "job": p}], tags=tags
            )
            group = f"array-{deps.jobs[0]}"
            client.release(p)
            wait_for(lambda: client.status([p]).jobs[0].state == "running", 60, "P to run")
            rc, cancel_seconds = 0, 0.0
            head = client.events_head()
            with pinging(c.address, str(c.home)) as latencies:
                if scenario == "cancel":
                    started = time.perf_counter()
                    tool = [sys.executable, "-m", "banyan.cli.cancel", "--broker", c.address]
                    done = subprocess.run([*tool, str(p)], env=c.env, cwd=c.root, check=False)
                    rc = done.returncode
                    cancel_seconds = time.perf_counter() - started
                else:
                    wait_for(lambda: client.status([p]).jobs[0].state == "terminated", 60, "P")
                state = "available" if scenario == "release" else "cancelled"
                wait_for(lambda: settled(client, group, state, n), 600, "the dependents")
                seconds = time.time() - ended_at(client, head, p)
        silent = (c.root / "w.log").read_text(errors="replace").count("broker silent")
        figures = {
            "seconds": seconds,
            "max_ping_ms": max(latencies) * 1e3,
            "p99_ping_ms": percentile(latencies, 99) * 1e3,
            "silent": float(silent),
        }
        if scenario == "cancel":
            figures |= {"cancel_rc": float(rc), "cancel_seconds": cancel_seconds}
        return figures
    finally:
        c.stop()


def main() -> int:
    p = parser(__doc__)
    p.set_defaults(repeat=1)
    p.add_argument("--jobs", type=int, help="dependents (default 200,000; --quick 20,000)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=", ".join(SCENARIOS))
    args = p.parse_args()
    n = args.jobs or (20_000 if args.quick else 200_000)
    scenarios = args.scenarios.split(",")
    report = Report("cascade", args.quick, args.repeat, {"dependents": n, "ping_every": 0.05})
    with workdir(args.keep, "cascade") as tmp:
        report.runs = [
            {s: one(tmp / f"{s}{i}", s, n) for s in scenarios} for i in range(args.repeat)
        ]

    for s in scenarios:

        def med(key: str, s: str = s) -> float:
            return median([r[s][key] for r in report.runs])

        report.add(
            Figure(f"{s}: {n:,} dependents settled", med("seconds"), "s"),
            Figure(f"  slowest ping meanwhile ({s})", med("max_ping_ms"), "ms"),
            Figure(f"  p99 ping meanwhile ({s})", med("p99_ping_ms"), "ms"),
            Figure(f"  worker's 'broker silent' reconnections ({s})", med("silent"), ""),
        )
        if s == "cancel":
            report.add(
                Figure("  banyan-cancel exit code", med("cancel_rc"), ""),
                Figure("  banyan-cancel time", med("cancel_seconds"), "s"),
            )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
