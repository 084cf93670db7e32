"""The broker in-process with clocks of the test's own, stepped by hand (SPEC §5 "Time").

Real ZeroMQ sockets on loopback and a real LMDB store; only time is injected: a monotonic
clock for intervals and a wall clock for records, moved independently to show that liveness,
heartbeats and expiry follow the first alone. Also how a turn orders a registration against
the expiry it races with, and that a worker's connections do not pile up in the broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from banyan import protocol
from banyan.broker import server
from banyan.broker.server import Broker, BrokerConfig
from banyan.broker.state import Config

HEARTBEAT, LIVENESS = 1.0, 5
WINDOW = HEARTBEAT * LIVENESS
STEPS = 400  # broker turns a test waits for one answer, at most (5 ms each)


@dataclass
class Clocks:
    mono: float = 1000.0
    wall: float = 1.7e9


class Peer:
    """A DEALER that speaks the protocol by hand: a worker or a tool."""

    def __init__(self, ctx: zmq.Context[Any], port: int) -> None:
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.seen: list[protocol.Message] = []

    def send(self, kind: str, body: dict[str, Any], req: int = 0) -> None:
        self.sock.send(protocol.encode(kind, body, req))

    def take(self) -> list[protocol.Message]:
        while self.sock.poll(0):
            self.seen.append(protocol.decode(self.sock.recv()))
        out, self.seen = self.seen, []
        return out

    def expect(self, broker: Broker, kind: str, req: int | None = None) -> dict[str, Any]:
        """Step the broker until this peer gets a `kind` message (with `req`)."""
        for _ in range(STEPS):
            broker.step(0.005)
            for i, msg in enumerate(self.take()):
                if msg.type == kind and req in (None, msg.req):
                    self.seen = self.seen[i + 1 :]
                    return msg.body
        raise AssertionError(f"no {kind} within {STEPS} broker turns")

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)  # a failed test's open sockets must not hang its teardown


class Site:
    """A broker on random loopback ports with injected clocks, and the peers made for it."""

    def __init__(self, root: Path, ctx: zmq.Context[Any], clocks: Clocks | None = None) -> None:
        self.ctx, self.clocks = ctx, clocks
        config = BrokerConfig(
            state_dir=str(root / "state"),
            client_port=0,
            worker_port=0,
            core=Config(heartbeat=HEARTBEAT, liveness=LIVENESS),
            sync=False,
            secure=False,
        )
        if clocks is None:
            self.broker = Broker(config, ctx=ctx)
        else:
            self.broker = Broker(
                config, ctx=ctx, clock=lambda: clocks.mono, wall=lambda: clocks.wall
            )
        self.peers: list[Peer] = []
        self.tool = self.peer("client")
        self.reqs = iter(range(1, 1 << 20))

    def peer(self, kind: str) -> Peer:
        port = self.broker.client_port if kind == "client" else self.broker.worker_port
        p = Peer(self.ctx, port)
        self.peers.append(p)
        return p

    def ask(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        req = next(self.reqs)
        self.tool.send(kind, body, req)
        return self.tool.expect(
            self.broker, {"submit": "submitted", "status": "status"}.get(kind, "workers"), req
        )

    def worker(self, name: str, running: list[list[int]] | None = None, **extra: Any) -> Peer:
        w = self.peer("worker")
        w.send("register", register_body(name, running, **extra))
        w.expect(self.broker, "registered")
        return w

    def state(self, name: str) -> str:
        rows = self.ask("workers", {})["workers"]
        return str(next(w["state"] for w in rows if w["name"] == name))

    def job(self, job: int) -> dict[str, Any]:
        return dict(self.ask("status", {"jobs": [job]})["jobs"][0])

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.broker.close()


def register_body(
    name: str, running: list[list[int]] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "host": "node",
        "cpus": 2.0,
        "memory": 1000,
        "gpus": 0,
        "tags": [],
        "running": running or [],
        "pid": 4242,
        **extra,
    }


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def site(tmp_path: Path, ctx: zmq.Context[Any], clocks: Clocks) -> Iterator[Site]:
    s = Site(tmp_path, ctx, clocks)
    yield s
    s.close()


def running_job(site: Site, w: Peer) -> tuple[int, int]:
    """A job assigned to worker `w`, as (job, token)."""
    (job,) = site.ask("submit", {"jobs": [{"command": "sleep 100"}]})["jobs"]
    w.send("claim", {"max": 1})
    (a,) = w.expect(site.broker, "assign")["jobs"]
    assert a["job"] == job
    return job, int(a["token"])


# ---- item 5: every interval on the monotonic clock --------------------------------------------


def test_a_wall_clock_step_forward_expires_nobody(site: Site, clocks: Clocks) -> None:
    w = site.worker("w1")
    job, _ = running_job(site, w)
    clocks.wall += 3600  # an NTP step, or an operator's `date -s`
    for _ in range(20):
        site.broker.step(0.005)
    assert site.state("w1") == "busy"
    assert site.job(job)["state"] == "running"
    assert not [m for m in w.take() if m.type == "reregister"]
    # Silence measured on the monotonic clock still ends it.
    clocks.mono += WINDOW + HEARTBEAT
    for _ in range(5):
        site.broker.step(0.005)
    assert site.state("w1") == "lost"
    assert site.job(job)["state"] == "available"


def test_a_wall_clock_step_back_does_not_stop_heartbeats(site: Site, clocks: Clocks) -> None:
    w = site.worker("w1")
    clocks.wall -= 3600
    for _ in range(3):  # a beat each heartbeat interval of the monotonic clock
        clocks.mono += HEARTBEAT
        w.expect(site.broker, "heartbeat")
        w.send("heartbeat", {"running": []})
    assert site.state("w1") == "idle"


def test_records_are_dated_by_the_wall_clock(site: Site, clocks: Clocks) -> None:
    site.worker("w1")
    clocks.mono += 2.0  # last seen 2 s ago, as people read it
    rows = site.ask("workers", {})["workers"]
    assert rows[0]["last_seen"] == pytest.approx(clocks.wall - 2.0)
    (job,) = site.ask("submit", {"jobs": [{"command": "true"}]})["jobs"]
    assert site.job(job)["submitted"] == pytest.approx(clocks.wall)


def test_by_default_intervals_are_monotonic(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    s = Site(tmp_path, ctx)
    try:
        assert s.broker.clock is time.monotonic and s.broker.wall is time.time
    finally:
        s.close()


# ---- item 6: a registration in the turn that expires the worker --------------------------------


def test_registration_in_the_expiring_turn_keeps_the_workers_jobs(
    site: Site, clocks: Clocks
) -> None:
    w = site.worker("w1")
    job, token = running_job(site, w)
    # The worker was paused about a liveness window; it comes back on a new connection just
    # as the broker is about to expire it: both land in one turn.
    clocks.mono += WINDOW + HEARTBEAT
    again = site.peer("worker")
    again.send("register", register_body("w1", [[job, token]]))
    assert site.broker.worker.poll(5000)  # queued before the turn starts
    site.broker.step(0)
    assert again.expect(site.broker, "registered") is not None
    assert site.job(job)["state"] == "running"
    assert site.state("w1") == "busy"
    assert not [m for m in again.take() if m.type == "kill_stale"]
    again.send("heartbeat", {"running": [[job, token, None, None]]})
    for _ in range(5):
        site.broker.step(0.005)
    assert not [m for m in again.take() if m.type in ("kill_stale", "reregister")]


# ---- identity and the broker's tables ----------------------------------------------------------


def test_a_crashing_worker_does_not_grow_the_name_table(site: Site, clocks: Clocks) -> None:
    for _ in range(30):
        w = site.worker("w1")
        w.close()  # it crashes; its session expires; it starts again
        clocks.mono += WINDOW + HEARTBEAT
        site.broker.step(0.005)
    assert len(site.broker.names) <= 1
    assert len(site.broker.sessions) <= 1


def test_a_second_live_worker_with_the_name_is_refused(site: Site, clocks: Clocks) -> None:
    first = site.worker("w1", instance="aaaa")
    second = site.peer("worker")
    second.send("register", register_body("w1", instance="bbbb", pid=777), req=9)
    refused = second.expect(site.broker, "error", req=9)
    assert refused["code"] == "conflict"
    assert "in use by a live worker on node (pid 4242)" in refused["message"]
    first.send("heartbeat", {"running": []})
    for _ in range(5):
        site.broker.step(0.005)
    assert not [m for m in first.take() if m.type == "reregister"]
    # The same process on a new connection takes its own session over.
    again = site.worker("w1", instance="aaaa")
    first.send("heartbeat", {"running": []})
    assert first.expect(site.broker, "reregister") is not None
    assert len(site.broker.names) == 1
    # Once that session has expired, the name is free for another process.
    again.close()
    clocks.mono += WINDOW + HEARTBEAT
    site.worker("w1", instance="cccc")


def test_a_message_its_checks_fail_on_is_refused_and_the_broker_goes_on(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a message makes the broker's checks raise (here a fault put into them), that
    message is refused and counted, and the broker answers the next one."""
    real = protocol.decode

    def faulty(payload: bytes, allowed: Any = None) -> protocol.Message:
        if b"trip" in payload:
            raise OverflowError("a check's own fault")
        return real(payload, allowed) if allowed is not None else real(payload)

    monkeypatch.setattr(protocol, "decode", faulty)
    refused = site.broker.refused
    site.tool.send("submit", {"jobs": [{"command": "trip"}]}, 7)
    for _ in range(STEPS):
        site.broker.step(0.005)
        if site.broker.refused > refused:
            break
    assert site.broker.refused == refused + 1
    assert site.ask("submit", {"jobs": [{"command": "true"}]})["jobs"]


def test_what_one_user_waits_on_at_once_is_bounded(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waits on many jobs, piled up, cost the broker memory and turns: past
    MAX_WAITED_PER_USER jobs waited on at once a wait is refused (busy), and once the waits
    before it are answered there is room again."""
    monkeypatch.setattr(server, "MAX_WAITED_PER_USER", 5)
    jobs = site.ask("submit", {"jobs": [{"command": "true", "hold": True}] * 3})["jobs"]
    site.tool.send("wait", {"jobs": jobs}, 50)
    site.tool.send("wait", {"jobs": jobs[:2]}, 51)  # 3 + 2: at the bound
    site.tool.send("wait", {"jobs": jobs[:1]}, 52)  # one more: past it
    refused = site.tool.expect(site.broker, "error", 52)
    assert refused["code"] == "busy" and "MAX_WAITED_PER_USER" in refused["message"]
    assert "waits on 5 jobs in other requests, and this wait adds up to 1" in refused["message"]
    site.tool.send("cancel", {"jobs": jobs}, 53)
    answered = []
    for _ in range(STEPS):
        site.broker.step(0.005)
        answered += [m for m in site.tool.take() if m.type == "waited"]
        if len(answered) == 2:
            break
    assert sorted(m.req for m in answered) == [50, 51]
    assert all(j["state"] == "cancelled" for m in answered for j in m.body["jobs"])
    assert site.broker.waited["local"] == 0
    site.tool.send("wait", {"jobs": jobs}, 54)  # ended jobs: answered at once
    assert site.tool.expect(site.broker, "waited", 54)["timed_out"] is False
