"""Random runs of a simulated cluster against the state machine, every invariant checked after
every step (tests/invariants.py).

The workers are simulated as the worker daemon behaves: they run what they are assigned, end it
by themselves or because of a cancel (and a cancel may lose the race with a job's own end), keep
each result until it is acked and send it again, re-register after a partition or a broker
restart listing what they still hold, and sometimes report on attempts they no longer hold (a
process that outlived a partition, a worker that restarted). They hold jobs ahead (claim-ahead,
SPEC §5) as the daemon does: started, in order, when a job's end frees room for them (named in
that result), given back when asked back, cancelled or drained, dropped when they register,
never started while partitioned. The broker's timer loses workers
with their jobs running; the broker itself restarts, reopening its store mid-run. A message
settles only a couple of dependents itself and leaves the rest to the cascade (cascade.py),
whose steps come between workers' messages and across restarts, as the server's slices do;
clients' requests wait for it to end, as the server parks them. Clients
submit (with dependencies of every kind, groups open and sealed, submit keys), hold, release,
modify and cancel. A message from a worker the broker has no session for is answered
"register again" and applied to nothing, as the server does.

Each client request's outcome is predicted from the SPEC before it is sent: a refusal that the
rules do not call for fails the run, and so does an acceptance they forbid. When a run ends,
every worker comes back and the cluster runs until nothing is left: every job must end.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from banyan import defaults
from banyan.broker import cascade
from banyan.broker.records import Job, JobState
from banyan.broker.state import Config, Core
from banyan.broker.store import ReadTx
from banyan.errors import BanyanError, Conflict
from tests.invariants import History, graph, has_cycle, jobs_of, members_of, never_met
from tests.statekit import ALICE, ROOT, Harness

S = JobState
# Capacity (cpus, memory MiB, gpus) and tags: jobs fit some workers and not others.
WORKERS: dict[str, tuple[tuple[float, int, int], list[str]]] = {
    "w0": ((1.0, 1000, 0), []),
    "w1": ((2.0, 1000, 1), []),
    "w2": ((3.0, 1000, 2), ["ssd"]),
}
# How many jobs each holds ahead: the broker's default (PREFETCH), its own, or none.
PREFETCH = 1
PREFETCHES: dict[str, int | None] = {"w0": None, "w1": 2, "w2": 0}
KINDS = ["after", "after_any", "after_fail"]
CLAIM = defaults.MAX_CLAIM  # the daemon's standing claim, made once registered
# `make test` runs EXAMPLES runs of up to STEPS steps (about 70 s on two busy cores). Longer
# runs find more per second than more runs: bugs here take several moves to set up. Each bug
# this test has been checked against was found within the first 500 runs, most within 100.
# BANYAN_PROPERTY_EXAMPLES=N runs more.
EXAMPLES = int(os.environ.get("BANYAN_PROPERTY_EXAMPLES", "600"))
STEPS = 100
DRAIN_ROUNDS = 300  # bounds the end-of-run drive to quiescence
CASCADE_JOBS = 2  # dependents a message settles itself (Config.cascade_jobs)
PER_STEP = 1  # dependents a step of the cascade settles


@dataclass
class Proc:
    """One attempt as its worker sees it."""

    ended: tuple[str, int | None] | None = None  # (outcome, exit code) once over, until acked
    cancel: bool = False  # the broker asked to cancel it
    size: tuple[float, int] = (0.0, 0)  # cpus and memory it takes


@dataclass
class SimWorker:
    name: str
    capacity: tuple[float, int, int]
    tags: list[str]
    session: bool = False  # the broker holds a live session for it
    procs: dict[tuple[int, int], Proc] = field(default_factory=dict)
    seen: list[tuple[int, int]] = field(default_factory=list)  # every attempt ever assigned
    # Jobs held ahead, in the order they came, with their (cpus, memory).
    ahead: dict[tuple[int, int], tuple[float, int]] = field(default_factory=dict)

    def running(self) -> list[tuple[int, int]]:
        return [k for k, p in self.procs.items() if p.ended is None]

    def start_ahead(self) -> list[tuple[int, int]]:
        """Start, in order, the jobs held ahead that its free room takes (as the daemon)."""
        if not self.session:  # partitioned: it may have been lost, with them given back
            return []
        cpus = self.capacity[0] - sum(self.procs[k].size[0] for k in self.running())
        memory = self.capacity[1] - sum(self.procs[k].size[1] for k in self.running())
        started: list[tuple[int, int]] = []
        for key, (c, m) in list(self.ahead.items()):
            if c > cpus + 1e-9 or m > memory:
                break
            del self.ahead[key]
            self.procs[key] = Proc(size=(c, m))
            cpus, memory = cpus - c, memory - m
            started.append(key)
        return started

    def unacked(self) -> list[tuple[int, int]]:
        return [k for k, p in self.procs.items() if p.ended is not None]

    def stale(self) -> list[tuple[int, int]]:
        """Attempts it no longer holds; first those of jobs it holds again under a new token,
        where a report that slipped past the fence would do the most harm."""
        gone = [k for k in self.seen if k not in self.procs and k not in self.ahead]
        again = {j for j, _ in self.procs}
        return sorted(gone, key=lambda k: k[0] not in again)


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="banyan-prop-"))
        self.h = Harness(self.dir / "store", Config(cascade_jobs=CASCADE_JOBS, prefetch=PREFETCH))
        self.h.per_step = PER_STEP
        self.h.settle = False  # the cascade's steps are rules of their own
        self.history = History(self.h.config.max_lost_requeues)
        self.workers = {n: SimWorker(n, cap, tags) for n, (cap, tags) in WORKERS.items()}
        self.groups: list[str] = []
        self.keys: dict[str, tuple[dict[str, Any], list[Any], list[Any]]] = {}
        self.gone_seen: dict[str, float] = {}  # last_seen of each worker while it is gone
        self.started: set[int] = set()  # every token a worker started
        self.unfenced: set[int] = set()  # tokens held ahead by a worker when it was lost
        for w in self.workers.values():
            self._register(w)

    # ---- plumbing ---------------------------------------------------------------------------

    def _read(self, fn: Callable[[ReadTx], Any]) -> Any:
        with self.h.store.read() as tx:
            return fn(tx)

    def _request(self, fn: Callable[[Core], Any], allowed: bool, what: str) -> Any:
        """A client request whose acceptance the SPEC predicts; a refusal changes nothing."""
        self._after_cascade()
        before = self.h.store.dump()
        self.h.now += 1.0
        try:
            result = self.h.do(fn)
        except BanyanError as e:
            assert not allowed, f"{what} refused: {e}"
            assert self.h.store.dump() == before, f"the refused {what} changed something"
            assert not self.h.effects
            return e
        assert allowed, f"{what} accepted, though the SPEC refuses it"
        self._deliver()
        return result

    def _from_worker(self, w: SimWorker, fn: Callable[[Core], Any], wake: bool = False) -> None:
        """A worker's message: applied only if the broker has its session (else the broker
        answers "register again", and the worker does). The broker never refuses a report."""
        if not w.session:
            self._register(w)
            return
        self.h.now += 1.0
        self.h.do(fn, wake)
        self._deliver()

    def _deliver(self) -> None:
        """Send what the commit decided; a worker without a session gets nothing. What the
        workers answer (jobs held ahead given back or started) goes once all are delivered."""
        answers: list[Callable[[], None]] = []
        for effect in self.h.take():
            w = self.workers[effect.worker]
            if not w.session:
                continue
            b = effect.body
            key = (b.get("job", 0), b.get("token", 0))
            if effect.type == "assign":
                for a in b["jobs"]:
                    key = (a["job"], a["token"])
                    job = self._job(a["job"])
                    assert (job.state, job.token, job.worker) == ("running", key[1], w.name), (
                        f"assigned {key} to {w.name} but the store says {job}"
                    )
                    assert key not in w.procs and key not in w.ahead
                    if a["ahead"]:
                        w.ahead[key] = (a["cpus"], a["memory"])
                    else:
                        w.procs[key] = Proc(size=(a["cpus"], a["memory"]))
                        self.started.add(key[1])
                    w.seen.append(key)
                answers.append(functools.partial(self._start_ahead, w))
            elif effect.type in ("revoke", "cancel") and key in w.ahead:
                del w.ahead[key]
                answers.append(functools.partial(self._give_back, w, key, effect.type))
            elif effect.type == "revoke":
                pass  # started already: its report went first, and it runs here
            elif effect.type == "drain" and not b["resume"]:
                for held in list(w.ahead):
                    del w.ahead[held]
                    answers.append(functools.partial(self._give_back, w, held, "drain"))
            elif effect.type == "cancel":
                proc = w.procs.get((b["job"], b["token"]))
                if proc is not None and proc.ended is None:
                    proc.cancel = True
            elif effect.type == "kill_stale":
                w.ahead.pop(key, None)
                w.procs.pop((b["job"], b["token"]), None)
            elif effect.type == "ack":
                proc = w.procs.get((b["job"], b["token"]))
                assert proc is None or proc.ended is not None, f"ack of a running {b}"
                w.procs.pop((b["job"], b["token"]), None)
        for answer in answers:
            answer()

    def _start_ahead(self, w: SimWorker) -> None:
        """Jobs held ahead that fit the room it has now start, each reported at once."""
        for job, token in w.start_ahead():
            self.started.add(token)
            self._from_worker(
                w, functools.partial(Core.started, name=w.name, job_id=job, token=token)
            )

    def _give_back(self, w: SimWorker, key: tuple[int, int], why: str) -> None:
        job, token = key
        assert token not in self.started
        self._from_worker(w, lambda c: c.returned(w.name, job, token, why), wake=True)

    def _register(self, w: SimWorker) -> None:
        """Connect and list what it holds, dropping what it held ahead (the broker takes it
        back); then, as the daemon does once registered, send again every result not yet
        acked, and claim."""
        held = sorted(w.procs)
        w.ahead.clear()
        w.session = True
        self.h.now += 1.0
        prefetch = PREFETCHES[w.name]
        self.h.do(
            lambda c: c.register(
                w.name, "host-" + w.name, w.capacity, w.tags, held, prefetch=prefetch
            )
        )
        self._deliver()
        for key in w.unacked():
            self._result(w, key)
        self._from_worker(w, lambda c: c.claim(w.name, CLAIM))

    def _result(
        self, w: SimWorker, key: tuple[int, int], then: list[tuple[int, int]] | None = None
    ) -> None:
        proc = w.procs.get(key)
        outcome, code = proc.ended if proc is not None and proc.ended else self.history.sent[key[1]]
        job, token = key
        nxt = then or []
        self.started.update(t for _, t in nxt)
        self._from_worker(
            w,
            lambda c: c.result(w.name, job, token, outcome, code, None, ("o", "e"), None, nxt),
            wake=True,
        )

    def _job(self, job_id: int) -> Job:
        with self.h.store.read() as tx:
            job = tx.get_job(job_id)
        assert job is not None
        return job

    def _ids(self) -> list[int]:
        return list(self._read(lambda tx: list(range(1, tx.next_job_id()))))

    # ---- clients ----------------------------------------------------------------------------

    def _draw_deps(self, data: st.DataObject, ids: list[int], local: int) -> list[dict[str, Any]]:
        deps: list[dict[str, Any]] = []
        for _ in range(data.draw(st.integers(0, 2))):
            choices = (["job"] if ids else []) + (["local"] if local else [])
            choices += ["group"] if self.groups else []
            if not choices:
                break
            target = data.draw(st.sampled_from(choices))
            kind = data.draw(st.sampled_from(KINDS))
            if target == "job":
                deps.append({"kind": kind, "job": data.draw(st.sampled_from(ids))})
            elif target == "local":
                deps.append({"kind": kind, "local": data.draw(st.integers(0, local - 1))})
            else:
                deps.append({"kind": kind, "group": data.draw(st.sampled_from(self._groups()))})
        return deps

    def _groups(self) -> list[str]:
        """Every group, open ones first: they are the ones whose end is still open too."""
        still_open = self._read(lambda tx: {g.name for g in tx.groups() if g.open})
        return sorted(self.groups, key=lambda n: n not in still_open)

    # Every rule takes only `data` and draws the rest: Hypothesis picks rules with fewer
    # arguments more often, and these should come up about equally.
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        self._after_cascade()
        n = data.draw(st.integers(1, 4))
        grouping = data.draw(st.sampled_from(["none", "none", "new", "open", "join"]))
        keyed = data.draw(st.sampled_from(["no", "no", "new key", "again"]))
        if keyed == "again" and self.keys:
            self._resubmit(data)
            return
        ids = self._ids()
        open_groups = self._read(lambda tx: [g.name for g in tx.groups() if g.open])
        if grouping == "join" and not open_groups:
            grouping = "none"
        name = (
            data.draw(st.sampled_from(open_groups))
            if grouping == "join"
            else f"g{len(self.groups) + 1}"
        )
        jobs = [
            {
                "command": "true",
                "hold": data.draw(st.sampled_from([False, False, True])),
                "cpus": data.draw(st.sampled_from([0.5, 1.0, 2.0])),
                "memory": data.draw(st.sampled_from([0, 0, 400])),
                "gpus": data.draw(st.sampled_from([0, 0, 1])),
                "tags": data.draw(st.sampled_from([[], [], ["ssd"]])),
                "max_attempts": data.draw(st.integers(1, 3)),
                "depends_on": self._draw_deps(data, ids, i),
                "groups": [] if grouping == "none" else [name],
            }
            for i in range(n)
        ]
        groups = [{"name": name, "open": grouping == "open"}] if grouping in ("new", "open") else []
        key = f"k{len(self.keys)}" if keyed == "new key" else None
        allowed = not self._read(lambda tx: self._would_cycle(tx, jobs, name))
        result = self._request(lambda c: c.submit(ALICE, jobs, groups, key), allowed, "submit")
        if isinstance(result, BanyanError):
            assert isinstance(result, Conflict) and "cycle" in result.message, result
            return
        assert len(result["jobs"]) == n
        self.history.acked.update(result["jobs"])
        if groups:
            self.groups.append(name)
        if key:
            self.keys[key] = (result, jobs, groups)

    def _would_cycle(self, tx: ReadTx, jobs: list[dict[str, Any]], group: str) -> bool:
        """Whether a submission would close a dependency cycle (only possible by joining an
        open group that something the new jobs wait for waits on)."""
        edges: dict[Any, set[Any]] = dict(graph(tx, jobs_of(tx)))
        existing = tx.group_by_name(group)
        gnode: Any = ("group", existing.id) if existing else ("new group", group)
        for i, spec in enumerate(jobs):
            node = ("new", i)
            edges[node] = set()
            for dep in spec["depends_on"]:
                if "local" in dep:
                    edges[node].add(("new", dep["local"]))
                elif "job" in dep:
                    edges[node].add(("job", dep["job"]))
                else:
                    ref = tx.group_by_name(dep["group"])
                    assert ref is not None
                    edges[node].add(("group", ref.id))
            if spec["groups"]:
                edges.setdefault(gnode, set()).add(node)
        return has_cycle(edges)

    def _resubmit(self, data: st.DataObject) -> None:
        """The same submit key again: with the same submission, the first ids and nothing new;
        with another, a refusal that changes nothing."""
        key = data.draw(st.sampled_from(sorted(self.keys)))
        count = len(self._ids())
        first, jobs, groups = self.keys[key]
        same = data.draw(st.booleans())
        if not same:
            jobs, groups = [{"command": "false"}], []
        result = self._request(lambda c: c.submit(ALICE, jobs, groups, key), same, "resubmit")
        if same:
            assert result == first
        else:
            assert isinstance(result, Conflict) and "different submission" in result.message
        assert len(self._ids()) == count

    @rule(data=st.data())
    def modify(self, data: st.DataObject) -> None:
        self._after_cascade()
        what = data.draw(
            st.sampled_from(
                ["hold", "release", "priority", "fields", "deps", "deps+release", "close group"]
            )
        )
        if what == "close group":
            if self.groups:
                name = data.draw(st.sampled_from(self.groups))
                self._request(lambda c: c.close_group(ALICE, name), True, "close_group")
            return
        ids = self._ids()
        if not ids:
            return
        inactive = self._read(lambda tx: list(tx.jobs_in_state("inactive")))
        # Mostly held jobs: they are the ones whose fields and dependencies may change.
        job_id = data.draw(st.sampled_from(inactive if inactive and what != "hold" else ids))
        state = self._job(job_id).state
        queued = state in ("inactive", "available")
        changes: dict[str, Any] = {}
        allowed = queued if what in ("hold", "release", "priority") else state == "inactive"
        if what == "priority":
            changes["priority"] = data.draw(st.integers(-2, 2))
        elif what == "fields":
            changes["cpus"] = data.draw(st.sampled_from([0.5, 1.0, 3.0]))
            changes["max_attempts"] = data.draw(st.integers(1, 3))
        elif what.startswith("deps"):
            changes["depends_on"] = deps = self._draw_deps(data, ids, 0)
            allowed = allowed and not self._read(lambda tx: self._deps_cycle(tx, job_id, deps))
        hold, release = what == "hold", what in ("release", "deps+release")
        self._request(
            lambda c: c.modify(ALICE, job_id, changes, hold=hold, release=release),
            allowed,
            f"modify {what} {changes} of job {job_id} ({state})",
        )

    def _deps_cycle(self, tx: ReadTx, job_id: int, deps: list[dict[str, Any]]) -> bool:
        edges = graph(tx, jobs_of(tx))
        targets: set[Any] = set()
        for dep in deps:
            if "job" in dep:
                targets.add(("job", dep["job"]))
            else:
                ref = tx.group_by_name(dep["group"])
                assert ref is not None
                targets.add(("group", ref.id))
        edges[("job", job_id)] = targets
        return has_cycle(edges)

    @rule(data=st.data())
    def request_cancel(self, data: st.DataObject) -> None:
        self._after_cascade()
        by_group = data.draw(st.booleans())
        actor = data.draw(st.sampled_from([ALICE, ROOT]))

        def before(tx: ReadTx) -> dict[int, str]:
            return {j.id: j.state for j in jobs_of(tx).values()}

        states = self._read(before)
        if by_group and self.groups:
            name = data.draw(st.sampled_from(self._groups()))  # cancelling closes an open one
            group = self._read(lambda tx: tx.group_by_name(name))
            targets = self._read(lambda tx: [m.id for m in members_of(tx, group, jobs_of(tx))])
            job_ids: list[int] = []
            refs: list[str | int] = [name]
        elif states:
            targets = job_ids = [data.draw(st.sampled_from(sorted(states)))]
            refs = []
        else:
            return
        self.history.asked.update(targets)
        out = self._request(lambda c: c.cancel(actor, job_ids, refs, None), True, "cancel")
        after = self._read(before)
        for job_id in targets:
            now = S(after[job_id])
            if S(states[job_id]).terminal:
                assert job_id in out["already"] and after[job_id] == states[job_id], out
            else:
                # One target's cancel may cascade into another before its turn, which is then
                # reported as already over: it is cancelled all the same.
                assert now in (S.CANCELLED, S.PENDING_CANCELLATION), (job_id, now)
                assert any(job_id in ids for ids in out.values()), (job_id, out)

    # ---- workers ----------------------------------------------------------------------------

    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """A claim renewed (after a refusal, or a drain undone), for `count` more jobs."""
        w = data.draw(st.sampled_from(list(self.workers.values())))
        count = data.draw(st.sampled_from([1, 2, CLAIM]))
        self._from_worker(w, lambda c: c.claim(w.name, count))

    @precondition(lambda self: any(w.running() for w in self.workers.values()))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        """Jobs end on their workers: by themselves, or killed by a cancel they may outrun."""
        for _ in range(data.draw(st.integers(1, 3))):
            busy = [w for w in self.workers.values() if w.running()]
            if busy:
                self._end(data, data.draw(st.sampled_from(busy)))

    def _end(self, data: st.DataObject, w: SimWorker) -> None:
        key = data.draw(st.sampled_from(w.running()))
        proc = w.procs[key]
        ends: list[tuple[str, int | None]] = [("exited", 0), ("exited", 1)]
        if proc.cancel:
            ends.append(("cancelled", None))  # killed; or it ended first, either way
        else:  # mostly success; last, the worker's own cold stop
            ends += [("exited", 0), ("timeout", None), ("exited", 0), ("cancelled", None)]
        proc.ended = self.history.report(key[1], *data.draw(st.sampled_from(ends)))
        self._result(w, key, w.start_ahead())  # what it held ahead starts in the room freed

    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        """A heartbeat listing what the worker holds; a result sent again (its ack was lost, or
        crossed it on the wire); progress; or a report on an attempt the worker no longer holds
        (fenced or lost, or run by a worker process that has since restarted)."""
        kind = data.draw(st.sampled_from(["heartbeat", "resend", "stale", "progress"]))
        pick = {
            "resend": SimWorker.unacked,
            "stale": SimWorker.stale,
            "progress": SimWorker.running,
        }
        have = [w for w in self.workers.values() if kind in pick and pick[kind](w)]
        if not have:
            kind = "heartbeat"
            have = list(self.workers.values())
        w = data.draw(st.sampled_from(have))
        if kind == "heartbeat":
            self._heartbeat(w)
            return
        job, token = key = data.draw(st.sampled_from(pick[kind](w)))
        if kind == "resend":
            self._result(w, key)
        elif kind == "progress":
            self._from_worker(w, lambda c: c.started(w.name, job, token, 0.2))
            self._from_worker(w, lambda c: c.progress(w.name, job, token, 10.0, "a tenth"))
        elif (what := data.draw(st.sampled_from(["result", "result", "progress", "returned"]))) == (
            "result"
        ):
            end = data.draw(st.sampled_from([("exited", 0), ("exited", 1), ("timeout", None)]))
            outcome, code = self.history.report(token, *end)
            report = lambda c: c.result(w.name, job, token, outcome, code, None)  # noqa: E731
            self._from_worker(w, report, wake=True)
        elif what == "returned":  # a give-back that crossed its job's new claim on the wire
            self._from_worker(w, lambda c: c.returned(w.name, job, token, "late"), wake=True)
        else:
            self._from_worker(w, lambda c: c.progress(w.name, job, token, 50.0, "half"))

    def _heartbeat(self, w: SimWorker) -> None:
        rows: list[tuple[int, int, float | None, int | None]] = [
            (j, t, 1.0, 1 << 20) for j, t in sorted(w.procs)
        ]
        self._from_worker(w, lambda c: c.heartbeat(w.name, rows))

    @rule(data=st.data())
    def cascade_steps(self, data: st.DataObject) -> None:
        """The broker's loop gives the cascade a slice or a few."""
        self.h.cascade(data.draw(st.integers(1, 4)))
        self._deliver()

    def _after_cascade(self) -> None:
        """A client's request (and what it is predicted to do) waits for the cascade to end,
        as the server keeps such requests meanwhile."""
        self.h.cascade()
        self._deliver()

    @rule(data=st.data())
    def sigterm(self, data: st.DataObject) -> None:
        """Its first SIGTERM: it drops what it held ahead and tells the broker it drains."""
        w = data.draw(st.sampled_from(list(self.workers.values())))
        if w.session:
            w.ahead.clear()
        self._from_worker(w, lambda c: c.draining(w.name))

    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        """The broker hears nothing from it for the liveness window; its jobs run on. It last
        heard from it a while ago, or (after a restart) never."""
        name = data.draw(st.sampled_from(sorted(WORKERS)))
        self.h.now += 1.0
        heard = data.draw(st.sampled_from([None, self.h.now - 5.0, self.h.now - 0.5]))
        # What it held ahead goes back unfenced, as its running jobs do: a start the broker
        # never heard of (its report lost with a broker that crashed) may run again elsewhere.
        record = self._read(lambda tx: tx.get_worker(name))
        self.unfenced.update(record.ahead.values())
        self.h.do(lambda c: c.worker_lost(name, f"worker {name} silent", heard))
        self.workers[name].session = False
        self._deliver()

    @rule(data=st.data())
    def admin(self, data: st.DataObject) -> None:
        """An admin drains or resumes a worker, whatever its state (a lost or stopped one
        comes back drained); or the broker stores when it last heard from its workers."""
        name = data.draw(st.sampled_from(sorted(WORKERS)))
        what = data.draw(st.sampled_from(["drain", "resume", "heard"]))
        if what == "heard":
            seen = {n: self.h.now for n, w in self.workers.items() if w.session}
            seen[name] = self.h.now  # a save may race with its loss: it must change nothing
            self._request(lambda c: c.heard(seen), True, "heard")
            return
        self._request(lambda c: c.drain(ROOT, name, what == "resume"), True, what)

    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        """It registers again, listing what it still runs and what is not acked; or its
        process died with its jobs and started again, holding nothing."""
        w = data.draw(st.sampled_from(list(self.workers.values())))
        if data.draw(st.booleans()):
            w.procs.clear()
        self._register(w)

    @rule(data=st.data())
    def restart_broker(self, data: st.DataObject) -> None:
        """The broker stops, or crashes between a turn's commit and its sends: a claim's
        assignment or a result's ack is durable but never reaches the worker; or before it
        reads a result, and with it the start of jobs held ahead in the room it freed."""
        connected = [w for w in self.workers.values() if w.session]
        ending = [w for w in connected if w.running() and w.ahead]
        unread: bool = data.draw(st.booleans())
        if ending and unread:
            w = data.draw(st.sampled_from(ending))
            key = data.draw(st.sampled_from(w.running()))
            w.procs[key].ended = self.history.report(key[1], "exited", 0)
            self.started.update(t for _, t in w.start_ahead())
        elif data.draw(st.booleans()) and connected:
            w = data.draw(st.sampled_from(connected))
            running = w.running()
            result: bool = data.draw(st.booleans())
            if running and result:
                key = data.draw(st.sampled_from(running))
                w.procs[key].ended = end = self.history.report(key[1], "exited", 0)
                job, token = key
                self.h.do(lambda c: c.result(w.name, job, token, *end, None), wake=True)
            else:
                self.h.do(lambda c: c.claim(w.name, CLAIM), wake=True)
            self.h.take()
        self.h.restart()
        for w in self.workers.values():
            w.session = False
        for w in self.workers.values():  # most come back within the liveness window
            if data.draw(st.booleans()):
                self._register(w)

    # ---- checks -----------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        with self.h.store.read() as tx:
            settled = not cascade.waiting(tx)
            self.history.check(tx, settled)
            if not settled:  # what it has to settle is behind; no job runs ahead of it
                jobs = jobs_of(tx)
                for job in jobs.values():
                    if job.st in (S.RUNNING, S.AVAILABLE) and job.pending == 0:
                        assert not any(never_met(tx, jobs, *d) for d in job.depends_on), job
            for w in self.workers.values():
                record = tx.get_worker(w.name)
                assert record is not None
                # An admin's drain holds: a worker that is there and held takes no work.
                if record.held and not record.gone:
                    assert record.state in ("draining", "drained"), record
                # Once gone, when it was last heard from stays as it was.
                if record.gone:
                    seen = self.gone_seen.setdefault(w.name, record.last_seen)
                    assert record.last_seen == seen, (record, seen)
                else:  # and only its registration brings it back
                    assert w.session or w.name not in self.gone_seen, f"{record} came back"
                    self.gone_seen.pop(w.name, None)
                if w.session:
                    # The broker's view of what a connected worker runs is the worker's own,
                    # and so is its view of what it holds ahead.
                    assert set(record.running.items()) <= set(w.procs), (w, record.running)
                    assert set(w.running()) <= set(record.running.items()), (w, record.running)
                    assert set(record.ahead.items()) == set(w.ahead), (w, record.ahead)
                assert not set(w.ahead) & set(w.procs), w
            # The fence: no job given back unstarted had started, so none runs twice.
            for job_id in range(1, tx.next_job_id()):
                for a in tx.attempts_of(job_id):
                    if a.outcome == "returned" and a.token not in self.unfenced:
                        assert a.token not in self.started, f"{a} started, yet given back"

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # the run passed: now it must also finish
                self._run_to_the_end()
        finally:
            self.h.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _run_to_the_end(self) -> None:
        """Every worker comes back, held jobs are released and open groups closed, and jobs
        end by themselves: every job must end, and every result be acked (SPEC §7: a job is
        run if it is able to run)."""
        for w in self.workers.values():
            self._request(
                functools.partial(Core.drain, actor=ROOT, name=w.name, resume=True), True, "resume"
            )
            self._register(w)
        for name in self.groups:
            close = functools.partial(Core.close_group, actor=ROOT, ref=name)
            self._request(close, True, "close_group")
        for job_id in self._read(lambda tx: list(tx.jobs_in_state("inactive"))):
            release = functools.partial(Core.modify, actor=ROOT, job_id=job_id, changes={})
            self._request(functools.partial(release, release=True), True, "release")
        for _ in range(DRAIN_ROUNDS):
            for w in self.workers.values():
                self._heartbeat(w)
                for key in w.running():
                    outcome = ("cancelled", None) if w.procs[key].cancel else ("exited", 0)
                    w.procs[key].ended = self.history.report(key[1], *outcome)
                for key in w.unacked():
                    self._result(w, key)
                self._from_worker(w, functools.partial(Core.claim, name=w.name, count=CLAIM))
            self.h.cascade()
            self._deliver()
            self.consistent()
            left = self._read(lambda tx: [j for j in jobs_of(tx).values() if not j.st.terminal])
            if not left and not any(w.procs for w in self.workers.values()):
                return
        raise AssertionError(f"still not over after {DRAIN_ROUNDS} rounds: {left}")


# Shrinking a failed run of this length can take minutes, past the test's timeout: it is left
# to BANYAN_PROPERTY_SHRINK=1, which starts from the failure Hypothesis saved in .hypothesis/.
SHRINK = os.environ.get("BANYAN_PROPERTY_SHRINK", "") not in ("", "0")
Cluster.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    phases=list(Phase) if SHRINK else [Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCluster = pytest.mark.timeout(300)(Cluster.TestCase)
