"""What the broker stores: jobs, attempts, groups and workers, and how they pack for LMDB.

Records pack to msgpack arrays in field order. New fields are only ever appended, with a
default, so a store written by an older broker still unpacks.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar


class JobState(str, enum.Enum):
    INACTIVE = "inactive"
    AVAILABLE = "available"
    RUNNING = "running"
    PENDING_CANCELLATION = "pending_cancellation"
    TERMINATED = "terminated"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.TERMINATED, JobState.CANCELLED})
HOLDING = frozenset({JobState.RUNNING, JobState.PENDING_CANCELLATION})  # hold a worker's room
QUEUED = frozenset({JobState.INACTIVE, JobState.AVAILABLE})  # submitted, not started


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    LOST = "lost"
    CANCELLED = "cancelled"  # an attempt ended by a cancel; never a job's final outcome
    RETURNED = "returned"  # handed back unstarted (its account cannot run there); never final


class DepKind(str, enum.Enum):
    AFTER = "after"  # run after success (Slurm afterok)
    AFTER_ANY = "after_any"  # run after it ended, whatever the outcome
    AFTER_FAIL = "after_fail"  # run only if it ended without success


class WorkerState(str, enum.Enum):
    ACTIVE = "active"  # shown as idle or busy
    DRAINING = "draining"
    DRAINED = "drained"
    LOST = "lost"  # silent past the liveness window
    STOPPED = "stopped"  # exited cleanly after draining

    @property
    def gone(self) -> bool:
        """Not connected: nothing runs there and nothing is expected from it."""
        return self in (WorkerState.LOST, WorkerState.STOPPED)


R = TypeVar("R", bound="Record")

# What a job asks of a worker: (cpus, memory MiB, gpus, tags). Kept beside the eligible index.
Request = tuple[float, int, int, list[str]]


class Head(NamedTuple):
    """The best eligible job of one queue: one owner's jobs of one shape (the same cpus,
    memory, gpus and tags), so that if the head does not fit a worker, nothing behind it does.
    A tuple: a claim makes one per queue, so it has to be cheap."""

    queue: bytes  # opaque to all but the store: which queue, for `Tx.queue_head`
    owner: str
    request: Request
    priority: int
    job: int


class Record:
    """Packs to and from a msgpack-ready list in field order."""

    __slots__ = ()
    _field_names: ClassVar[tuple[str, ...]] = ()
    _getter: ClassVar[Any] = None  # attrgetter of every field, in order: one C call per pack

    @classmethod
    def names(cls) -> tuple[str, ...]:
        if not cls.__dict__.get("_field_names"):
            cls._field_names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
            cls._getter = operator.attrgetter(*cls._field_names)
        return cls._field_names

    def pack(self) -> list[Any]:
        getter: Any = type(self).__dict__.get("_getter")
        if getter is None:
            self.names()
            getter = type(self)._getter
        return list(getter(self))

    @classmethod
    def unpack(cls: type[R], row: list[Any]) -> R:
        return cls(*row)


@dataclass(slots=True)
class Dep:
    """One dependency edge as seen from the dependent job."""

    kind: str  # DepKind value
    target: str  # "job" or "group"
    id: int

    def pack(self) -> list[Any]:
        return [self.kind, self.target, self.id]


@dataclass(slots=True)
class Job(Record):
    id: int
    name: str
    command: str
    owner: str
    submitted: float
    state: str = JobState.AVAILABLE.value
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 1.0
    memory: int = 0
    gpus: int = 0
    tags: list[str] = field(default_factory=list)
    priority: int = 0
    max_attempts: int = 1
    time_limit: float | None = None
    cancel_grace: float = 10.0
    output: str | None = None
    depends_on: list[list[Any]] = field(default_factory=list)  # packed Dep rows
    groups: list[int] = field(default_factory=list)
    pending: int = 0  # unfinished dependencies
    attempts: int = 0  # attempts opened so far
    failures: int = 0  # attempts that ended failed or timeout (spend max_attempts)
    requeues: int = 0  # lost-worker requeues (do not spend max_attempts)
    worker: str | None = None  # holder of the live attempt
    token: int | None = None  # token of the live attempt
    started: float | None = None
    ended: float | None = None
    outcome: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    cancel_reason: str | None = None
    cancel_requested: bool = False
    progress: float | None = None
    progress_message: str | None = None
    doomed: bool = False  # known never to succeed; `after` dependents already cancelled
    account: str | None = None  # the Unix account it runs as; None (older jobs): the owner's name
    environ: str | None = None  # key of the submitter's exported environment (`environments`)
    umask: int | None = None  # None: 022
    # Attempts put back without spending one of max_attempts: requeued after a lost or stopped
    # worker, or after its worker's cold stop. attempts - unspent is what counted.
    unspent: int = 0

    @property
    def st(self) -> JobState:
        return JobState(self.state)

    @property
    def runs_as(self) -> str:
        return self.account or self.owner

    def deps(self) -> list[Dep]:
        return [Dep(*row) for row in self.depends_on]

    @property
    def eligible(self) -> bool:
        return self.state == JobState.AVAILABLE.value and self.pending == 0


# A new job's packed row is built by hand on the submit path (state.py's _new_row), without a
# Job: these fields in this order, then the defaults of every later one.
NEW_JOB_FIELDS = Job.names()[: Job.names().index("pending") + 1]
NEW_JOB_TAIL = tuple(Job(0, "", "", "", 0.0).pack()[len(NEW_JOB_FIELDS) :])
# The tail is shared by every new row, so it must hold nothing mutable.
assert all(x is None or type(x) in (bool, int, float, str) for x in NEW_JOB_TAIL)


@dataclass(slots=True)
class Attempt(Record):
    job: int
    number: int  # 1-based
    token: int
    worker: str
    claimed: float
    gpu_ids: list[int] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    outcome: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    progress: float | None = None
    progress_message: str | None = None
    cpu_percent: float | None = None
    rss: int | None = None  # bytes, whole process tree
    stdout_tail: str = ""
    stderr_tail: str = ""
    reason: str | None = None  # why it ended, when not by itself (lost, stale, cancelled)


@dataclass(slots=True)
class Group(Record):
    id: int
    name: str
    owner: str
    created: float
    open: bool = False  # members may still be added by later submissions
    total: int = 0
    ended: int = 0  # members in a terminal state
    succeeded: int = 0
    doomed: int = 0  # members known never to succeed
    cancel_reason: str | None = None

    @property
    def complete(self) -> bool:
        return not self.open and self.ended == self.total


@dataclass(slots=True)
class User(Record):
    """An account's fair-share settings and recent usage; made on first use with the defaults."""

    name: str
    shares: float = 1.0  # relative: 2 shares get twice the capacity of 1 when both want it
    max_running: int | None = None  # None: no limit
    max_queued: int | None = None
    usage: float = 0.0  # cpu-seconds, decayed to `usage_at` with the configured half-life
    usage_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Tally:
    """One owner's jobs by state and the cpus its running jobs hold; kept by the store."""

    owner: str
    counts: dict[str, int]
    cpus: float  # held by its running and pending_cancellation jobs

    @property
    def running(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in HOLDING)

    @property
    def queued(self) -> int:
        return sum(self.counts.get(s.value, 0) for s in QUEUED)


@dataclass(slots=True)
class Worker(Record):
    name: str
    host: str
    cpus: float
    memory: int
    gpus: int
    tags: list[str] = field(default_factory=list)
    state: str = WorkerState.ACTIVE.value
    used_cpus: float = 0.0
    used_memory: int = 0
    used_gpus: list[int] = field(default_factory=list)
    running: dict[int, int] = field(default_factory=dict)  # job id -> token
    registered: float = 0.0
    last_seen: float = 0.0
    completed: int = 0
    wants: int = 0  # outstanding claim: how many more jobs it asked for
    # Whose jobs it runs (banyan/broker/owners.py): only this account's, when set (a worker
    # not started as root), and never these accounts' (account -> why), as it said.
    only_account: str | None = None
    refused: dict[str, str] = field(default_factory=dict)
    held: bool = False  # drained by an admin: it stays drained, across restarts, until resumed
    # Where it last registered from, as the broker saw it: the peer's address (which tells
    # cloned machines with one host name apart) and the worker key it authenticated with.
    address: str = ""
    key: str | None = None  # None: the broker runs without keys
    spool: str = ""  # its spool directory, as it registered ("": not known)
    instance: str = ""  # the worker process that registered last (its register's `instance`)
    # Claim-ahead (SPEC §5): jobs assigned beyond its free room, not yet started there (job id
    # -> token). They hold none of its resources until it says it started one. `revoking`: those
    # the broker asked back, until the worker returns them or says it started them.
    ahead: dict[int, int] = field(default_factory=dict)
    revoking: list[int] = field(default_factory=list)
    prefetch: int | None = None  # how many it may hold ahead; None: the broker's default
    hold: int | None = None  # how many it asks to hold ahead now (claim); None: its prefetch

    @property
    def gone(self) -> bool:
        return WorkerState(self.state).gone

    def fits(self, cpus: float, memory: int, gpus: int, tags: list[str]) -> bool:
        return (
            self.cpus - self.used_cpus >= cpus - 1e-9
            and self.memory - self.used_memory >= memory
            and self.gpus - len(self.used_gpus) >= gpus
            and all(t in self.tags for t in tags)
        )

    def could_ever_fit(self, cpus: float, memory: int, gpus: int, tags: list[str]) -> bool:
        return (
            self.cpus >= cpus - 1e-9
            and self.memory >= memory
            and self.gpus >= gpus
            and all(t in self.tags for t in tags)
        )


@dataclass(slots=True)
class Event(Record):
    seq: int
    time: float
    job: int
    frm: str | None
    to: str
    reason: str | None = None


class Tx(Protocol):
    """One write transaction on the store; everything the state machine may read or write.

    `put_job` keeps every job index (eligible, by state, by group) and the per-state and
    per-owner counts in step with the record it writes, so callers only ever write whole records.
    """

    def next_id(self, counter: str, count: int = 1) -> int: ...  # the first of `count` new ids
    def last_id(self, counter: str) -> int: ...
    def next_job_id(
        self,
    ) -> int: ...  # one past the highest job id: put new jobs before asking again
    def get_job(self, job_id: int) -> Job | None: ...
    def put_job(self, job: Job) -> None: ...
    def put_new_jobs(self, rows: list[list[Any]]) -> None: ...  # new jobs, Job.pack() rows
    def eligible(self) -> Iterator[tuple[int, Request]]: ...
    def queue_heads(self) -> list[Head]: ...  # the head of every non-empty queue
    # That queue's head now, or the entry behind `after`.
    def queue_head(self, queue: bytes, after: Head | None = None) -> Head | None: ...
    def tally(self, owner: str) -> Tally: ...
    def tallies(self) -> Iterator[Tally]: ...
    def get_user(self, name: str) -> User | None: ...
    def put_user(self, user: User) -> None: ...
    def users(self) -> Iterator[User]: ...
    def jobs_in_state(self, state: str) -> Iterator[int]: ...
    def group_members(self, group_id: int) -> Iterator[int]: ...
    def state_counts(self) -> dict[str, int]: ...
    def put_attempt(self, attempt: Attempt) -> None: ...
    def get_attempt(self, job_id: int, number: int) -> Attempt | None: ...
    def attempts_of(self, job_id: int) -> list[Attempt]: ...
    def add_dependent(self, target: str, target_id: int, dependent: int, kind: str) -> None: ...
    def dependents(self, target: str, target_id: int) -> list[tuple[int, str]]: ...
    def dependents_after(
        self, target: str, target_id: int, after: int
    ) -> Iterator[tuple[int, str]]: ...
    def get_group(self, group_id: int) -> Group | None: ...
    def group_by_name(self, name: str) -> Group | None: ...
    def put_group(self, group: Group) -> None: ...
    def groups(self) -> Iterator[Group]: ...
    def groups_from(self, first: int, limit: int) -> list[Group]: ...  # by id, from `first`
    def get_worker(self, name: str) -> Worker | None: ...
    def put_worker(self, worker: Worker) -> None: ...
    def delete_worker(self, name: str) -> None: ...
    def workers(self) -> Iterator[Worker]: ...
    def claimers(self) -> list[str]: ...
    def get_submit_key(self, owner: str, key: str) -> Any: ...
    def put_submit_key(self, owner: str, key: str, value: Any, time: float) -> None: ...
    def append_event(
        self, time: float, job: int, frm: str | None, to: str, reason: str | None
    ) -> int: ...
    def append_events(
        self, rows: list[tuple[float, int, str | None, str, str | None]]
    ) -> int: ...  # (time, job, frm, to, reason) rows; returns the first seq
    def events_from(self, seq: int, limit: int) -> list[Event]: ...
    def get_meta(self, key: str) -> Any: ...
    def put_meta(self, key: str, value: Any) -> None: ...
    # Ids in [lo, hi] by index, ascending or descending (selectors.py).
    def job_ids(self, lo: int = 1, hi: int = ..., descending: bool = False) -> Iterator[int]: ...
    def state_ids(
        self, state: str, lo: int = 1, hi: int = ..., descending: bool = False
    ) -> Iterator[int]: ...
    def owner_ids(
        self, owner: str, state: str, lo: int = 1, hi: int = ..., descending: bool = False
    ) -> Iterator[int]: ...
    def member_ids(
        self, group_id: int, lo: int = 1, hi: int = ..., descending: bool = False
    ) -> Iterator[int]: ...
    def owner_counts(self, owner: str) -> dict[str, int]: ...
    def group_counts(self, group_id: int) -> dict[str, int]: ...
    def first_submitted_since(self, when: float) -> int: ...
    # Long operations in progress (bulk.py), as stored rows.
    def get_op(self, op_id: int) -> list[Any] | None: ...
    def ops(self) -> list[list[Any]]: ...
    def put_op(self, op_id: int, row: list[Any]) -> None: ...
    def delete_op(self, op_id: int) -> None: ...
    def put_op_request(self, op_id: int, request: bytes) -> None: ...
    def get_op_request(self, op_id: int) -> bytes | None: ...
    def note_doomed(self, op_id: int, job_id: int, reason: str) -> None: ...
    def take_doomed(self, op_id: int, limit: int) -> list[tuple[int, str]]: ...
    def put_walk(self, op_id: int, band: int, seq: int, walk: list[Any]) -> None: ...
    def take_walk(self, op_id: int) -> list[Any] | None: ...
    def reserve_jobs(self, last: int) -> None: ...
    # A nested transaction: merged on normal exit, undone on an exception.
    def child(self) -> AbstractContextManager[Tx]: ...
    # Retention: only ever of what has ended (see retention.py).
    def first_job(self) -> Job | None: ...
    # The record, its attempts, edges, index entries and counts (store.delete_job).
    def delete_job(self, job_id: int) -> Job | None: ...
    def delete_group(self, group_id: int) -> None: ...
    def delete_events_through(self, seq: int) -> int: ...
    def expire_submit_keys(self, before: float, limit: int) -> int: ...
    def store_info(self) -> dict[str, int]: ...
    # Submitters' exported environments, by content key, shared by the jobs that name them.
    def get_environment(self, key: str) -> dict[str, str] | None: ...
    def put_environment(self, key: str, env: dict[str, str], jobs: int) -> None: ...
    def job_account(self, job_id: int) -> str | None: ...  # Job.runs_as, read cheaply
