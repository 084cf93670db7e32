"""Many workers: 1,000 simulated workers heartbeating at 1 Hz for 60 s against one broker.

Each simulated worker is a DEALER with the local worker key that does what an idle worker does
on the wire: `register`, wait for `registered`, one standing `claim`, then a `heartbeat` every
second (spread evenly over the second across workers), answering `reregister` by registering
again. They live in two processes of 500 sockets each. Over the steady-state window the bench
reads the broker's CPU time and RSS, and at the end asks the broker how many of them it holds
as lost: every one is a false loss, since all kept beating.

The reference, in the same run, is the CPU the simulators themselves spent on the same
messages (each sends and receives as many as the broker receives and sends).

    python bench/many_workers.py            # 1,000 workers, 60 s
    python bench/many_workers.py --quick    # 50 workers, 4 s
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import psutil
import zmq

from banyan import protocol
from banyan.keys import Curve, peer
from bench.common import Cluster, Figure, Report, median, parser, repeated, workdir

CPU_TARGET = 25.0  # % of one core
HEARTBEAT = 1.0
CTX = mp.get_context("spawn")


class Sim:
    """`count` simulated idle workers on one poller."""

    def __init__(self, endpoint: str, curve: Curve | None, prefix: str, count: int) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.endpoint, self.curve = endpoint, curve
        self.names = [f"{prefix}-{i:04d}" for i in range(count)]
        self.socks: list[zmq.Socket[Any]] = [self._socket() for _ in self.names]
        self.index = {s: i for i, s in enumerate(self.socks)}
        self.received: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.registered = [False] * count
        self.last_heard = [0.0] * count
        self.max_silence = 0.0

    def _socket(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.endpoint)
        return sock

    def send(self, i: int, kind: str, body: dict[str, Any]) -> None:
        self.socks[i].send(protocol.encode(kind, body), zmq.NOBLOCK)
        self.sent[kind] += 1

    def register(self, i: int) -> None:
        self.registered[i] = False
        body = {"name": self.names[i], "host": "sim", "cpus": 2.0, "memory": 1024, "gpus": 0}
        self.send(i, "register", {**body, "tags": [], "running": [], "pid": os.getpid()})

    def pump(self, poller: zmq.Poller, timeout: float, now: float) -> None:
        for sock, _ in poller.poll(max(0, int(timeout * 1000))):
            i = self.index[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                kind = protocol.decode(frame, protocol.BROKER_TO_WORKER).type
                self.received[kind] += 1
                if self.last_heard[i]:
                    self.max_silence = max(self.max_silence, now - self.last_heard[i])
                self.last_heard[i] = now
                if kind == "registered" and not self.registered[i]:
                    self.registered[i] = True
                    self.send(i, "claim", {"max": 1024})
                elif kind == "reregister":
                    self.register(i)

    def run(self, ready: Any, stop: Any, results: Any) -> None:
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        for i in range(len(self.socks)):
            self.register(i)
        deadline = time.monotonic() + 120
        while not all(self.registered):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.registered.count(False)} workers never registered")
            self.pump(poller, 0.1, time.monotonic())
        ready.put(os.getpid())
        n = len(self.socks)
        start = time.monotonic()
        due = [start + HEARTBEAT * i / n for i in range(n)]
        self.last_heard = [start] * n
        self.max_silence = 0.0
        k = 0  # workers beat in index order, each once per HEARTBEAT
        while not stop.is_set():
            now = time.monotonic()
            while due[k] <= now:
                self.send(k, "heartbeat", {"running": []})
                due[k] += HEARTBEAT
                k = (k + 1) % n
            self.pump(poller, min(due[k] - now, 0.05), now)
        results.put(
            {"sent": dict(self.sent), "received": dict(self.received), "silence": self.max_silence}
        )
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


def simulate(endpoint: str, home: str, prefix: str, count: int, *queues: Any) -> None:
    Sim(endpoint, peer(Path(home), "worker"), prefix, count).run(*queues)


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def once(
    root: Path, workers: int, seconds: float, processes: int, profile: Path | None
) -> dict[str, Any]:
    c = Cluster(root)
    procs: list[Any] = []
    try:
        c.start_broker(heartbeat=HEARTBEAT)
        broker = c.procs["broker"].pid
        idle0, t0 = cpu(broker), time.monotonic()
        time.sleep(min(2.0, seconds / 2))
        idle_pct = 100 * (cpu(broker) - idle0) / (time.monotonic() - t0)
        ready, stop, results = CTX.Queue(), CTX.Event(), CTX.Queue()
        endpoint = f"tcp://127.0.0.1:{c.worker_port}"
        per = -(-workers // processes)
        for p in range(processes):
            count = min(per, workers - p * per)
            args = (endpoint, str(c.home), f"sim{p}", count, ready, stop, results)
            procs.append(CTX.Process(target=simulate, args=args))
            procs[-1].start()
        sims = [ready.get(timeout=180) for _ in procs]
        time.sleep(2 * HEARTBEAT)  # let the registration flood settle
        if profile:
            c.profile("broker", profile / "many-workers-broker.txt")
        b0, s0, t0 = cpu(broker), sum(cpu(pid) for pid in sims), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        broker_pct = 100 * (cpu(broker) - b0) / elapsed
        sims_pct = 100 * (sum(cpu(pid) for pid in sims) - s0) / elapsed
        rss = c.rss("broker")
        c.stop_profilers()
        with c.client() as client:
            states = Counter(w.state for w in client.workers() if w.name.startswith("sim"))
        stop.set()
        counts = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()  # by PID
                p.join()
        c.stop()
    received: Counter[str] = Counter()
    for r in counts:
        received.update(r["received"])
    return {
        "broker_cpu_pct": broker_pct,
        "broker_idle_cpu_pct": idle_pct,
        "sims_cpu_pct": sims_pct,
        "broker_rss_mib": rss / 2**20,
        "states": dict(states),
        "lost": states.get("lost", 0),
        "seen": sum(states.values()),
        "reregistered": received.get("reregister", 0),
        "max_silence_s": max(r["silence"] for r in counts),
        "received": dict(received),
    }


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--workers", type=int, help="simulated workers (default 1,000; --quick 50)")
    p.add_argument("--seconds", type=float, help="measured window (default 60; --quick 4)")
    p.add_argument("--processes", type=int, default=2, help="simulator processes")
    args = p.parse_args()
    workers = args.workers or (50 if args.quick else 1000)
    seconds = args.seconds or (4.0 if args.quick else 60.0)
    params = {"workers": workers, "seconds": seconds, "heartbeat": HEARTBEAT}
    report = Report(
        "many_workers", args.quick, args.repeat, {**params, "processes": args.processes}
    )
    with workdir(args.keep, "many") as root:
        report.runs = repeated(
            args.repeat,
            lambda i: once(root / f"run{i}", workers, seconds, args.processes, args.profile),
        )

    def med(key: str) -> float:
        return median([r[key] for r in report.runs])

    broker_pct = med("broker_cpu_pct")
    lost = max(r["lost"] for r in report.runs)
    missing = max(workers - r["seen"] for r in report.runs)
    report.add(
        Figure(
            f"broker CPU, {workers:,} workers",
            broker_pct,
            "% core",
            "simulators' CPU",
            med("sims_cpu_pct"),
            median([r["broker_cpu_pct"] / r["sims_cpu_pct"] for r in report.runs]),
            f"< {CPU_TARGET:g}%",
            broker_pct < CPU_TARGET,
        ),
        Figure("broker CPU, no workers", med("broker_idle_cpu_pct"), "% core"),
        Figure(f"broker RSS, {workers:,} workers", med("broker_rss_mib"), "MiB"),
        Figure(
            "false losses (worst run)", lost, "workers", target="0", met=lost == 0 and not missing
        ),
        Figure("reregistered (worst run)", max(r["reregistered"] for r in report.runs), "workers"),
        Figure("longest broker silence seen", max(r["max_silence_s"] for r in report.runs), "s"),
    )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
