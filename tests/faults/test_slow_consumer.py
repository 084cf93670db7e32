"""Scenario 8: one client floods the broker with submissions and reads its replies only at the
end, while a crowd of idle clients hold `wait` requests. The broker's memory stays bounded and
its heartbeats keep flowing, so no worker is falsely declared lost."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import psutil
import pytest
import zmq

from banyan import protocol
from banyan.client import Client
from tests.cluster import HEARTBEAT, LIVENESS, Cluster, scaled
from tests.faults.conftest import Summary
from tests.faults.harness import JobLog, audit, size

PER_REQUEST = 100  # jobs per submission
WAITED = 100  # held jobs every idle client waits for
MEMORY_BOUND = 64 << 20  # anonymous memory the broker may add while flooded, bytes
SILENT = re.compile(r"broker silent for ([\d.]+) s")


def anon_bytes(pid: int) -> int:
    """Anonymous resident memory: the heap and queues, not LMDB's file-backed map."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def replies(sock: zmq.Socket[bytes], count: int, timeout: float) -> list[protocol.Message]:
    """Read `count` replies from a DEALER, bounded in time."""
    out: list[protocol.Message] = []
    deadline = time.monotonic() + scaled(timeout)
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} replies within {timeout} s"
        if sock.poll(int(left * 1000) + 1):
            out.append(protocol.decode(sock.recv(), protocol.CLIENT_REPLIES))
    return out


@pytest.mark.timeout(300)  # `make faults` size: 30 s idle; its audit may wait 300
def test_slow_consumer(fleet: Cluster, summary: Summary) -> None:
    """8. A flood of pipelined submissions while a crowd of idle clients hold waits."""
    t0 = time.monotonic()
    n = int(size(100_000, 20_000))
    crowd = int(size(1000, 200))
    log = JobLog(fleet.root / "jobs.log")
    # A connection per idle client, in this process and in the broker (which inherits the
    # limit). Here a Client is three ZeroMQ sockets (its DEALER and the two ends of its
    # monitor), each with a descriptor, besides its TCP connection.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 5 * crowd + 1024)), hard))
    broker = fleet.start_broker()
    fleet.start_worker("w1", cpus=2)
    fleet.start_worker("w2", cpus=2)
    c = fleet.client(timeout=60)
    held = c.submit(jobs=[{"command": log.command(), "hold": True} for _ in range(WAITED)]).jobs
    base = anon_bytes(broker.pid)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 3 * crowd + 64)
    try:
        crowded, peak, pings, acked = flood(fleet, c, ctx, log, held, n, crowd)
    finally:
        ctx.destroy(linger=0)  # every idle client and the flood, whatever happened
    # What the workers have not run yet is cancelled, in pieces that keep each turn short.
    for i in range(0, len(acked), 2000):
        c.cancel(acked[i : i + 2000])
    a = audit(c, "8 slow consumer", log, [*held, *acked], n + WAITED, fleet.root, timeout=300)
    a.row.seconds = time.monotonic() - t0
    gaps = [float(g) for name in ("w1", "w2") for g in SILENT.findall(fleet.log(name))]
    lost = [h for j in a.jobs.values() for h in j["history"] if h["outcome"] == "lost"]
    a.row.note = (
        f"{crowd} idle clients wait on {WAITED} jobs each; {n} jobs in {n // PER_REQUEST} "
        f"pipelined submissions; {a.outcomes['success']} ran, the rest cancelled; broker heap "
        f"+{(crowded - base) >> 20} MiB for the crowd's connections, "
        f"+{(peak - crowded) >> 20} MiB at most during the flood; ping during the flood "
        f"max {max(pings):.2f} s; {len(gaps)} heartbeat gaps over the "
        f"{HEARTBEAT * LIVENESS:g} s window, {len(lost)} lost attempts"
    )
    summary.add(a.row)
    a.check()
    assert peak - crowded < MEMORY_BOUND
    assert not gaps, f"workers found the broker silent: {gaps}"
    assert not lost and all(w.state != "lost" for w in c.workers())
    assert psutil.pid_exists(broker.pid)


def flood(
    fleet: Cluster,
    c: Client,
    ctx: zmq.Context[zmq.Socket[bytes]],
    log: JobLog,
    held: list[int],
    n: int,
    crowd: int,
) -> tuple[int, int, list[float], list[int]]:
    """The crowd waits, the flood submits; returns the broker's heap once the crowd is in and
    at its peak, the ping times during the flood, and the flood's acknowledged jobs."""
    pid = fleet.procs["broker"].pid
    address = f"{fleet.host}:{fleet.client_port}"
    # The idle crowd: each waits for the same held jobs (half of them with a timeout that will
    # not expire) and reads nothing until they are released.
    idle = [Client(address, fleet.home, ctx=ctx) for _ in range(crowd)]
    for i, w in enumerate(idle):
        body = {"jobs": held, "groups": [], "timeout": 3600.0 if i % 2 else None}
        w.sock.send(protocol.encode("wait", body, 1))
    c.ping()  # fair queuing: the crowd's waits are in once this is answered
    crowded = peak = anon_bytes(pid)
    # The flood: every submission sent before any reply is read.
    flooder = Client(address, fleet.home, ctx=ctx)
    sock = flooder.sock
    sock.setsockopt(zmq.SNDTIMEO, int(scaled(60) * 1000))  # held back by TCP, never hung
    requests = n // PER_REQUEST
    pings = []
    for req in range(1, requests + 1):
        jobs = [{"command": log.command()} for _ in range(PER_REQUEST)]
        sock.send(protocol.encode("submit", {"jobs": jobs, "groups": []}, req))
        if req % 20 == 0:
            peak = max(peak, anon_bytes(pid))
            sent = time.monotonic()
            c.ping()
            pings.append(time.monotonic() - sent)
    acked: list[int] = []
    for msg in replies(sock, requests, timeout=600):
        assert msg.type == "submitted", msg.body
        acked += msg.body["jobs"]
        peak = max(peak, anon_bytes(pid))
    for job in held:
        c.release(job)
    for w in idle:
        (msg,) = replies(w.sock, 1, timeout=60)
        assert msg.type == "waited" and {j["state"] for j in msg.body["jobs"]} == {"terminated"}
        w.close()
    flooder.close()
    return crowded, peak, pings, acked
