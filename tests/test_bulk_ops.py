"""Long operations and selectors (bulk.py, selectors.py) on the pure state machine: in slices
they end exactly as they would in one go, a refusal changes nothing, and what they mean is
held back from claims until they end."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banyan import defaults
from banyan.broker import bulk, history
from banyan.broker.selectors import ALL, Selector
from banyan.broker.state import Actor, Core
from banyan.broker.store import ReadTx
from banyan.errors import BadRequest, Forbidden, NotFound
from tests.statekit import ALICE, BOB, ROOT, Harness, after, spec


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def body(**kw: Any) -> dict[str, Any]:
    """A cancel or modify_many body as decoded: every field present."""
    out: dict[str, Any] = {"jobs": [], "groups": [], "reason": None, "select": None}
    out |= {"set": {}, "hold": False, "release": False}
    return out | kw


def select(**kw: Any) -> dict[str, Any]:
    return {"ids": [], "owner": None, "state": None, "name": None, "group": None} | kw


def run(h: Harness, actor: Actor, kind: str, b: dict[str, Any], per_step: int) -> dict[str, Any]:
    """Admit and step an operation to its end, one transaction a step as the server does,
    storing it between steps; returns the reply lists (each job once)."""
    op = h.do(lambda c: bulk.admit(c, actor, kind, b))
    lists = bulk.empty(op)
    seen: set[int] = set()
    for _ in range(10_000):
        done = h.do(lambda c: bulk.step(c, op, per_step))
        for what, items in done.lists.items():
            for item in items:
                job_id = item[0] if isinstance(item, list) else item
                if job_id not in seen:
                    seen.add(job_id)
                    lists[what].append(item)
        if done.finished:
            return lists
        h.do(lambda c: c.tx.put_op(op.id, op.pack()))
    raise AssertionError("the operation never ended")


def workflow(h: Harness) -> list[int]:
    """A group of 30 (one running, one held), an open group, jobs downstream of both."""
    h.add_worker("w", cpus=1)
    ids = h.submit(
        *(spec(groups=["g"], hold=i == 3) for i in range(30)),
        spec(groups=["o"]),
        groups=[{"name": "g"}, {"name": "o", "open": True}],
    )
    h.claim("w")
    ids += h.submit(spec(depends_on=[{"group": "g"}]), spec(depends_on=after(ids[5])))
    ids += h.submit(spec(depends_on=[{"group": "o"}]))
    return ids


@pytest.mark.parametrize("per_step", [1, 7, 1000])
def test_a_cancel_in_slices_ends_as_it_would_in_one_go(tmp_path: Path, per_step: int) -> None:
    one, sliced = Harness(tmp_path / "one"), Harness(tmp_path / "sliced")
    ids = workflow(one)
    assert workflow(sliced) == ids
    named = [ids[2], ids[30], ids[2]]
    expected = one.do(lambda c: c.cancel(ALICE, named, ["g", "o"], "enough"))
    b = body(jobs=named, groups=["g", "o"], reason="enough")
    got = run(sliced, ALICE, bulk.CANCEL, b, per_step)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
    assert one.store.dump() == sliced.store.dump()
    assert sliced.state(ids[0]) == "pending_cancellation"
    assert sliced.state(ids[-1]) == sliced.state(ids[-2]) == "cancelled"


@pytest.mark.parametrize("per_step", [1, 1000])
def test_a_sliced_cancel_of_open_groups_settles_their_dependents_once(
    h: Harness, per_step: int
) -> None:
    """A member ending in the cancel completes its group, or the sealing does if every member
    had ended: either way the group's dependents count it done once."""
    h.add_worker("w")
    h.submit(spec(groups=["done"]), groups=[{"name": "done", "open": True}])
    h.run_one("w")  # the only member of "done" ends; the group stays open
    h.submit(spec(groups=["o"]), groups=[{"name": "o", "open": True}])
    ids = h.submit(
        spec(hold=True, depends_on=[{"kind": "after_any", "group": "o"}]),
        spec(hold=True, depends_on=[{"kind": "after_any", "group": "done"}]),
    )
    run(h, ALICE, bulk.CANCEL, body(groups=["o", "done"]), per_step)
    assert [h.job(j).pending for j in ids] == [0, 0]


def test_a_refusal_while_checking_changes_nothing(h: Harness) -> None:
    ids = h.submit(*(spec(groups=["g"]) for _ in range(20)), groups=[{"name": "g"}])
    (bobs,) = h.submit(spec(), actor=BOB)
    before = h.store.dump()
    for named, error in (([*ids, 999], NotFound), ([*ids, bobs], Forbidden)):
        with pytest.raises(error):
            run(h, ALICE, bulk.CANCEL, body(jobs=named, groups=["g"]), per_step=3)
        assert h.store.dump() == before  # the group is not even sealed


@pytest.mark.parametrize("per_step", [1, 1000])
def test_a_cancel_asked_each_answers_per_target_and_cancels_the_rest(
    h: Harness, per_step: int
) -> None:
    ids = h.submit(spec(), spec(groups=["g"]), groups=[{"name": "g"}])
    (bobs,) = h.submit(spec(groups=["b"]), actor=BOB, groups=[{"name": "b"}])
    named = [ids[0], 999, bobs]
    b = body(jobs=named, groups=["nope", "b", "g"], each=True)
    got = run(h, ALICE, bulk.CANCEL, b, per_step)
    assert got["cancelled"] == [ids[1], ids[0]]
    assert got["errors"] == [
        ["nope", "not_found", "no group 'nope'"],
        ["b", "forbidden", "group 'b' belongs to bob"],
        [999, "not_found", "no job 999"],
        [bobs, "forbidden", f"job {bobs} belongs to bob; only they or an admin may cancel it"],
    ]
    assert [h.state(j) for j in (*ids, bobs)] == ["cancelled", "cancelled", "available"]
    plain = run(h, ALICE, bulk.CANCEL, body(jobs=[ids[0]]), per_step)
    assert "errors" not in plain  # the reply's shape is unchanged unless asked


def test_a_users_selector_means_only_their_own_jobs(h: Harness) -> None:
    mine = h.submit(spec(), spec())
    theirs = h.submit(spec(), actor=BOB)
    more = h.submit(spec())
    got = run(h, ALICE, bulk.CANCEL, body(select=select(ids=[[1, 100]])), per_step=2)
    assert got == {"cancelled": [*mine, *more], "pending": [], "already": []}
    assert h.state(theirs[0]) == "available"
    with pytest.raises(Forbidden):
        h.do(lambda c: bulk.admit(c, ALICE, bulk.CANCEL, body(select=select(owner="bob"))))
    got = run(h, ROOT, bulk.CANCEL, body(select=select(owner="bob")), per_step=2)
    assert got["cancelled"] == theirs


def test_a_selector_never_means_jobs_submitted_after_it(h: Harness) -> None:
    first = h.submit(*(spec() for _ in range(5)))
    op = h.do(lambda c: bulk.admit(c, ALICE, bulk.CANCEL, body(select=select(state="available"))))
    later = h.submit(spec())
    while not h.do(lambda c: bulk.step(c, op, 2)).finished:
        pass
    assert [h.state(j) for j in first] == ["cancelled"] * 5
    assert h.state(later[0]) == "available"


def test_selectors_walk_their_index_and_match_every_criterion(h: Harness) -> None:
    names = itertools.cycle(["seed-1", "seed-2", "other", ""])
    ids = []
    for i in range(40):
        who = ROOT if i % 4 == 0 else ALICE if i % 3 else BOB  # only root may join root's g
        groups = ["g"] if i % 4 == 0 else []
        fields = {"name": next(names), "hold": i % 5 == 0, "groups": groups}
        listed = [{"name": "g", "open": True}] if i == 0 else []
        ids += h.submit(spec(f"cmd {i}", **fields), actor=who, groups=listed)
    h.add_worker("w", cpus=3)
    h.claim("w", 3)
    with h.store.read() as tx:
        jobs = [tx.get_job(i) for i in ids]
        group = tx.group_by_name("g")
        assert group is not None
        selectors = [
            Selector(),
            Selector(ranges=((5, 9), (30, 32), (1, 2))),
            Selector(owner="bob"),
            Selector(owner="alice", states=("available", "running")),
            Selector(states=("inactive",)),
            Selector(name="seed-*"),
            Selector(name="cmd 1*"),  # no name: the command is what is shown
            Selector(group=group.id, states=("available",)),
            Selector(ranges=((10, 25),), owner="alice", name="*2", states=ALL),
        ]
        for sel in selectors:
            want = [j.id for j in jobs if j is not None and sel.matches(j)]
            for descending in (False, True):
                walked = list(sel.ids(tx, descending=descending))
                assert len(walked) == len(set(walked))
                assert walked == sorted(walked, reverse=descending)
                got = [i for i in walked if (j := tx.get_job(i)) is not None and sel.matches(j)]
                assert got == (want[::-1] if descending else want), sel
                if sel.indexed:
                    assert got == walked, sel


def test_modify_many_changes_what_it_may_and_skips_the_rest(h: Harness) -> None:
    h.add_worker("w", cpus=1)
    ids = h.submit(spec(), spec(), spec(hold=True))
    h.claim("w")
    b = body(jobs=ids, set={"priority": 7})
    got = run(h, ALICE, bulk.MODIFY, b, per_step=1)
    assert got["modified"] == ids[1:]
    rule = "priority: may only be changed while the job is available or inactive"
    assert got["skipped"] == [[ids[0], f"{rule} (job {ids[0]} is running)"]]
    assert [h.job(j).priority for j in ids] == [0, 7, 7]
    # A job refused halfway (held and its priority set, then a dependency that does not
    # exist) keeps nothing of it.
    change = {"priority": 1, "depends_on": [{"job": 999}]}
    got = run(h, ALICE, bulk.MODIFY, body(jobs=[ids[1]], set=change, hold=True), 1)
    assert got["skipped"] == [[ids[1], "jobs[0].depends_on[0]: no job 999"]]
    assert (h.state(ids[1]), h.job(ids[1]).priority) == ("available", 7)
    got = run(h, ALICE, bulk.MODIFY, body(select=select(state="inactive"), release=True), 5)
    assert got == {"modified": [ids[2]], "skipped": []}
    assert h.state(ids[2]) == "available"


def test_what_an_operation_means_is_held_back_from_claims(h: Harness) -> None:
    h.add_worker("w", cpus=4)
    targets = h.submit(*(spec(groups=["g"]) for _ in range(3)), groups=[{"name": "g"}])
    (named,) = h.submit(spec())
    others = h.submit(spec(), spec())
    b = body(jobs=[named], groups=["g"])
    op = h.do(lambda c: bulk.admit(c, ALICE, bulk.CANCEL, b))

    def claim(c: Core) -> None:
        c.held = lambda job_id: op.holds(c, job_id)
        c.claim("w", 4)
        c.match()
        c.wake = False  # matched here, with the operation's targets held back

    h.do(claim)
    assert h.assigned("w") == others
    assert [h.state(j) for j in [*targets, named]] == ["available"] * 4
    while not h.do(lambda c: bulk.step(c, op, 1)).finished:
        pass
    assert [h.state(j) for j in [*targets, named]] == ["cancelled"] * 4


# ---- an array is one handle: its own group --------------------------------------------------


def test_an_array_gets_a_group_of_its_own(h: Harness) -> None:
    h.submit(spec())
    out = h.do(lambda c: c.submit(ALICE, [spec(f"echo {i}") for i in range(5)], [], array=True))
    first = out["jobs"][0]
    assert out["groups"] == {f"array-{first}": 1}
    with h.store.read() as tx:
        group = tx.group_by_name(f"array-{first}")
        assert group is not None and not group.open and group.total == 5
        assert list(tx.group_members(group.id)) == out["jobs"]
        assert tx.group_counts(group.id)["available"] == 5
    (after_all,) = h.submit(spec(depends_on=[{"group": f"array-{first}"}]))
    assert h.job(after_all).pending == 1
    got = run(h, ALICE, bulk.CANCEL, body(groups=[f"array-{first}"]), per_step=2)
    assert sorted(got["cancelled"]) == out["jobs"]
    assert h.state(after_all) == "cancelled"


def test_array_group_names_are_kept_for_arrays(h: Harness) -> None:
    with pytest.raises(BadRequest, match="kept for arrays"):
        h.submit(spec(groups=["array-7"]), groups=[{"name": "array-7"}])
    h.submit(spec(groups=["array-x"]), groups=[{"name": "array-x"}])  # not that form: fine


# ---- a status page costs a bounded number of reads ------------------------------------------


def test_a_status_page_reads_a_bounded_number_of_jobs(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "STATUS_SCAN", 50)
    monkeypatch.setattr(defaults, "STATUS_COUNT_KEYS", 60)
    (needle,) = h.submit(spec(name="needle"))
    hay = h.submit(*(spec(name="hay") for _ in range(200)))
    reads = 0
    get_job = ReadTx.get_job

    def counted(self: ReadTx, job_id: int) -> Any:
        nonlocal reads
        reads += 1
        return get_job(self, job_id)

    monkeypatch.setattr(ReadTx, "get_job", counted)
    with h.store.read() as tx:
        found: list[int] = []
        cursor = None
        first: dict[str, Any] | None = None
        pages = 0
        for _ in range(100):
            pages += 1
            reads = 0
            body = {"all": True, "name": "needle", "limit": 10, "cursor": cursor}
            page = history.page(tx, body, [])
            assert reads <= 50  # one walk: the page's rows and, on the first, the counts
            first = first or page
            found += [j["id"] for j in page["jobs"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert found == [needle] and pages == 5 and first is not None
        assert not first["exact"] and first["counts"] == {}  # the first 50 read: all hay
        assert page["matched"] is None  # a later page leaves counting to the first
        window = {"all": True, "limit": 1, "until": 1e10}  # a window: counted key by key
        assert history.page(tx, window, [])["exact"] is False
        assert history.page(tx, {"all": True, "limit": 1}, [])["counts"] == {"available": 201}
    assert len(hay) == 200
