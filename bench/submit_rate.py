"""Submit rate: durable single-job submits per second, and bulk submissions.

- Synchronous clients (1 and 4 processes): each sends one single-job `submit`, waits for the
  reply, and sends the next.
- Pipelined clients (1 and 4 processes): each keeps WINDOW requests in flight on one DEALER;
  replies echo the `req` id.
- Bulk: one `submit` of 10,000 jobs through `banyan.client.Client`, and a 100,000-job array
  through `banyan-submit --array` (as a subprocess, Python start-up included), or through the
  Python client when that command is not installed.

Clients are minimal DEALERs that pack requests with msgpack directly, so their cost is the same
whichever broker they talk to. The reference, in the same run, is bench/ideal.py: a ROUTER
that writes each request to LMDB with one synchronous commit per poll turn and replies, and
nothing else. No worker is connected: the jobs only queue. The broker runs with its default
CurveZMQ keys; `--insecure` also measures it without them.

    python bench/submit_rate.py            # 3 s per measurement, 3 runs
    python bench/submit_rate.py --quick    # 0.5 s per measurement, 1,000/5,000-job bulks
"""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import msgpack
import zmq

from banyan.keys import Curve, peer
from bench import ideal
from bench.common import (
    Cluster,
    Figure,
    Report,
    free_port,
    median,
    parser,
    repeated,
    wait_for,
    workdir,
)

WINDOW = 128
# Durable single-job submits from 4 clients, synchronous and pipelined, as a share of the ideal
# broker's rate in the same run.
RATIO_TARGET = {"sync x4": 0.8, "pipelined x4": 0.8}
BULK_TARGET = 50_000
BODY = {"jobs": [{"command": "true"}], "groups": [], "submit_key": None}
CTX = mp.get_context("spawn")  # no zmq context crosses a fork


# ---- load generators, each in its own process --------------------------------------------------


def _dealer(endpoint: str, curve: Curve | None) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return ctx, sock


def _request(req: int) -> bytes:
    return msgpack.packb([1, "submit", req, BODY])  # type: ignore[no-any-return]


def _accepted(frame: bytes) -> int:
    reply = msgpack.unpackb(frame, raw=False)
    if reply[1] != "submitted":
        raise RuntimeError(f"refused: {reply}")
    return int(reply[2])


def load(
    endpoint: str,
    curve: Curve | None,
    window: int,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """Keep `window` submits in flight (1: synchronous) for `seconds`; report replies."""
    ctx, sock = _dealer(endpoint, curve)
    try:
        sock.send(_request(0))  # connect and handshake before the clock starts
        if not sock.poll(30_000):
            raise RuntimeError("no answer to the first submit")
        sock.recv()
        barrier.wait()
        req, done = 1, 0
        end = time.perf_counter() + seconds
        for _ in range(window):
            sock.send(_request(req))
            req += 1
        while True:
            left = end - time.perf_counter()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                break
            _accepted(sock.recv())
            done += 1
            sock.send(_request(req))
            req += 1
        results.put(done)
    finally:
        sock.close(linger=0)
        ctx.term()


def rate(endpoint: str, curve: Curve | None, clients: int, window: int, seconds: float) -> float:
    """Requests answered per second by `clients` processes with `window` in flight each."""
    barrier = CTX.Barrier(clients + 1)
    results = CTX.Queue()
    args = (endpoint, curve, window, seconds, barrier, results)
    procs = [CTX.Process(target=load, args=args) for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=60)
        total: int = sum(results.get(timeout=seconds + 60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()  # by PID
                p.join()
    return total / seconds


def bulk_raw(endpoint: str, curve: Curve | None, jobs: int) -> float:
    """Seconds for one submit of `jobs` single-command jobs, packed directly."""
    ctx, sock = _dealer(endpoint, curve)
    try:
        body = {"jobs": [{"command": "true"}] * jobs, "groups": [], "submit_key": None}
        started = time.perf_counter()
        sock.send(msgpack.packb([1, "submit", 1, body]))
        if not sock.poll(600_000):
            raise RuntimeError("no answer to the bulk submit")
        _accepted(sock.recv())
        return time.perf_counter() - started
    finally:
        sock.close(linger=0)
        ctx.term()


# ---- the two brokers ----------------------------------------------------------------------------


class Ideal:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        ready = CTX.Event()
        self.proc = CTX.Process(target=ideal.serve, args=(self.port, str(root / "ideal"), ready))
        (root / "ideal").mkdir(parents=True, exist_ok=True)
        self.proc.start()
        wait_for(ready.is_set, 30, "the ideal broker")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM by PID; it finishes its turn
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def array_cli(c: Cluster, jobs: int) -> tuple[float, str]:
    """Seconds for `banyan-submit --array 1-N true`, or the same jobs through the Python
    client if the command is missing; returns (seconds, how)."""
    argv = [sys.executable, "-m", "banyan.cli.submit", "--broker", c.address]
    argv += ["--timeout", "600", "--array", f"1-{jobs}", "--", "true"]
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=c.env, cwd=c.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    elapsed = time.perf_counter() - started
    if done.returncode == 0:
        return elapsed, "banyan-submit --array (subprocess)"
    print(
        f"banyan-submit failed ({done.stderr.decode()[-300:]}); using the client", file=sys.stderr
    )
    specs = [{"command": "true", "env": {"BANYAN_ARRAY_INDEX": str(i)}} for i in range(1, jobs + 1)]
    with c.client(timeout=600) as client:
        started = time.perf_counter()
        client.submit(jobs=specs)
        return time.perf_counter() - started, "banyan.client.Client.submit (CLI missing)"


def bulk_client(c: Cluster, jobs: int) -> float:
    with c.client(timeout=600) as client:
        started = time.perf_counter()
        client.submit(jobs=[{"command": "true"}] * jobs)
        return time.perf_counter() - started


# ---- the run ------------------------------------------------------------------------------------

SHAPES = (
    ("sync x1", 1, 1),
    ("sync x4", 4, 1),
    ("pipelined x1", 1, WINDOW),
    ("pipelined x4", 4, WINDOW),
)


def measure_rates(endpoint: str, curve: Curve | None, seconds: float) -> dict[str, float]:
    return {name: rate(endpoint, curve, n, w, seconds) for name, n, w in SHAPES}


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, help="per rate measurement (default 3; --quick 0.5)")
    p.add_argument("--insecure", action="store_true", help="also measure without CurveZMQ")
    args = p.parse_args()
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    bulk_n, array_n = (1000, 5000) if args.quick else (10_000, 100_000)
    params = {"seconds": seconds, "window": WINDOW, "bulk_jobs": bulk_n, "array_jobs": array_n}
    report = Report("submit_rate", args.quick, args.repeat, params)
    with workdir(args.keep, "submit") as root:
        ref = Ideal(root)
        secure = Cluster(root / "secure")
        plain = Cluster(root / "insecure", insecure=True) if args.insecure else None
        try:
            secure.start_broker()
            if plain is not None:
                plain.start_broker()
            curve = peer(secure.home, "client")
            endpoint = f"tcp://{secure.address}"
            if args.profile:
                secure.profile("broker", args.profile / "submit-broker.txt")

            def run(_: int) -> dict[str, Any]:
                out: dict[str, Any] = {
                    "ideal": measure_rates(ref.endpoint, None, seconds),
                    "banyan": measure_rates(endpoint, curve, seconds),
                }
                if plain is not None:
                    out["banyan_insecure"] = measure_rates(f"tcp://{plain.address}", None, seconds)
                out["bulk_ideal_s"] = bulk_raw(ref.endpoint, None, bulk_n)
                out["bulk_banyan_s"] = bulk_client(secure, bulk_n)
                out["array_ideal_s"] = bulk_raw(ref.endpoint, None, array_n)
                out["array_banyan_s"], out["array_how"] = array_cli(secure, array_n)
                return out

            report.runs = repeated(args.repeat, run)
        finally:
            secure.stop()
            if plain is not None:
                plain.stop()
            ref.stop()
    add_figures(report, bulk_n, array_n)
    report.finish(args.out)
    return 0


def add_figures(report: Report, bulk_n: int, array_n: int) -> None:
    runs = report.runs

    def med(kind: str, key: str | None = None) -> float:
        return median([r[kind][key] if key else r[kind] for r in runs])

    def med_ratio(a: str, b: str, key: str | None = None) -> float:
        return median([(r[a][key] / r[b][key]) if key else r[a] / r[b] for r in runs])

    for name, _, _ in SHAPES:
        got = med("banyan", name)
        ratio = med_ratio("banyan", "ideal", name)
        target = RATIO_TARGET.get(name)
        report.add(
            Figure(
                f"submits/s, {name}",
                got,
                "req/s",
                "ideal broker",
                med("ideal", name),
                ratio,
                f">= {target:g} x ideal" if target else "",
                ratio >= target if target else None,
            )
        )
        if "banyan_insecure" in runs[0]:
            plain = med("banyan_insecure", name)
            ratio = med_ratio("banyan_insecure", "banyan", name)
            label = f"submits/s, {name}, --insecure"
            report.add(Figure(label, plain, "req/s", "with CURVE", got, ratio))
    for key, label, n in (
        ("bulk", f"bulk submit, {bulk_n:,} jobs", bulk_n),
        ("array", f"--array {array_n:,} jobs", array_n),
    ):
        got = n / med(f"{key}_banyan_s")
        report.add(
            Figure(
                label,
                got,
                "jobs/s",
                "ideal broker",
                n / med(f"{key}_ideal_s"),
                med_ratio(f"{key}_ideal_s", f"{key}_banyan_s"),
                f">= {BULK_TARGET:,}/s",
                got >= BULK_TARGET,
            )
        )
    report.notes.append(f"--array measured by: {runs[0]['array_how']}")


if __name__ == "__main__":
    raise SystemExit(main())
