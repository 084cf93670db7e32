"""banyan.futures: `Executor.map` of trivial calls, against ProcessPoolExecutor on this machine.

One worker with 2 cpus (the machine's 2 cores) runs `operator.neg` over range(N): one job per
call (`chunksize=1`, each a fresh `python -m banyan.remote`), and 100 calls per job. The
reference, in the same run, is `ProcessPoolExecutor(2).map` of the same calls, whose processes
are started once and then reused. The figures say what a call costs as a job: a Python start
and a Banyan job each, which chunking spreads over many calls.

    python bench/futures_map.py            # 10,000 calls, 3 runs
    python bench/futures_map.py --quick    # 60 calls
"""

from __future__ import annotations

import concurrent.futures
import operator
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.futures import Executor
from bench.common import Figure, Report, cluster, median, parser, repeated, workdir

CHUNK = 100


def pool(n: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        results = list(ex.map(operator.neg, range(n)))
    assert results == [-i for i in range(n)]
    return time.perf_counter() - started


def banyan(address: str, home: Path, n: int, chunksize: int) -> float:
    started = time.perf_counter()
    with Executor(broker=address, home=home, timeout=60) as ex:
        results = list(ex.map(operator.neg, range(n), chunksize=chunksize))
    assert results == [-i for i in range(n)]
    return time.perf_counter() - started


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--calls", type=int, help="calls per run (default 10,000; --quick 60)")
    args = p.parse_args()
    n = args.calls or (60 if args.quick else 10_000)
    report = Report("futures_map", args.quick, args.repeat, {"calls": n, "worker_cpus": 2})
    with workdir(args.keep, "futures") as root, cluster(root) as c:
        c.start_broker()
        c.start_worker("w1", cpus=2)
        banyan(c.address, c.home, 20, 1)  # warm up

        def run(_: int) -> dict[str, float]:
            return {
                "pool_s": pool(n),
                "banyan_s": banyan(c.address, c.home, n, 1),
                "chunked_s": banyan(c.address, c.home, n, CHUNK),
            }

        report.runs = repeated(args.repeat, run)
    ref = median([r["pool_s"] for r in report.runs])
    one = median([r["banyan_s"] for r in report.runs])
    chunked = median([r["chunked_s"] for r in report.runs])
    report.add(
        Figure(
            f"ex.map of {n:,} calls, a job each", one, "s", "ProcessPoolExecutor(2)", ref, one / ref
        ),
        Figure("calls/s, a job each", n / one, "calls/s", "ProcessPoolExecutor(2)", n / ref),
        Figure(
            f"ex.map of {n:,} calls, {CHUNK} a job",
            chunked,
            "s",
            "ProcessPoolExecutor(2)",
            ref,
            chunked / ref,
        ),
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
