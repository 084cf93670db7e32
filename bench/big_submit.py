"""Big submissions: how fast 200,000 jobs land, and what the broker's other clients see meanwhile.

Three forms of one big submission, each on a fresh broker (durable commits, default keys) with
no worker, while another process pings the broker every 20 ms:

- `banyan-submit --hold --array 1-N 'echo {}'` (a subprocess, Python start-up included);
- `banyan-submit --hold --each FILE echo`, N lines;
- the Python client's `submit(jobs=[...])` with N specs of their own (what `--file` sends).

For each: wall time and jobs per second, the slowest and the 99th-percentile ping while it ran,
and how much the broker's peak memory (VmHWM) grew.

    python bench/big_submit.py            # 200,000 jobs each, 3 runs
    python bench/big_submit.py --quick    # 20,000 jobs each
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.client import Client
from bench.common import Cluster, Figure, Report, median, parser, percentile, repeated, workdir

CTX = mp.get_context("spawn")  # no zmq context crosses a fork
PING_EVERY = 0.02
FORMS = ("array", "each", "list")


def pinger(address: str, home: str, stop: Any, ready: Any, out: Any) -> None:
    """Ping every PING_EVERY s until `stop`; put the latencies (s) on `out`."""
    latencies: list[float] = []
    with Client(address, home, timeout=120) as c:
        c.ping()
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            c.ping()
            latencies.append(time.perf_counter() - started)
            stop.wait(PING_EVERY)
    out.put(latencies)


@contextlib.contextmanager
def pinging(address: str, home: str) -> Iterator[list[float]]:
    """A process pinging the broker every PING_EVERY s from its first answer; the list it
    yields gets the latencies (s) once the block ends."""
    stop, ready, out = CTX.Event(), CTX.Event(), CTX.Queue()
    probe = CTX.Process(target=pinger, args=(address, home, stop, ready, out))
    probe.start()
    latencies: list[float] = []
    try:
        ready.wait(60)
        yield latencies
    finally:
        stop.set()
        latencies += out.get(timeout=120)
        probe.join(timeout=30)
        if probe.is_alive():
            probe.terminate()  # by PID
            probe.join()


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def submit(c: Cluster, form: str, n: int) -> None:
    tool = [sys.executable, "-m", "banyan.cli.submit", "--broker", c.address, "--hold"]
    if form == "array":
        argv = [*tool, "--array", f"1-{n}", "--", "echo {}"]
    elif form == "each":
        lines = c.root / "lines"
        lines.write_text("".join(f"item-{i}\n" for i in range(n)))
        argv = [*tool, "--each", str(lines), "--", "echo"]
    else:
        with c.client(timeout=600) as client:
            client.submit(jobs=[{"command": f"echo {i}", "hold": True} for i in range(n)])
        return
    done = subprocess.run(argv, env=c.env, cwd=c.root, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{form}: {done.stderr.decode()[-500:]}")


def one(root: Path, form: str, n: int) -> dict[str, float]:
    c = Cluster(root)
    try:
        c.start_broker()
        pid = c.procs["broker"].pid
        with pinging(c.address, str(c.home)) as latencies:
            before = peak_rss(pid)
            started = time.perf_counter()
            submit(c, form, n)
            seconds = time.perf_counter() - started
            grown = peak_rss(pid) - before
        with c.client() as client:
            assert client.status(limit=1).matched == n, "jobs missing"
        return {
            "seconds": seconds,
            "max_ping_ms": max(latencies) * 1e3,
            "p99_ping_ms": percentile(latencies, 99) * 1e3,
            "grown_mib": grown / 2**20,
        }
    finally:
        c.stop()


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs per submission (default 200,000; --quick 20,000)")
    p.add_argument("--forms", default=",".join(FORMS), help="among: " + ", ".join(FORMS))
    args = p.parse_args()
    n = args.jobs or (20_000 if args.quick else 200_000)
    forms = args.forms.split(",")
    report = Report("big_submit", args.quick, args.repeat, {"jobs": n, "ping_every": PING_EVERY})
    with workdir(args.keep, "big-submit") as tmp:

        def run(i: int) -> dict[str, Any]:
            return {form: one(tmp / f"{form}{i}", form, n) for form in forms}

        report.runs = repeated(args.repeat, run)

    for form in forms:

        def med(key: str, form: str = form) -> float:
            return median([r[form][key] for r in report.runs])

        report.add(
            Figure(f"{form} of {n:,} jobs", n / med("seconds"), "jobs/s"),
            Figure(f"  slowest ping meanwhile ({form})", med("max_ping_ms"), "ms"),
            Figure(f"  p99 ping meanwhile ({form})", med("p99_ping_ms"), "ms"),
            Figure(f"  broker peak memory growth ({form})", med("grown_mib"), "MiB"),
        )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
