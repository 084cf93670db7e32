"""What the broker stores: jobs, attempts, groups and workers, and how they pack for LMDB.

Records pack to msgpack arrays in field order. New fields are only ever appended, with a
default, so a store written by an older broker still unpacks.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol, TypeVar


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


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    LOST = "lost"
    CANCELLED = "cancelled"  # an attempt ended by a cancel; never a job's final outcome


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

    @property
    def st(self) -> JobState:
        return JobState(self.state)

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
    held: bool = False  # drained by an admin: it stays drained, across restarts, until resumed

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

    `put_job` keeps every job index (eligible, by state, by group) and the per-state counts in
    step with the record it writes, so callers only ever write whole records.
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
    # A note that a claim's scan of `eligible` found nothing, kept (in memory only) until the
    # index gains an entry, or loses one unless the scan was `whole`.
    def empty_scan(self, worker: str) -> Any: ...
    def note_empty_scan(self, worker: str, whole: bool, memo: Any) -> None: ...
    def jobs_in_state(self, state: str) -> Iterator[int]: ...
    def group_members(self, group_id: int) -> Iterator[int]: ...
    def state_counts(self) -> dict[str, int]: ...
    def put_attempt(self, attempt: Attempt) -> None: ...
    def get_attempt(self, job_id: int, number: int) -> Attempt | None: ...
    def attempts_of(self, job_id: int) -> list[Attempt]: ...
    def add_dependent(self, target: str, target_id: int, dependent: int, kind: str) -> None: ...
    def dependents(self, target: str, target_id: int) -> list[tuple[int, str]]: ...
    def get_group(self, group_id: int) -> Group | None: ...
    def group_by_name(self, name: str) -> Group | None: ...
    def put_group(self, group: Group) -> None: ...
    def groups(self) -> Iterator[Group]: ...
    def get_worker(self, name: str) -> Worker | None: ...
    def put_worker(self, worker: Worker) -> None: ...
    def delete_worker(self, name: str) -> None: ...
    def workers(self) -> Iterator[Worker]: ...
    def claimers(self) -> list[str]: ...
    def get_submit_key(self, owner: str, key: str) -> Any: ...
    def put_submit_key(self, owner: str, key: str, value: Any) -> None: ...
    def append_event(
        self, time: float, job: int, frm: str | None, to: str, reason: str | None
    ) -> int: ...
    def append_events(
        self, rows: list[tuple[float, int, str | None, str, str | None]]
    ) -> int: ...  # (time, job, frm, to, reason) rows; returns the first seq
    def events_from(self, seq: int, limit: int) -> list[Event]: ...
    def get_meta(self, key: str) -> Any: ...
    def put_meta(self, key: str, value: Any) -> None: ...
