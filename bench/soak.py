"""Soak: 2,000,000 short jobs through one broker with a short retention. Does the store stop
growing?

A real broker (`--retention 60`) and simulated workers that answer every assignment at once
with a successful result (real protocol, real CurveZMQ; no processes are spawned, so the
broker's store is what is measured, not the machine's fork rate). One client submits at a
steady rate (2,500 jobs a second, an array each second), so that the jobs kept, a retention
period's worth of ended ones, stay the same from the first minute on. Every few seconds the
bench reads the size of the broker's `data.mdb`; at the end it asks `stats` how much of the
file is in use and how much LMDB has freed for reuse.

The figure: the file's size once 2,000,000 jobs have gone through, against its size at the
halfway mark. With retention it levels off after the first retention period, because LMDB
reuses the pages the purge frees before it grows the file; without it, it would double.

    python bench/soak.py            # 2,000,000 jobs at 2,500/s, retention 60 s: 14 minutes
    python bench/soak.py --quick    # 40,000 jobs at 4,000/s, retention 3 s
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import zmq

from banyan import protocol
from banyan.keys import Curve, peer
from bench.common import Cluster, Figure, Report, parser, workdir

CTX = mp.get_context("spawn")


class Sims:
    """`count` simulated workers on one poller: each result sent as soon as its job arrives."""

    def __init__(self, endpoint: str, curve: Curve | None, count: int, cpus: float) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.cpus = cpus
        self.socks: list[zmq.Socket[Any]] = []
        for _ in range(count):
            sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                curve.apply(sock)
            sock.connect(endpoint)
            self.socks.append(sock)
        self.claim_left = [0] * count
        self.results = 0

    def register(self, i: int) -> None:
        body = {"name": f"soak-{i}", "host": "sim", "cpus": self.cpus, "memory": 1 << 20}
        body.update(gpus=0, tags=[], running=[], pid=os.getpid())
        self.socks[i].send(protocol.encode("register", body))

    def claim(self, i: int) -> None:
        self.socks[i].send(protocol.encode("claim", {"max": 1024}))
        self.claim_left[i] = 1024

    def handle(self, i: int, frame: bytes) -> None:
        msg = protocol.decode(frame, protocol.BROKER_TO_WORKER)
        if msg.type == "registered":
            self.claim(i)
        elif msg.type == "reregister":
            self.register(i)
        elif msg.type == "assign":
            for a in msg.body["jobs"]:
                body = {"job": a["job"], "token": a["token"], "outcome": "exited"}
                body.update(exit_code=0, signal=None, runtime=0.001)
                self.socks[i].send(protocol.encode("result", body))
            self.results += len(msg.body["jobs"])
            self.claim_left[i] -= len(msg.body["jobs"])
            if self.claim_left[i] < 512:
                self.claim(i)

    def run(self, stop: Any) -> None:
        poller = zmq.Poller()
        index = {}
        for i, sock in enumerate(self.socks):
            poller.register(sock, zmq.POLLIN)
            index[sock] = i
            self.register(i)
        beat = time.monotonic()
        idle = protocol.encode("heartbeat", {"running": []})
        while not stop.is_set():
            for sock, _ in poller.poll(50):
                for _ in range(1000):
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(index[sock], frame)
            if time.monotonic() >= beat:
                beat = time.monotonic() + 1.0
                for sock in self.socks:
                    sock.send(idle)
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


def simulate(endpoint: str, home: str, count: int, cpus: float, stop: Any) -> None:
    Sims(endpoint, peer(Path(home), "worker"), count, cpus).run(stop)


def file_size(c: Cluster) -> int:
    return (c.state_dir / "data.mdb").stat().st_size


def soak(
    root: Path, jobs: int, rate: int, retention: float, workers: int, every: float
) -> dict[str, Any]:
    c = Cluster(root)
    stop = CTX.Event()
    sims = None
    samples: list[dict[str, float]] = []
    try:
        c.start_broker(args=["--retention", f"{retention:g}"])
        endpoint = f"tcp://127.0.0.1:{c.worker_port}"
        sims = CTX.Process(target=simulate, args=(endpoint, str(c.home), workers, 64.0, stop))
        sims.start()
        client = c.client()
        submitted, started = 0, time.monotonic()
        next_sample = started
        while True:
            counts = _counts(client)
            waiting = counts.get("available", 0) + counts.get("running", 0)
            done = submitted >= jobs and not waiting
            now = time.monotonic()
            if now >= next_sample or done:
                next_sample = now + every
                sample = {"t": now - started, "ended": submitted - waiting}
                sample.update(file=file_size(c), kept=_kept(counts))
                samples.append(sample)
                print(f"  {sample}", file=sys.stderr, flush=True)
            if done:
                break
            due = min(jobs, int(rate * (now - started)) + rate)  # a second's worth ahead
            if submitted < due:
                client.submit("true", array=f"1-{due - submitted}")
                submitted = due
            else:
                time.sleep(0.05)
        elapsed = time.monotonic() - started
        # Everything has ended; the last jobs come of age one retention later.
        deadline = time.monotonic() + retention + 30
        while _kept(_counts(client)) and time.monotonic() < deadline:
            time.sleep(0.5)
        store = client.stats()["store"]
        client.close()
        return {
            "elapsed_s": elapsed,
            "jobs_per_s": jobs / elapsed,
            "samples": samples,
            "final": {**store, "file_now": file_size(c)},
            "rss_mib": c.rss("broker") / 2**20,
        }
    finally:
        stop.set()
        if sims is not None:
            sims.join(timeout=30)
            if sims.is_alive():
                sims.terminate()  # by PID
                sims.join()
        c.stop()


def _counts(client: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for user in client.users():
        for state, n in user["jobs"].items():
            out[state] = out.get(state, 0) + n
    return out


def _kept(counts: dict[str, int]) -> int:
    return counts.get("terminated", 0) + counts.get("cancelled", 0)


def at(samples: list[dict[str, float]], ended: float) -> dict[str, float]:
    """The first sample once `ended` jobs had ended."""
    return next(s for s in samples if s["ended"] >= ended)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs in all (default 2,000,000; --quick 40,000)")
    p.add_argument("--rate", type=int, help="jobs submitted a second (2,500; --quick 4,000)")
    p.add_argument("--retention", type=float, help="the broker's --retention in seconds")
    p.add_argument("--workers", type=int, default=4, help="simulated workers, 64 cpus each")
    args = p.parse_args()
    jobs = args.jobs or (40_000 if args.quick else 2_000_000)
    retention = args.retention or (3.0 if args.quick else 60.0)
    rate = args.rate or (4_000 if args.quick else 2_500)
    params = {"jobs": jobs, "rate": rate, "retention_s": retention, "workers": args.workers}
    report = Report("soak", args.quick, 1, params)
    with workdir(args.keep, "soak") as root:
        run = soak(root, jobs, rate, retention, args.workers, 1.0 if args.quick else 5.0)
    report.runs = [run]
    samples = run["samples"]
    half, end = at(samples, jobs / 2), samples[-1]
    growth = end["file"] / half["file"]
    mib = 2**20
    report.add(
        Figure(
            f"store file after {end['ended']:,.0f} jobs",
            end["file"] / mib,
            "MiB",
            f"after {half['ended']:,.0f}",
            half["file"] / mib,
            growth,
            "<= 1.1",
            growth <= 1.1,
        ),
        Figure("store file, largest seen", max(s["file"] for s in samples) / mib, "MiB"),
        Figure("ended jobs kept, largest seen", max(s["kept"] for s in samples), "jobs"),
        Figure("store in use once all aged out", run["final"]["used"] / mib, "MiB"),
        Figure("store freed for reuse then", run["final"]["free"] / mib, "MiB"),
        Figure("jobs through the broker", run["jobs_per_s"], "jobs/s", "submitted", rate),
        Figure("broker RSS at the end", run["rss_mib"], "MiB"),
    )
    report.notes.append(
        f"retention {retention:g} s; {rate:,} jobs/s submitted; {args.workers} simulated "
        "workers answering at once"
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
