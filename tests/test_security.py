"""CurveZMQ identities and roles (SPEC §6): who may connect where, and who may touch what."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import zmq

from banyan import keys, protocol
from banyan.client import BrokerUnavailable, Client
from banyan.errors import Forbidden
from tests.cluster import Cluster, scaled, wait_for


def home_for(cluster: Cluster, role: str, name: str, kind: str = "client") -> Path:
    """A machine's BANYAN_HOME set up as `banyan-keygen` tells the operator to."""
    _, secret, _ = keys.issue(cluster.home, role, name)
    home = cluster.root / f"home-{name}"
    (home / "keys").mkdir(parents=True)
    shutil.copyfile(secret, home / "keys" / f"{kind}.key_secret")
    (home / "keys" / f"{kind}.key_secret").chmod(0o600)  # as the instructions say
    shutil.copyfile(cluster.home / "keys" / "broker.key", home / "keys" / "broker.key")
    return home


def client(cluster: Cluster, home: Path, timeout: float = 1.0) -> Client:
    c = Client(f"127.0.0.1:{cluster.client_port}", home, timeout=scaled(timeout))
    cluster.clients.append(c)
    return c


def test_client_without_keys_or_with_unknown_key_gets_nothing(cluster: Cluster) -> None:
    admin = cluster.client()
    admin.submit("true", hold=True)
    before = cluster.dump()
    nokeys = client(cluster, cluster.root / "empty-home")
    with pytest.raises(BrokerUnavailable):
        nokeys.submit("true")
    stranger = cluster.root / "stranger"
    (stranger / "keys").mkdir(parents=True)
    zmq.auth.create_certificates(stranger / "keys", "client")
    shutil.copyfile(cluster.home / "keys" / "broker.key", stranger / "keys" / "broker.key")
    with pytest.raises(BrokerUnavailable):
        client(cluster, stranger).submit("true")
    assert cluster.dump() == before


def test_worker_key_refused_on_client_socket(cluster: Cluster) -> None:
    home = home_for(cluster, "worker", "node7")
    with pytest.raises(BrokerUnavailable):
        client(cluster, home).status()
    assert cluster.client().status(all=True).jobs == []


def test_user_key_refused_on_worker_socket(cluster: Cluster) -> None:
    home = home_for(cluster, "user", "carol", kind="worker")
    cluster.env["BANYAN_HOME"] = str(home)
    cluster.start_worker("sneaky", wait=False)
    cluster.env["BANYAN_HOME"] = str(cluster.home)
    admin = cluster.client()
    with pytest.raises(AssertionError):
        wait_for(lambda: admin.workers(), 2, what="a worker")
    assert "refused a user key on the worker socket" in cluster.log("broker")


def test_users_touch_only_their_own_jobs(cluster: Cluster) -> None:
    alice = client(cluster, home_for(cluster, "user", "alice"), timeout=5)
    bob = client(cluster, home_for(cluster, "user", "bob"), timeout=5)
    (job,) = alice.submit("true", hold=True).jobs
    assert alice.job(job).owner == "alice"
    with pytest.raises(Forbidden, match="belongs to alice"):
        bob.cancel([job])
    with pytest.raises(Forbidden, match="belongs to alice"):
        bob.modify(job, priority=5)
    with pytest.raises(Forbidden, match="admins"):
        bob.drain("anyone")
    assert bob.job(job).state == "inactive"  # users see all jobs
    admin = cluster.client()
    admin.modify(job, priority=5)
    assert admin.cancel([job]).cancelled == [job]


def test_revoked_key_stops_at_next_connection(cluster: Cluster) -> None:
    home = home_for(cluster, "user", "dave")
    client(cluster, home).ping()
    (cluster.home / "keys" / "authorized" / "user" / "dave.key").unlink()
    with pytest.raises(BrokerUnavailable):
        client(cluster, home).ping()


def test_owner_is_the_key_not_the_message(cluster: Cluster) -> None:
    eve = client(cluster, home_for(cluster, "user", "eve"), timeout=5)
    with pytest.raises(Exception, match="owner"):
        eve.submit("true", owner="root")  # not a field anyone may send
    (job,) = eve.submit("true", hold=True).jobs
    assert eve.job(job).owner == "eve"


class RawWorker:
    """A worker that speaks the protocol by hand, to send reports a real one never would."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        curve = keys.peer(cluster.home, "worker")
        assert curve is not None
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        curve.apply(self.sock)
        self.sock.connect(f"tcp://127.0.0.1:{cluster.worker_port}")
        self.send(
            "register",
            {
                "name": name,
                "host": "h",
                "cpus": 1.0,
                "memory": 100,
                "gpus": 0,
                "tags": [],
                "running": [],
                "pid": 1,
            },
        )
        self.expect("registered")

    def send(self, kind: str, body: dict[str, Any]) -> None:
        self.sock.send(protocol.encode(kind, body))

    def expect(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        deadline = scaled(timeout)
        for _ in range(100):
            if not self.sock.poll(int(deadline * 1000)):
                break
            msg = protocol.decode(self.sock.recv(), protocol.BROKER_TO_WORKER)
            if msg.type == kind:
                return msg.body
        raise AssertionError(f"no {kind} within {deadline} s")

    def close(self) -> None:
        self.sock.close(linger=0)


def test_worker_cannot_report_on_another_workers_attempt(cluster: Cluster) -> None:
    honest = RawWorker(cluster, "honest")
    rogue = RawWorker(cluster, "rogue")
    try:
        admin = cluster.client()
        (job,) = admin.submit("true").jobs
        honest.send("claim", {"max": 1})
        (a,) = honest.expect("assign")["jobs"]
        result = {
            "job": job,
            "token": a["token"],
            "outcome": "exited",
            "exit_code": 0,
            "signal": None,
            "stdout_tail": b"",
            "stderr_tail": b"",
        }
        rogue.send("result", result)
        assert rogue.expect("kill_stale") == {"job": job, "token": a["token"]}
        rogue.send("result", {**result, "token": a["token"] + 1000})  # a stale token
        assert rogue.expect("kill_stale")["token"] == a["token"] + 1000
        assert admin.job(job).state == "running"
        honest.send("result", result)
        honest.expect("ack")
        assert admin.job(job).outcome == "success"
    finally:
        honest.close()
        rogue.close()


def test_a_key_added_or_revoked_within_one_tick_of_the_last_read_is_seen(tmp_path: Path) -> None:
    """A directory's mtime moves in coarse ticks: a change in the same tick as the last read
    leaves it as it was. The authorizer must still see the new key, and miss the revoked one."""
    home = tmp_path / "home"
    keys.ensure_local(home)
    authorizer = keys.Authorizer(home)
    users = keys.keys_dir(home) / "authorized" / "user"
    _, _, first = keys.issue(home, "user", "alice", "root")
    public_of = {p.stem: zmq.auth.load_certificate(p)[0] for p in users.glob("*.key")}
    assert authorizer.lookup(public_of["alice"]) is not None  # read now
    tick = users.stat().st_mtime_ns
    _, _, second = keys.issue(home, "user", "bob", "root")
    os.utime(users, ns=(tick, tick))  # as if in the same tick as the read
    bob = zmq.auth.load_certificate(second)[0]
    assert authorizer.lookup(bob) is not None
    first.unlink()
    os.utime(users, ns=(tick, tick))
    assert authorizer.lookup(public_of["alice"]) is None
