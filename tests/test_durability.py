"""Persist, then acknowledge (SPEC §7), in one process: a real Broker, a real store under
tmp_path and real ZeroMQ sockets on loopback, stepped by hand. No reply and no assignment
leaves before the commit that holds its effects has returned, a commit that fails sends
nothing, and the broker as deployed commits synchronously."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zmq

from banyan import protocol
from banyan.broker import server
from banyan.broker.server import Broker, BrokerConfig
from banyan.broker.store import StoreError, WriteTx
from banyan.cli import broker as broker_cli
from tests.cluster import scaled

SUBMIT = {"jobs": [{"command": "true"}], "groups": [], "submit_key": None}
REGISTER = {
    "name": "w1",
    "host": "h",
    "cpus": 1.0,
    "memory": 100,
    "gpus": 0,
    "tags": [],
    "running": [],
    "pid": 0,
}
STEPS = 200  # bounds every wait on the broker, with a deadline of a few seconds


class Peers:
    """A broker stepped by hand, a client and a worker that has registered and claims."""

    def __init__(self, root: Path) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        config = BrokerConfig(str(root / "state"), client_port=0, worker_port=0, secure=False)
        self.broker = Broker(config, ctx=self.ctx)
        self.client = self._dealer(self.broker.client_port)
        self.worker = self._dealer(self.broker.worker_port)
        self.worker.send(protocol.encode("register", REGISTER))
        assert self.until(self.worker).type == "registered"
        self.worker.send(protocol.encode("claim", {"max": 4}))
        self.until(lambda: self.claiming())

    def _dealer(self, port: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def claiming(self) -> bool:
        with self.broker.store.read() as tx:
            w = tx.get_worker("w1")
            return w is not None and w.wants > 0

    def until(self, what: zmq.Socket[Any] | Callable[[], bool]) -> Any:
        """Step the broker until `what` (a socket: until it has a message other than a
        heartbeat, returned decoded)."""
        for _ in range(STEPS):
            self.broker.step(timeout=scaled(0.02))
            if not isinstance(what, zmq.Socket):
                if what():
                    return True
                continue
            while what.poll(0):
                msg = protocol.decode(what.recv())
                if msg.type != "heartbeat":
                    return msg
        raise AssertionError(f"nothing came in {STEPS} broker steps")

    def silent(self, sock: zmq.Socket[Any]) -> bool:
        """Whether nothing but heartbeats comes in the next moment."""
        got = []
        while sock.poll(int(scaled(0.3) * 1000)):
            got.append(protocol.decode(sock.recv()).type)
        return set(got) <= {"heartbeat"}

    def jobs(self) -> int:
        with self.broker.store.read() as tx:
            return tx.next_job_id() - 1

    def close(self) -> None:
        self.client.close()
        self.worker.close()
        self.broker.close()
        self.ctx.term()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    p = Peers(tmp_path)
    yield p
    p.close()


def failing_commit(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    """Every outer commit fails (children still merge into their parent, as in LMDB)."""
    real = WriteTx._commit

    def commit(tx: WriteTx) -> None:
        if tx._parent is None:
            raise lmdb.Error(message)
        real(tx)

    monkeypatch.setattr(WriteTx, "_commit", commit)


def test_replies_and_assignments_leave_after_their_commit(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    real_commit, real_send, real_apply = WriteTx._commit, server._send, Broker._apply

    def commit(tx: WriteTx) -> None:
        real_commit(tx)
        if tx._parent is None:
            log.append("commit returned")

    def send(sock: zmq.Socket[Any], identity: bytes, payload: bytes) -> None:
        log.append("send " + protocol.decode(payload).type)
        real_send(sock, identity, payload)

    def apply(self: Broker, *args: Any, **kwargs: Any) -> Any:
        log.append("turn")
        return real_apply(self, *args, **kwargs)

    monkeypatch.setattr(WriteTx, "_commit", commit)
    monkeypatch.setattr(server, "_send", send)
    monkeypatch.setattr(Broker, "_apply", apply)
    peers.client.send(protocol.encode("submit", SUBMIT, 1))
    assert peers.until(peers.client).type == "submitted"
    assert peers.until(peers.worker).type == "assign"
    for sent in ("send submitted", "send assign"):
        turn = max(i for i in range(log.index(sent)) if log[i] == "turn")
        assert "commit returned" in log[turn : log.index(sent)], log


def test_a_failed_commit_sends_nothing(peers: Peers, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that fails for want of the disk (EIO) stops the broker's turn: no reply, no
    assignment, no job. Its client times out and asks again."""
    failing_commit(monkeypatch, "mdb_txn_commit: Input/output error")
    peers.client.send(protocol.encode("submit", SUBMIT, 1))
    with pytest.raises(StoreError):
        peers.until(lambda: False)
    monkeypatch.undo()
    assert peers.silent(peers.client) and peers.silent(peers.worker)
    assert peers.jobs() == 0


def test_a_full_disk_refuses_and_assigns_nothing(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails for want of space: the submitter is told so, the worker gets no
    assignment, and nothing is stored (SPEC §7)."""
    failing_commit(monkeypatch, "mdb_txn_commit: No space left on device")
    peers.client.send(protocol.encode("submit", SUBMIT, 1))
    reply = peers.until(peers.client)
    assert (reply.type, reply.body["code"]) == ("error", "no_space"), reply
    monkeypatch.undo()
    assert peers.silent(peers.worker)
    assert peers.jobs() == 0


def test_the_broker_as_deployed_commits_synchronously(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """banyan-broker's store syncs every commit to disk (no LMDB NOSYNC or NOMETASYNC): an
    acknowledged submission survives power loss, not just a crash of the process."""
    assert BrokerConfig(state_dir="x").sync
    flags: list[Any] = []

    def run(self: Broker) -> None:
        flags.append(self.store._env.flags())
        self.close()
        self.ctx.term()  # its own context; the process would end here

    monkeypatch.setattr(Broker, "run", run)
    monkeypatch.setattr(broker_cli, "daemon_logging", lambda level: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    monkeypatch.setenv("BANYAN_HOME", str(tmp_path / "home"))
    ports = ["--client-port", "0", "--worker-port", "0"]
    assert broker_cli.main([*ports, "--state-dir", str(tmp_path / "state")]) == 0
    (used,) = flags
    assert used["sync"] and used["metasync"], used
