"""Hostile input: thousands of generated malformed messages on both sockets, authenticated and
not. The broker must stay up, keep answering, count the refusals, and change nothing."""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banyan import keys, protocol
from tests.cluster import Cluster, scaled

BATCH = 200
EXAMPLES = 55  # 55 × 200 = 11,000 messages per socket
CHANGES_STATE = {"submit", "cancel", "modify", "close_group", "drain", "register"}
MARK = 987_654_321

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
CLIENT_TYPES = [*sorted(protocol.CLIENT_REQUESTS), "nope", ""]
WORKER_TYPES = [*sorted(protocol.WORKER_TO_BROKER), "assign", "nope"]
FIELDS = [
    "jobs",
    "job",
    "token",
    "command",
    "cpus",
    "name",
    "running",
    "max",
    "groups",
    "depends_on",
    "outcome",
    "since",
    "limit",
    "offset",
]


def packb(value: Any) -> bytes:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"


def structured(types: list[str]) -> st.SearchStrategy[bytes]:
    """One frame with some shape: garbage, msgpack of the wrong shape, a bad envelope, a
    known type with wrong fields, or deep nesting."""
    wrong_fields = st.builds(
        lambda t, req, body: packb([1, t, req, body]),
        st.sampled_from(types),
        st.integers(0, 2**40),
        st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4),
    )
    envelope = st.builds(
        lambda v, t, req, body: packb([v, t, req, body]),
        st.one_of(st.just(1), anything),
        st.one_of(st.sampled_from(types), anything),
        st.one_of(st.integers(0, 2**40), anything),
        anything,
    )
    deep = st.integers(50, 3000).map(lambda n: b"\x91" * n + b"\xc0")
    return st.one_of(
        st.binary(max_size=64), st.builds(packb, anything), wrong_fields, envelope, deep
    )


def expand(bases: list[bytes], seed: int) -> list[list[bytes]]:
    """BATCH messages from a few generated frames: each sent as is, or with bytes flipped,
    cut or inserted, or split over several frames. Hypothesis draws the frames and the seed;
    plain `random` multiplies them, which keeps 10,000 messages cheap to make."""
    rnd = random.Random(seed)
    out = []
    for _ in range(BATCH):
        frame = bytearray(rnd.choice(bases) or b"\x00")
        for _ in range(rnd.choice((0, 0, 1, 2, 5))):
            op, pos = rnd.randrange(3), rnd.randrange(len(frame) or 1)
            if op == 0 and frame:
                frame[pos] = rnd.randrange(256)
            elif op == 1:
                del frame[pos:]
            else:
                frame[pos:pos] = rnd.randbytes(rnd.randrange(1, 9))
        frames = [bytes(frame)]
        if rnd.random() < 0.05:
            frames.append(rnd.randbytes(rnd.randrange(0, 9)))  # a wrong frame count
        out.append(frames)
    return out


def harmless(frames: list[bytes], allowed: frozenset[str]) -> bool:
    """Skip the rare generated message that is in fact a valid state-changing request."""
    if len(frames) != 1:
        return True
    try:
        msg = protocol.decode(frames[0], allowed)
    except protocol.ProtocolError:
        return True
    return msg.type not in CHANGES_STATE


class Fuzzer:
    """A DEALER with the socket kind's key, or (`stranger`) a key of its own the broker does
    not know, with the broker's public key: its handshakes reach the broker's ZAP handler."""

    def __init__(self, cluster: Cluster, port: int, kind: str, stranger: bool = False) -> None:
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        curve = keys.peer(cluster.home, kind)
        assert curve is not None
        if stranger:
            curve = keys.Curve(*zmq.curve_keypair(), curve.server)
        curve.apply(self.sock)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.sent = 0

    def send(self, frames: list[bytes]) -> None:
        # A peer that fails the handshake never gets connected; a blocking send would wait
        # forever for it.
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        self.sent += 1

    def settle(self) -> None:
        """Wait until the broker has read everything sent: its answer to a last bad request."""
        self.sock.send(protocol_error_probe())
        deadline = scaled(60)
        for _ in range(1_000_000):
            assert self.sock.poll(int(deadline * 1000)), "the broker stopped answering"
            msg = protocol.decode(self.sock.recv())
            if msg.req == MARK:
                assert msg.type == "error"
                return
        raise AssertionError("no answer to the probe")

    def close(self) -> None:
        self.sock.close(linger=0)


def protocol_error_probe() -> bytes:
    return packb([1, "no-such-type", MARK, {}])


@pytest.fixture
def seeded(cluster: Cluster) -> Iterator[tuple[Cluster, bytes]]:
    admin = cluster.client()
    admin.submit(
        jobs=[
            {"command": "true", "hold": True, "groups": ["g"]},
            {"command": "echo x", "depends_on": [{"local": 0}], "hold": True},
        ],
        groups=[{"name": "g"}],
    )
    before = cluster.dump()
    yield cluster, before


@pytest.mark.parametrize("socket_kind", ["client", "worker"])
def test_fuzz_changes_nothing(seeded: tuple[Cluster, bytes], socket_kind: str) -> None:
    cluster, before = seeded
    port = cluster.client_port if socket_kind == "client" else cluster.worker_port
    allowed = protocol.CLIENT_REQUESTS if socket_kind == "client" else protocol.WORKER_TO_BROKER
    authed = Fuzzer(cluster, port, socket_kind)
    stranger = Fuzzer(cluster, port, socket_kind, stranger=True)
    types = CLIENT_TYPES if socket_kind == "client" else WORKER_TYPES

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(bases=st.lists(structured(types), min_size=1, max_size=8), seed=st.integers(0, 2**32))
    def blast(bases: list[bytes], seed: int) -> None:
        for frames in expand(bases, seed):
            if harmless(frames, allowed):
                authed.send(frames)
                stranger.send(frames)

    try:
        blast()
        stranger.send([protocol_error_probe()])
        authed.settle()
        assert authed.sent >= 10_000
        assert cluster.procs["broker"].poll() is None
        assert cluster.client().status(all=True).jobs  # alive and answering
        # The stranger's handshakes reached the broker and were refused, so none of its
        # messages did: not even the probe the authenticated peer got an answer to.
        log = cluster.log("broker")
        assert f"refused unknown key on the {socket_kind} socket" in log
        assert not stranger.sock.poll(int(scaled(1) * 1000)), "the stranger got an answer"
    finally:
        authed.close()
        stranger.close()
    assert cluster.dump(restart=False) == before
    log = cluster.log("broker")
    counted = re.findall(r"stopped; (\d+) messages refused", log)
    handshakes = re.findall(r"refused \d+ messages? so far: (\d+) key handshakes?", log)
    assert handshakes and int(handshakes[-1]) >= 1
    assert counted and int(counted[-1]) >= authed.sent * 0.9 + int(handshakes[-1])


def test_an_array_past_what_a_range_can_count_is_refused_and_the_broker_lives(
    seeded: tuple[Cluster, bytes],
) -> None:
    """`0-9223372036854775807` is 2^63 indices, more than len() of a range can say: once, it
    made the broker's check raise an error it did not catch, and the broker exited."""
    cluster, before = seeded
    raw = Fuzzer(cluster, cluster.client_port, "client")
    try:
        for i, spec in enumerate(("0-9223372036854775807", "1-2,0-9223372036854775807:1")):
            body = {"jobs": [{"command": "true"}], "groups": [], "array": spec}
            raw.send([packb([1, "submit", 100 + i, body])])
            assert raw.sock.poll(int(scaled(10) * 1000)), "no answer: is the broker alive?"
            reply = protocol.decode(raw.sock.recv())
            assert (reply.type, reply.req, reply.body["code"]) == ("error", 100 + i, "bad_request")
            assert "over the 200000 one submission may hold" in reply.body["message"]
        raw.settle()
    finally:
        raw.close()
    assert cluster.procs["broker"].poll() is None
    assert cluster.dump() == before
