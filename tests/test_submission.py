"""Big submissions made a slice at a time (submission.py), on the pure state machine: they end
exactly as the same submission made at once, a refusal changes nothing, their jobs are held
back from claims until the last slice, and a stored one carries on from its record."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from banyan import defaults, protocol
from banyan.broker import longops, server, submission
from banyan.broker.server import Broker, BrokerConfig
from banyan.broker.state import Actor, Config, Core
from banyan.broker.store import Store
from banyan.errors import Conflict, NotFound
from tests.statekit import ALICE, BOB, Harness, after, spec

DAY = 86400.0
MANY = 20_000  # jobs: several of the broker's slices


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def request(jobs: list[dict[str, Any]], **fields: Any) -> tuple[dict[str, Any], bytes]:
    """A submit body as the broker decodes it, and its frame as it came."""
    frame = protocol.encode("submit", {"jobs": jobs, **fields}, 1)
    return protocol.decode(frame, protocol.CLIENT_REQUESTS).body, frame


def sliced(h: Harness, actor: Actor, body: dict[str, Any], frame: bytes, reload: bool) -> Any:
    """Admit and step a submission to its end, a transaction a step as the server does, the
    record stored between steps; with `reload`, read back from the store each time (as a
    restarted broker would). Returns the reply."""
    admitted = h.do(lambda c: submission.admit(c, actor, body, frame))
    if isinstance(admitted, dict):
        return admitted
    op: submission.Submission = admitted
    for _ in range(100_000):
        if step(h, op):
            return op.reply({})
        if reload:
            with h.store.read() as tx:
                (row,) = tx.ops()
                stored = tx.get_op_request(op.id)
            assert stored == frame
            op = submission.Submission.unpack(row, stored)
    raise AssertionError("the submission never ended")


def step(h: Harness, op: submission.Submission) -> bool:
    """One step in a transaction of its own, stored; True once the submission has ended."""

    def go(c: Core) -> bool:
        finished = op.step(c, 2).finished
        if finished:
            c.tx.delete_op(op.id)
        else:
            c.tx.put_op(op.id, op.pack())
        return finished

    return h.do(go)


def at_once(h: Harness, actor: Actor, body: dict[str, Any]) -> Any:
    """The same submission through Core.submit, as a small one is made."""
    source = submission.Source.of(body)
    return h.do(
        lambda c: c.submit(
            actor,
            source.specs(0, source.count),
            body["groups"],
            body["submit_key"],
            array=source.array is not None,
            digest=source.digest(body["groups"]) if source.templated else None,
        )
    )


def world(h: Harness) -> dict[str, int]:
    """Jobs and groups a submission may depend on: one failed, one running, an open group."""
    h.add_worker("w", cpus=1)
    (failed, running) = h.submit(spec(), spec())
    h.finish("w", h.claim("w")[0], exit_code=3)
    h.claim("w")
    h.submit(spec(groups=["o"]), groups=[{"name": "o", "open": True}])
    return {"failed": failed, "running": running}


def workflow(known: dict[str, int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Local dependencies both ways, a job born doomed and what waits for it, new and open
    groups, every kind of dependency."""
    jobs = [
        spec("a", groups=["g"]),
        spec("b", depends_on=[{"local": 5}]),  # on a later job
        spec("c", depends_on=after(known["failed"])),  # born doomed
        spec("d", depends_on=[{"local": 2}], groups=["g"]),  # waits on the doomed one
        spec("e", depends_on=after(known["failed"], kind="after_fail"), groups=["o"]),
        spec("f", depends_on=[{"kind": "after_any", "local": 0}]),
        spec("g", depends_on=[*after(known["running"]), {"group": "o"}]),
        *(spec(f"h{i}", groups=["g"], hold=i % 2 == 0) for i in range(6)),
        spec("i", depends_on=[{"group": "g"}]),
    ]
    return jobs, [{"name": "g"}, {"name": "o"}]


@pytest.mark.parametrize("reload", [False, True])
def test_a_workflow_in_slices_ends_as_it_would_at_once(tmp_path: Path, reload: bool) -> None:
    one, many = Harness(tmp_path / "one"), Harness(tmp_path / "many")
    known = world(one)
    assert world(many) == known
    jobs, groups = workflow(known)
    body, frame = request(jobs, groups=groups, submit_key="k")
    assert sliced(many, ALICE, body, frame, reload) == at_once(one, ALICE, body)
    assert many.store.dump() == one.store.dump()
    # The same key again: the same reply, nothing made.
    before = many.store.dump()
    assert sliced(many, ALICE, body, frame, reload) == at_once(one, ALICE, body)
    assert many.store.dump() == before


@pytest.mark.parametrize(
    "fields",
    [
        {"array": "0-30:3,100-104"},
        {"each": [f"line {i}" for i in range(17)]},
    ],
    ids=["array", "each"],
)
def test_a_template_in_slices_ends_as_it_would_at_once(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    """Each step makes its jobs from the template and a window of the items; a dependency on
    a failed job dooms every one of them, and they are cancelled once all exist."""
    one, many = Harness(tmp_path / "one"), Harness(tmp_path / "many")
    known = world(one)
    world(many)
    template = spec("echo {}", name="n-{}", groups=["t"], depends_on=after(known["failed"]))
    body, frame = request([template], groups=[{"name": "t"}], **fields)
    reply = sliced(many, BOB, body, frame, reload=True)
    assert reply == at_once(one, BOB, body)
    assert many.store.dump() == one.store.dump()
    first = reply["jobs"][0]
    assert many.job(first).state == "cancelled" and many.job(first).submitted == many.now


def test_a_refused_submission_changes_nothing(h: Harness) -> None:
    world(h)
    before = h.store.dump()
    for jobs, groups, error in [
        ([spec(groups=["nope"])], [], NotFound),
        ([spec(depends_on=after(999))], [], NotFound),
        (
            [spec(groups=["x"]), spec(depends_on=[{"group": "x"}], groups=["x"])],
            [{"name": "x"}],
            Conflict,
        ),
    ]:
        body, frame = request(jobs, groups=groups)
        with pytest.raises(error):
            h.do(functools.partial(submission.admit, actor=ALICE, body=body, request=frame))
    assert h.store.dump() == before
    with h.store.read() as tx:
        assert tx.ops() == [] and tx.next_job_id() == 4


def test_its_jobs_wait_for_the_last_slice_before_any_runs(h: Harness) -> None:
    """Claims pass over what is made until the submission ends; a job submitted after it was
    admitted gets a later id, and runs at once."""
    h.add_worker("w", cpus=4)
    body, frame = request([spec("echo {}")], array="1-20")
    op = h.do(lambda c: submission.admit(c, ALICE, body, frame))
    assert isinstance(op, submission.Submission)

    def held(fn: Callable[[Core], Any]) -> Any:
        """One message, then a match that passes over the submission's jobs (longops.held)."""
        with h.store.write() as tx:
            with tx.child() as child:
                core = Core(child, h.now, h.config)
                result = fn(core)
            matcher = Core(tx, h.now, h.config)
            matcher.held = lambda job_id: op.holds(matcher, job_id)
            matcher.match()
            h.effects += core.effects + matcher.effects
        return result

    held(lambda c: op.step(c, 2))
    (later,) = held(lambda c: c.submit(ALICE, [spec("later")], [])["jobs"])
    assert later == op.first + op.count
    held(lambda c: c.claim("w", 4))
    assert h.assigned("w") == [later]
    while not held(lambda c: op.step(c, 2)).finished:
        assert h.assigned("w") == []
    h.do(lambda c: None, wake=True)  # the submission's end wakes the claims
    assert h.assigned("w") == list(op.ids)[:3]


def test_a_submit_with_the_key_of_one_being_made_waits_for_it(h: Harness) -> None:
    """Its reply is the first one's, which must not come before the jobs it names exist."""
    body, frame = request([spec("echo {}")], array="1-20", submit_key="k")
    op = h.do(lambda c: submission.admit(c, ALICE, body, frame))
    assert isinstance(op, submission.Submission)
    ops = longops.LongOps()
    ops.queue = [longops.Running(op, None, 0)]
    none = longops.Staged()
    assert ops.parks("submit", False, b"c", [b"c", b"x"], none, ("alice", "k"))
    assert not ops.parks("submit", False, b"c", [b"c", b"x"], none, ("alice", "other"))
    assert not ops.parks("submit", False, b"c", [b"c", b"x"], none, ("bob", "k"))
    assert not ops.parks("submit", False, b"c", [b"c", b"x"], none, None)
    assert ops.submitting()  # and retention waits for it


def test_retention_waits_for_a_submission_being_made(tmp_path: Path) -> None:
    """A job a submission depends on may be old enough to purge: it stays until every job of
    the submission is made (one made after it was gone would find its dependency missing)."""
    h = Harness(tmp_path / "state")
    h.add_worker("w")
    (old,) = h.submit(spec())
    h.run_one("w")
    h.now += 2 * DAY
    body, frame = request([spec("echo {}", depends_on=after(old))], array=f"1-{MANY}")
    op = h.do(lambda c: submission.admit(c, ALICE, body, frame))
    assert isinstance(op, submission.Submission)
    step(h, op)  # under way, as a broker killed in the middle leaves it
    h.store.close()

    config = BrokerConfig(
        state_dir=str(tmp_path / "state"),
        client_port=0,
        worker_port=0,
        core=Config(retention=DAY),
        sync=False,
        secure=False,
    )
    clock = [h.now]
    broker = Broker(config, clock=lambda: clock[0], wall=lambda: clock[0])
    try:
        for _ in range(10_000):
            broker.step(timeout=0)
            with broker.store.read() as tx:
                if not tx.ops():
                    break
                assert tx.get_job(old) is not None, "purged while the submission was made"
        with broker.store.read() as tx:
            assert tx.ops() == [] and tx.state_counts()["available"] == MANY
        clock[0] += 2 * defaults.PURGE_REST
        for _ in range(100):
            broker.step(timeout=0)
        with broker.store.read() as tx:
            assert tx.get_job(old) is None  # purged once the submission was made
    finally:
        broker.close()


def test_the_map_grows_before_a_turn_rather_than_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn that ran out of map was run again from scratch once the map had grown (a whole
    big submission, twice, in a fresh store): the broker makes room before each turn."""
    small = functools.partial(Store, map_size=1 << 20)
    monkeypatch.setattr(server, "Store", small)
    runs: list[int] = []
    grow = Store._grow

    def counted(self: Store, failure: str | None) -> None:
        runs.append(self.map_size)
        grow(self, failure)

    monkeypatch.setattr(Store, "_grow", counted)
    config = BrokerConfig(
        str(tmp_path / "state"), client_port=0, worker_port=0, sync=False, secure=False
    )
    broker = Broker(config, actor=ALICE)
    client = broker.ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{broker.client_port}")
    try:
        body = {"jobs": [spec("echo {}", hold=True)], "array": f"1-{MANY}"}
        client.send(protocol.encode("submit", body, 1))
        for _ in range(10_000):
            broker.step(timeout=0.01)
            if client.poll(0):
                break
        assert client.poll(0), "no reply"
        reply = protocol.decode(client.recv(), protocol.CLIENT_REPLIES)
        assert reply.type == "submitted" and len(reply.body["jobs"]) == MANY
        assert runs == [], f"turns ran again after the map grew from {runs}"
        assert broker.store.map_size > 1 << 20
    finally:
        client.close()
        broker.close()
