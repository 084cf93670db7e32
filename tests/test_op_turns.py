"""Long operations of one user do not hold everyone else up (docs/cli.md, "Many jobs at once"):
when one ends, the requests that waited and are not operations run before the next starts,
users' operations take turns, and a user may have only a few waiting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from banyan import protocol
from banyan.broker import bulk, longops, server
from banyan.broker.server import Broker, BrokerConfig
from banyan.client import Client
from banyan.errors import Busy
from tests.cluster import Cluster, scaled, wait_for

JOBS = 5000  # bob's: each of his operations moves all of them, in many slices


def _moves(client: Client, owner: str, hold: bool) -> dict[str, Any]:
    """A modify_many body that holds (or releases) every job of `owner`'s that it can."""
    state = "available" if hold else "inactive"
    select = Client.select(owner=owner, state=state)
    return {"jobs": [], "select": select, "set": {}, "hold": hold, "release": not hold}


class Inbox:
    """The replies one client has had so far, by request number, read without waiting."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.replies: dict[int, protocol.Message] = {}
        self.order: list[int] = []

    def read(self, wait: float = 0.0) -> None:
        sock = self.client.sock
        while sock.poll(int(wait * 1000), zmq.POLLIN):
            msg = protocol.decode(sock.recv(), protocol.CLIENT_REPLIES)
            if msg.type == "pong":
                continue  # the client's own, when it waited for the broker
            self.replies[msg.req] = msg
            self.order.append(msg.req)
            wait = 0.0

    def done(self, reqs: range) -> int:
        return sum(1 for r in reqs if r in self.replies)


def test_one_users_queued_operations_do_not_hold_up_the_others(cluster: Cluster) -> None:
    bob, alice = cluster.user_client("bob", timeout=60), cluster.user_client("alice")
    bob.submit("true", array=f"1-{JOBS}", hold=True)
    mine = alice.submit("true", array="1-10", hold=True).jobs
    head = alice.events_head()

    # Bob pipelines operations, each over all his jobs, then a status of his own.
    ops = range(1, longops.MAX_WAITING_PER_USER + 3)
    for req in ops:
        bob.sock.send(protocol.encode("modify_many", _moves(bob, "bob", hold=req % 2 == 0), req))
    last_op, refused, read_after = ops[-2], ops[-1], ops[-1] + 1
    bob.sock.send(protocol.encode("status", {"owner": "bob", "limit": 1}, read_after))
    wait_for(lambda: alice.events(head, 1)[0], what="bob's first operation to begin")

    # Alice asks for a status, then starts an operation of her own.
    alice.sock.send(protocol.encode("status", {"owner": "bob", "limit": 1}, 1))
    alice.sock.send(protocol.encode("modify_many", _moves(alice, "alice", hold=False), 2))
    theirs, hers = Inbox(bob), Inbox(alice)
    theirs.read()
    asked = theirs.done(ops[:-1])  # bob's that had ended, or more, when alice's came
    assert asked <= 2, "bob's operations were nearly all over; nothing was tested"
    bob_done_when: dict[int, int] = {}
    deadline = time.monotonic() + scaled(60)
    while len(hers.replies) < 2 or read_after not in theirs.replies:
        assert time.monotonic() < deadline, f"replies so far: {hers.order}, {theirs.order}"
        hers.read(0.02)
        theirs.read()  # bob's replies sent before hers are here by now
        for req in hers.replies:
            bob_done_when.setdefault(req, theirs.done(ops[:-1]))
    # Every reply saw bob's operations whole: all his jobs held, or all queued.
    for seen in (hers.replies[1], theirs.replies[read_after]):
        assert seen.type == "status" and len(seen.body["counts"]) == 1, seen.body["counts"]
    assert hers.replies[2].type == "modified" and hers.replies[2].body["modified"] == mine
    # Alice waited for the operation that ran when she asked, not for bob's whole queue, and
    # her requests were answered in her order.
    assert hers.order == [1, 2]
    said = f"alice asked after {asked} of bob's, and was answered after {bob_done_when}"
    assert bob_done_when[1] <= asked + 1, said  # the one running when she asked
    assert bob_done_when[2] <= asked + 2, said  # her turn came next

    # Bob's one too many was refused at once, saying why; the rest ran, in his order.
    error = theirs.replies[refused]
    assert error.type == "error" and error.body["code"] == "busy", error.body
    assert f"at most {longops.MAX_WAITING_PER_USER}" in error.body["message"]
    assert all(theirs.replies[r].type == "modified" for r in ops[:-1])
    assert [r for r in theirs.order if r != refused] == [*ops[:-1], read_after]
    assert len(theirs.replies[last_op].body["modified"]) == JOBS


# ---- the rule itself, on LongOps alone ----------------------------------------------------------


def _op(op_id: int, actor: str) -> longops.Running:
    op = bulk.Op(op_id, bulk.CANCEL, actor, "user", 0, [], [], None, {"reason": None})
    return longops.Running(op, actor.encode(), op_id)


def _parked(client: str, user: str, op: bool, tag: str) -> longops.Parked:
    return longops.Parked(
        ("client", [client.encode(), tag.encode()], user), client.encode(), user, op
    )


def test_after_an_operation_the_reads_go_first_then_the_user_served_longest_ago() -> None:
    ops = longops.LongOps()
    staged = longops.Staged(head=_op(1, "bob"))
    waiting = [
        _parked("b", "bob", True, "bob-op-2"),
        _parked("b", "bob", False, "bob-read"),  # behind bob's own operation
        _parked("a", "alice", False, "alice-read"),
        _parked("c", "carol", True, "carol-op"),
        _parked("a", "alice", True, "alice-op"),
        _parked("d", "dan", False, "dan-read"),
    ]
    for p in waiting:
        assert ops.parks("cancel" if p.op else "status", p.op, p.client, p.inbound[1], staged)
        ops.park(p, staged)
    assert ops.commit(staged, []) == []  # bob's operation runs on
    done = longops.Staged(ended=True)  # carol and alice never ran one; carol asked first
    late = _parked("e", "erin", False, "erin-read").inbound  # left over by a busy turn
    free = ops.commit(done, [late])
    assert [f[1][1] for f in free] == [b"alice-read", b"dan-read", b"erin-read", b"carol-op"]
    # Let go, they run, unless an operation started before them in the same turn.
    carol = free[-1]
    assert not ops.parks("cancel", True, b"c", carol[1], longops.Staged())
    assert ops.parks("status", False, b"a", free[0][1], longops.Staged(head=_op(2, "carol")))
    # Those kept still wait: bob's read behind his own operation, every operation its turn.
    assert ops.parks("status", False, b"b", [b"b", b"new"], longops.Staged())
    assert ops.parks("cancel", True, b"e", [b"e", b"new"], longops.Staged())
    assert not ops.parks("status", False, b"e", [b"e", b"new"], longops.Staged())


def test_a_user_may_have_only_a_few_operations_waiting() -> None:
    ops = longops.LongOps()
    staged = longops.Staged(head=_op(1, "bob"))
    for i in range(longops.MAX_WAITING_PER_USER):
        ops.park(_parked(f"b{i}", "bob", True, "op"), staged)
    ops.park(_parked("b9", "bob", False, "read"), staged)  # reads are not operations
    ops.park(_parked("a", "alice", True, "op"), staged)  # nor are another user's
    with pytest.raises(Busy, match="MAX_WAITING_PER_USER"):
        ops.park(_parked("b9", "bob", True, "op"), staged)


def test_requests_a_busy_turn_leaves_are_answered_while_an_operation_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn past its budget leaves the rest of its requests for the next one; the slice of
    the running operation that follows in the same step lost them (a ping sent with a big
    submission was never answered)."""
    monkeypatch.setattr(server, "TURN_BUDGET", 0.0)  # every turn serves one request
    config = BrokerConfig(
        str(tmp_path / "state"), client_port=0, worker_port=0, sync=False, secure=False
    )
    broker = Broker(config)
    client = broker.ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{broker.client_port}")
    try:
        body = {"jobs": [{"command": "true", "hold": True}], "array": "1-20000"}
        client.send(protocol.encode("submit", body, 1))
        for req in range(2, 7):
            client.send(protocol.encode("ping", {}, req))
        answered: list[int] = []
        for _ in range(2000):  # the submission takes a few hundred of them
            broker.step(timeout=0.005)
            while client.poll(0):
                answered.append(protocol.decode(client.recv(), protocol.CLIENT_REPLIES).req)
            if len(answered) == 6:
                break
        assert sorted(answered) == [1, 2, 3, 4, 5, 6]
    finally:
        client.close()
        broker.close()
