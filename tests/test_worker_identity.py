"""Telling workers apart (docs/operations.md, "Names"): where each registered from, as ZeroMQ
saw the connection, and which worker key it used, in the broker's log and `banyan-workers`.
The broker in-process with CurveZMQ keys made as on a first start, real sockets on loopback
(each worker connecting from its own 127.0.0.x address, as two machines would) and LMDB."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from banyan import keys, protocol
from banyan.broker.server import Broker, BrokerConfig
from banyan.broker.state import Config
from banyan.cli.workers import render
from banyan.client import WorkerInfo
from tests.test_broker_clock import STEPS, WINDOW, Clocks, register_body


class Site:
    """A keyed broker on random loopback ports, with clocks of the test's own."""

    def __init__(self, root: Path, ctx: zmq.Context[Any]) -> None:
        self.ctx, self.home, self.clocks = ctx, root / "home", Clocks()
        config = BrokerConfig(
            state_dir=str(root / "state"),
            client_port=0,
            worker_port=0,
            core=Config(heartbeat=1.0, liveness=5),
            sync=False,
            home=self.home,
        )
        clocks = self.clocks
        self.broker = Broker(config, ctx=ctx, clock=lambda: clocks.mono, wall=lambda: clocks.wall)
        self.socks: list[zmq.Socket[Any]] = []
        self.tool = self.connect(self.broker.client_port, self._curve("client"))

    def _curve(self, kind: str) -> keys.Curve:
        curve = keys.peer(self.home, kind)
        assert curve is not None
        return curve

    def issued(self, name: str) -> keys.Curve:
        """A worker key made with banyan-keygen (keys.issue), as its machine would load it."""
        _, secret, _ = keys.issue(self.home, "worker", name)
        public, private = zmq.auth.load_certificate(secret)
        assert private is not None
        return keys.Curve(public, private, self._curve("worker").server)

    def connect(self, port: int, curve: keys.Curve, source: str = "127.0.0.1") -> Any:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        curve.apply(sock)
        sock.connect(f"tcp://{source}:0;127.0.0.1:{port}")  # from `source`, as a machine there
        self.socks.append(sock)
        return sock

    def expect(self, sock: zmq.Socket[Any], kind: str) -> dict[str, Any]:
        for _ in range(STEPS):
            self.broker.step(0.005)
            while sock.poll(0):
                msg = protocol.decode(sock.recv())
                if msg.type == kind:
                    return msg.body
        raise AssertionError(f"no {kind} within {STEPS} broker turns")

    def worker(self, name: str, source: str, curve: keys.Curve | None = None, **extra: Any) -> Any:
        sock = self.connect(self.broker.worker_port, curve or self._curve("worker"), source)
        sock.send(protocol.encode("register", register_body(name, **extra)))
        return sock

    def workers(self) -> dict[str, dict[str, Any]]:
        self.tool.send(protocol.encode("workers", {}, 1))
        return {w["name"]: w for w in self.expect(self.tool, "workers")["workers"]}

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.broker.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    ctx: zmq.Context[Any] = zmq.Context()
    s = Site(tmp_path, ctx)
    yield s
    s.close()
    ctx.destroy(linger=0)  # a failed test's open sockets must not hang its teardown


def test_clones_with_one_host_name_are_told_apart_by_address_and_key(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="banyan.broker")
    first = site.worker("w1", "127.0.0.2", instance="aaaa")
    site.expect(first, "registered")
    clone = site.worker("w1", "127.0.0.3", site.issued("node-a"), instance="bbbb", pid=777)
    assert site.expect(clone, "error")["code"] == "conflict"
    log = caplog.text
    assert (
        "worker w1 registered from node at 127.0.0.2 (pid 4242, key local-worker): "
        "2 cpus, 1000 MiB, 0 gpus, 0 running"
    ) in log
    assert (
        "refused a second worker named w1 from node at 127.0.0.3 (pid 777, key node-a): "
        "the one from node at 127.0.0.2 (pid 4242, key local-worker) was heard from 0.0 s ago"
    ) in log
    row = site.workers()["w1"]
    assert (row["host"], row["address"], row["key"]) == ("node", "127.0.0.2", "local-worker")


def test_a_worker_key_may_register_under_any_name_and_says_which_key_it_is(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="banyan.broker")
    impostor = site.worker("impostor", "127.0.0.4", site.issued("node-a"))
    site.expect(impostor, "registered")
    assert "worker impostor registered from node at 127.0.0.4 (pid 4242, key node-a)" in (
        caplog.text
    )
    assert site.workers()["impostor"]["key"] == "node-a"
    # Gone, it still shows where it was and with which key.
    site.clocks.mono += WINDOW + 1
    for _ in range(5):
        site.broker.step(0.005)
    gone = site.workers()["impostor"]
    assert (gone["state"], gone["address"], gone["key"]) == ("lost", "127.0.0.4", "node-a")


def test_banyan_workers_long_shows_address_and_key() -> None:
    found = [
        WorkerInfo(
            "w1", "node", "idle", 2, 1000, 0, 0, 0, 0, [], [], 0, 0.0, address="10.0.0.2", key="w1"
        ),
        WorkerInfo(
            "w2", "node", "idle", 2, 1000, 0, 0, 0, 0, [], [], 0, 0.0, address="10.0.0.3", key=None
        ),
    ]
    lines = render(found, color=False, long=True).splitlines()
    assert lines[0].split()[:5] == ["NAME", "HOST", "ADDRESS", "KEY", "STATE"]
    assert lines[1].split()[:5] == ["w1", "node", "10.0.0.2", "w1", "idle"]
    assert lines[2].split()[:5] == ["w2", "node", "10.0.0.3", "-", "idle"]
    assert "ADDRESS" not in render(found, color=False)


def test_a_registration_again_on_a_known_connection_keeps_its_address(site: Site) -> None:
    w = site.worker("w1", "127.0.0.5", instance="aaaa")
    site.expect(w, "registered")
    w.send(protocol.encode("register", register_body("w1", instance="aaaa")))
    site.expect(w, "registered")
    assert site.workers()["w1"]["address"] == "127.0.0.5"
