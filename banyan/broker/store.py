"""The broker's durable state: every record and index in one LMDB environment.

This is the only module that imports lmdb. Records are msgpack rows (see records.py); indexes
are kept in step by the put_* methods, so callers only ever write whole records.

Keys (integers big-endian, so LMDB's byte order is numeric order):

    jobs         id:u64                                    -> Job row
    attempts     job:u64 number:u32                        -> Attempt row
    groups       id:u64                                    -> Group row
    group_names  name                                      -> id:u64
    edges        target:1 byte (j|g) target:u64 dependent:u64 -> DepKind value
    workers      name                                      -> Worker row
    claimers     name                                      -> name   (workers with wants > 0)
    submit_keys  owner NUL key                             -> msgpack value
    events       seq:u64                                   -> Event row
    meta         key                                       -> msgpack value
    ids          counter name                              -> last id issued:u64
    eligible     (2**31-1 - priority):u32 id:u64           -> Request row
    by_state     state NUL id:u64                          -> empty
                 state                                     -> jobs in that state:u64
    members      group:u64 job:u64                         -> empty

`eligible` holds exactly the jobs that are available with no pending dependency, best first
(priority descending, then id ascending), and carries each job's Request so a claim can test
fit without loading the job: taking the next job is one B-tree descent however long the queue.

Every commit rewrites the path to each B-tree it touches, so small tables share trees: the
per-state counts sit in `by_state` (a bare state sorts before its `state NUL` entries), and
job ids and event seqs are one past the last key of `jobs` and `events` (neither is ever
deleted) rather than counters in `ids`. A single-job submit so touches jobs, eligible,
by_state and events. Stores from before this layout are converted on open (`_upgrade`).

Text keys past 400 bytes are cut and suffixed with their SHA-256, because LMDB keys stop at 511
bytes and names may be 256 characters of 4-byte UTF-8.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import lmdb
import msgpack

from banyan.broker.records import Attempt, Event, Group, Job, JobState, Request, Worker
from banyan.defaults import INITIAL_MAP_SIZE, MAX_MAP_SIZE

__all__ = ["MapGrown", "ReadOnly", "ReadTx", "Store", "StoreError", "StoreFull", "WriteTx"]

P = ParamSpec("P")
T = TypeVar("T")

_U64 = struct.Struct(">Q")
_ATTEMPT = struct.Struct(">QI")
_ELIGIBLE = struct.Struct(">IQ")
_PAIR = struct.Struct(">QQ")
_PRIORITY_TOP = 2**31 - 1
_TARGETS = {"job": b"j", "group": b"g"}
_AVAILABLE = JobState.AVAILABLE.value
_STATES = tuple(s.value for s in JobState)
_DUMPED = ("jobs", "groups", "attempts", "edges")
# Numbered by their own table's last key, not by a counter in `ids`: one B-tree fewer per
# commit. Sound because no job and no event is ever deleted; a retention sweep would need the
# counters back (or to keep the last record).
_TABLE_IDS = {"job": "jobs", "event": "events"}

# Positions in a packed Job row, so put_job can read the previous record's indexed fields
# without building a Job.
_F = {name: i for i, name in enumerate(Job.names())}
_ID, _STATE, _PENDING, _PRIORITY = _F["id"], _F["state"], _F["pending"], _F["priority"]
_CPUS, _MEMORY, _GPUS, _TAGS, _GROUPS = (
    _F["cpus"],
    _F["memory"],
    _F["gpus"],
    _F["tags"],
    _F["groups"],
)
# append_event builds Event rows by hand.
assert Event.names() == ("seq", "time", "job", "frm", "to", "reason")


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _text_key(text: str) -> bytes:
    key = text.encode()
    # A cut key is 432 bytes, longer than any uncut one, so the two kinds never collide.
    return key if len(key) <= 400 else key[:400] + hashlib.sha256(key).digest()


def _state_key(state: str, job_id: int) -> bytes:
    return state.encode() + b"\0" + _U64.pack(job_id)


def _eligible_key(priority: int, job_id: int) -> bytes:
    if not -(2**31) <= priority <= _PRIORITY_TOP:
        raise ValueError(f"priority {priority} outside the int32 range")
    return _ELIGIBLE.pack(_PRIORITY_TOP - priority, job_id)


class StoreError(Exception):
    """The store refused or failed an operation."""


class StoreFull(StoreError):
    """No room: the disk is full or the map reached max_map_size. The transaction was undone."""


class MapGrown(StoreError):
    """write() hit the map limit and has doubled the map: the transaction was undone, run it
    again. write_batch() does exactly that."""


class ReadOnly(StoreError):
    """A write on a read view."""


def _no_space(exc: lmdb.Error, path: str) -> bool:
    # lmdb names ENOSPC (DiskError); other errnos only show in the message.
    text = str(exc).lower()
    if isinstance(exc, lmdb.DiskError) or any(
        words in text for words in ("no space", "enospc", "quota exceeded")
    ):
        return True
    # A write cut short by a full disk makes mdb_txn_commit say EIO, not ENOSPC: call it full
    # when the filesystem has (next to) nothing left. The commit was undone either way.
    return "input/output error" in text and _free_bytes(path) < _FULL_BELOW


_FULL_BELOW = 1 << 20


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return _FULL_BELOW
    return st.f_bavail * st.f_frsize


class _Clock:
    """Changes to the eligible index, counted in memory, and the empty scans noted against
    them (see ReadTx.empty_scan). Volatile: a restart starts with no notes."""

    __slots__ = ("grown", "notes", "shrunk")

    def __init__(self) -> None:
        # `grown`: an entry was added or its request changed, or a write transaction was
        # undone (which may put back entries it had removed). `shrunk`: an entry was removed.
        self.grown = 0
        self.shrunk = 0
        self.notes: dict[str, tuple[int, int, bool, Any]] = {}


class _Batch:
    """What one outer write transaction and its children share."""

    __slots__ = ("clock", "env", "failure", "mutations", "pack")

    def __init__(self, env: lmdb.Environment, clock: _Clock) -> None:
        self.env = env
        self.clock = clock
        self.failure: str | None = None  # "map" or "disk" once a write ran out of room
        self.mutations = 0  # bumped by every write, so open scans know to re-seek
        # One Packer per transaction: packb builds a new one per call, which costs more than
        # packing a job row. A transaction is used from one thread, so sharing it is safe.
        self.pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack

    def note(self, exc: lmdb.Error) -> StoreError:
        """Remember a space failure, which dooms the whole outer transaction even if the
        caller swallows the exception (e.g. a per-message handler answering "internal")."""
        if isinstance(exc, lmdb.MapFullError):
            self.failure = self.failure or "map"
        elif _no_space(exc, self.env.path()):
            self.failure = "disk"
        else:
            return StoreError(f"store: {exc}")
        return StoreFull(f"store full: {exc}")


class _Dbs:
    """The named databases, one attribute each (layout in the module docstring)."""

    jobs: Any
    attempts: Any
    groups: Any
    group_names: Any
    edges: Any
    workers: Any
    claimers: Any
    submit_keys: Any
    events: Any
    meta: Any
    ids: Any
    eligible: Any
    by_state: Any
    members: Any

    def __init__(self, env: lmdb.Environment) -> None:
        for name in self.__annotations__:
            setattr(self, name, env.open_db(name.encode()))


class ReadTx:
    """A consistent snapshot with every getter of records.Tx; writes raise ReadOnly."""

    __slots__ = ("_batch", "_db", "_txn")

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: _Dbs, batch: _Batch) -> None:
        self._txn = txn
        self._db = dbs
        self._batch = batch

    def _scan(self, db: Any, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Items whose key starts with prefix, from start, in key order. A write between two
        items may move pages under the cursor, so after one it re-seeks past the last key."""
        cursor = self._txn.cursor(db)
        seen = self._batch.mutations
        found = cursor.set_range(start or prefix)
        while found:
            key, value = cursor.item()
            if not key.startswith(prefix):
                return
            yield key, value
            if self._batch.mutations == seen:
                found = cursor.next()
            else:
                seen = self._batch.mutations
                found = cursor.set_range(key + b"\0")  # the least key after `key`

    def get_job(self, job_id: int) -> Job | None:
        raw = self._txn.get(_U64.pack(job_id), db=self._db.jobs)
        return None if raw is None else Job.unpack(_unpack(raw))

    def eligible(self) -> Iterator[tuple[int, Request]]:
        for key, value in self._scan(self._db.eligible, b""):
            cpus, memory, gpus, tags = _unpack(value)
            yield _ELIGIBLE.unpack(key)[1], (cpus, memory, gpus, tags)

    def jobs_in_state(self, state: str) -> Iterator[int]:
        for key, _ in self._scan(self._db.by_state, state.encode() + b"\0"):
            yield _U64.unpack_from(key, len(key) - 8)[0]

    def group_members(self, group_id: int) -> Iterator[int]:
        for key, _ in self._scan(self._db.members, _U64.pack(group_id)):
            yield _PAIR.unpack(key)[1]

    def state_counts(self) -> dict[str, int]:
        """Jobs per state; every JobState is present, zero or not."""
        get, db = self._txn.get, self._db.by_state
        return {
            state: 0 if (raw := get(state.encode(), db=db)) is None else _U64.unpack(raw)[0]
            for state in _STATES
        }

    def get_attempt(self, job_id: int, number: int) -> Attempt | None:
        raw = self._txn.get(_ATTEMPT.pack(job_id, number), db=self._db.attempts)
        return None if raw is None else Attempt.unpack(_unpack(raw))

    def attempts_of(self, job_id: int) -> list[Attempt]:
        scan = self._scan(self._db.attempts, _U64.pack(job_id))
        return [Attempt.unpack(_unpack(value)) for _, value in scan]

    def dependents(self, target: str, target_id: int) -> list[tuple[int, str]]:
        scan = self._scan(self._db.edges, _TARGETS[target] + _U64.pack(target_id))
        return [(_U64.unpack_from(key, 9)[0], value.decode()) for key, value in scan]

    def get_group(self, group_id: int) -> Group | None:
        raw = self._txn.get(_U64.pack(group_id), db=self._db.groups)
        return None if raw is None else Group.unpack(_unpack(raw))

    def group_by_name(self, name: str) -> Group | None:
        raw = self._txn.get(_text_key(name), db=self._db.group_names)
        return None if raw is None else self.get_group(_U64.unpack(raw)[0])

    def groups(self) -> Iterator[Group]:
        for _, value in self._scan(self._db.groups, b""):
            yield Group.unpack(_unpack(value))

    def get_worker(self, name: str) -> Worker | None:
        raw = self._txn.get(_text_key(name), db=self._db.workers)
        return None if raw is None else Worker.unpack(_unpack(raw))

    def workers(self) -> Iterator[Worker]:
        for _, value in self._scan(self._db.workers, b""):
            yield Worker.unpack(_unpack(value))

    def claimers(self) -> list[str]:
        return [value.decode() for _, value in self._txn.cursor(self._db.claimers)]

    def get_submit_key(self, owner: str, key: str) -> Any:
        raw = self._txn.get(_text_key(f"{owner}\0{key}"), db=self._db.submit_keys)
        return None if raw is None else _unpack(raw)

    def events_from(self, seq: int, limit: int) -> list[Event]:
        events: list[Event] = []
        for _, value in self._scan(self._db.events, b"", _U64.pack(seq)):
            if len(events) >= limit:
                break
            events.append(Event.unpack(_unpack(value)))
        return events

    def get_meta(self, key: str) -> Any:
        raw = self._txn.get(_text_key(key), db=self._db.meta)
        return None if raw is None else _unpack(raw)

    def _last_key(self, db: Any) -> int:
        cursor = self._txn.cursor(db)
        return int(_U64.unpack(cursor.key())[0]) if cursor.last() else 0

    def last_id(self, counter: str) -> int:
        table = _TABLE_IDS.get(counter)
        if table is not None:
            return self._last_key(getattr(self._db, table))
        raw = self._txn.get(_text_key(counter), db=self._db.ids)
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def next_job_id(self) -> int:
        return self._last_key(self._db.jobs) + 1

    def empty_scan(self, worker: str) -> Any:
        """The note kept by note_empty_scan for `worker`, while it still holds: no entry has
        joined the eligible index since (nor left it, unless that scan saw the whole index)."""
        note = self._batch.clock.notes.get(worker)
        if note is None:
            return None
        grown, shrunk, whole, memo = note
        clock = self._batch.clock
        if grown != clock.grown or not (whole or shrunk == clock.shrunk):
            return None
        return memo

    # The writers of records.Tx, so a read view can stand wherever a Tx is expected.
    def next_id(self, counter: str, count: int = 1) -> int:
        raise ReadOnly("next_id on a read view")

    def note_empty_scan(self, worker: str, whole: bool, memo: Any) -> None:
        raise ReadOnly("note_empty_scan on a read view")

    def put_job(self, job: Job) -> None:
        raise ReadOnly("put_job on a read view")

    def put_new_jobs(self, rows: list[list[Any]]) -> None:
        raise ReadOnly("put_new_jobs on a read view")

    def put_attempt(self, attempt: Attempt) -> None:
        raise ReadOnly("put_attempt on a read view")

    def add_dependent(self, target: str, target_id: int, dependent: int, kind: str) -> None:
        raise ReadOnly("add_dependent on a read view")

    def put_group(self, group: Group) -> None:
        raise ReadOnly("put_group on a read view")

    def put_worker(self, worker: Worker) -> None:
        raise ReadOnly("put_worker on a read view")

    def delete_worker(self, name: str) -> None:
        raise ReadOnly("delete_worker on a read view")

    def put_submit_key(self, owner: str, key: str, value: Any) -> None:
        raise ReadOnly("put_submit_key on a read view")

    def append_event(
        self, time: float, job: int, frm: str | None, to: str, reason: str | None
    ) -> int:
        raise ReadOnly("append_event on a read view")

    def put_meta(self, key: str, value: Any) -> None:
        raise ReadOnly("put_meta on a read view")

    def append_events(self, rows: list[tuple[float, int, str | None, str, str | None]]) -> int:
        raise ReadOnly("append_events on a read view")


def _writes(method: Callable[Concatenate[WriteTx, P], T]) -> Callable[Concatenate[WriteTx, P], T]:
    """Count the write for open scans and turn lmdb errors into StoreErrors."""

    @functools.wraps(method)
    def write(self: WriteTx, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._batch.mutations += 1
        try:
            return method(self, *args, **kwargs)
        except lmdb.Error as exc:
            raise self._batch.note(exc) from exc

    return write


class WriteTx(ReadTx):
    """One write transaction (or a child of one): implements records.Tx."""

    __slots__ = ("_counts", "_parent")

    def __init__(
        self,
        txn: lmdb.Transaction[bytes],
        dbs: _Dbs,
        batch: _Batch,
        parent: WriteTx | None = None,
    ) -> None:
        super().__init__(txn, dbs, batch)
        # Per-state deltas: a child hands its own to its parent as it commits, and the outer
        # transaction writes them (_flush), so a turn of many requests writes each count once.
        self._counts: dict[str, int] = {}
        self._parent = parent

    def _flush(self) -> None:
        """Write the per-state count deltas: once per outer transaction."""
        for state, delta in self._counts.items():
            if delta:
                self._count(state, delta)
        self._counts.clear()

    def state_counts(self) -> dict[str, int]:
        counts = super().state_counts()
        tx: WriteTx | None = self
        while tx is not None:  # the deltas not written yet, here and in every ancestor
            for state, delta in tx._counts.items():
                counts[state] += delta
            tx = tx._parent
        return counts

    @contextmanager
    def child(self) -> Iterator[WriteTx]:
        """A nested transaction: merged into this one on normal exit, undone on exception.
        This transaction must not be used until the child ends."""
        try:
            txn = self._batch.env.begin(write=True, parent=self._txn)
        except lmdb.Error as exc:
            raise self._batch.note(exc) from exc
        child = WriteTx(txn, self._db, self._batch, self)
        try:
            yield child
        except BaseException:
            txn.abort()
            self._batch.clock.grown += 1  # the undo may put back eligible entries
            raise
        finally:
            self._batch.mutations += 1  # the parent's tree changed (or was restored)
        try:
            child._commit()
        except lmdb.Error as exc:
            raise self._batch.note(exc) from exc
        counts = self._counts
        for state, delta in child._counts.items():
            counts[state] = counts.get(state, 0) + delta

    def _commit(self) -> None:  # the one place transactions commit, so tests can fail it
        self._txn.commit()

    def _count(self, state: str, delta: int) -> None:
        key = state.encode()
        raw = self._txn.get(key, db=self._db.by_state)
        count = (0 if raw is None else _U64.unpack(raw)[0]) + delta
        if count:
            self._txn.put(key, _U64.pack(count), db=self._db.by_state)
        else:
            self._txn.delete(key, db=self._db.by_state)

    def note_empty_scan(self, worker: str, whole: bool, memo: Any) -> None:
        """Keep `memo` for `worker` until the eligible index gains an entry (or loses one,
        unless `whole`: the scan saw every entry, so a removal cannot bring a new one into
        its reach). Memory only; an undone transaction voids every note."""
        clock = self._batch.clock
        clock.notes[worker] = (clock.grown, clock.shrunk, whole, memo)

    @_writes
    def next_id(self, counter: str, count: int = 1) -> int:
        if counter in _TABLE_IDS:
            raise StoreError(f"{counter} ids come from their table, not a counter")
        key = _text_key(counter)
        raw = self._txn.get(key, db=self._db.ids)
        first = (0 if raw is None else _U64.unpack(raw)[0]) + 1
        self._txn.put(key, _U64.pack(first + count - 1), db=self._db.ids)
        return first

    @_writes
    def put_job(self, job: Job) -> None:
        key = _U64.pack(job.id)
        pack = self._batch.pack
        value = pack(job.pack())
        txn, db = self._txn, self._db
        raw = txn.get(key, db=db.jobs)
        if raw == value:
            return
        txn.put(key, value, db=db.jobs)
        old: Any = None if raw is None else _unpack(raw)

        old_key = None
        if old is not None and old[_STATE] == _AVAILABLE and old[_PENDING] == 0:
            old_key = _eligible_key(old[_PRIORITY], job.id)
        new_key = _eligible_key(job.priority, job.id) if job.eligible else None
        if old_key is not None and old_key != new_key:
            txn.delete(old_key, db=db.eligible)
            self._batch.clock.shrunk += 1
        if new_key is not None:
            request = [job.cpus, job.memory, job.gpus, job.tags]
            if old_key != new_key or request != [old[i] for i in (_CPUS, _MEMORY, _GPUS, _TAGS)]:
                txn.put(new_key, pack(request), db=db.eligible)
                self._batch.clock.grown += 1

        old_state = None if old is None else old[_STATE]
        if old_state != job.state:
            counts = self._counts
            if old_state is not None:
                txn.delete(_state_key(old_state, job.id), db=db.by_state)
                counts[old_state] = counts.get(old_state, 0) - 1
            txn.put(_state_key(job.state, job.id), b"", db=db.by_state)
            counts[job.state] = counts.get(job.state, 0) + 1

        old_groups = [] if old is None else old[_GROUPS]
        if old_groups != job.groups:
            for group_id in set(old_groups) - set(job.groups):
                txn.delete(_PAIR.pack(group_id, job.id), db=db.members)
            for group_id in set(job.groups) - set(old_groups):
                txn.put(_PAIR.pack(group_id, job.id), b"", db=db.members)

    @_writes
    def put_new_jobs(self, rows: list[list[Any]]) -> None:
        """Jobs not stored yet, as packed rows (`Job.pack()` order) with ascending ids above
        every stored one: put_job without reading anything back, each table in one putmulti."""
        if not rows:
            return
        pack, u64 = self._batch.pack, _U64.pack
        keys = [u64(row[_ID]) for row in rows]
        jobs = [(key, pack(row)) for key, row in zip(keys, rows, strict=True)]
        tally: dict[str, int] = {}
        for row in rows:
            tally[row[_STATE]] = tally.get(row[_STATE], 0) + 1
        prefix = {state: state.encode() + b"\0" for state in tally}
        states = [(prefix[row[_STATE]] + key, b"") for key, row in zip(keys, rows, strict=True)]
        eligible = [
            (
                _eligible_key(row[_PRIORITY], row[_ID]),
                pack([row[_CPUS], row[_MEMORY], row[_GPUS], row[_TAGS]]),
            )
            for row in rows
            if row[_STATE] == _AVAILABLE and not row[_PENDING]
        ]
        members = [(_PAIR.pack(g, row[_ID]), b"") for row in rows for g in set(row[_GROUPS])]
        txn, db, counts = self._txn, self._db, self._counts
        cursor = txn.cursor(db.jobs)
        # Appending fills pages to the brim instead of splitting them in half: fewer pages
        # to write. It needs every key past the last stored one, which new ids always are.
        append = not cursor.last() or cursor.key() < jobs[0][0]
        if cursor.putmulti(jobs, overwrite=False, append=append) != (len(jobs), len(jobs)):
            raise StoreError("put_new_jobs: a job id is already taken or out of order")
        if eligible:
            txn.cursor(db.eligible).putmulti(eligible)
            self._batch.clock.grown += 1
        txn.cursor(db.by_state).putmulti(states)
        if members:
            txn.cursor(db.members).putmulti(members)
        for state, n in tally.items():
            counts[state] = counts.get(state, 0) + n

    @_writes
    def put_attempt(self, attempt: Attempt) -> None:
        key = _ATTEMPT.pack(attempt.job, attempt.number)
        self._txn.put(key, self._batch.pack(attempt.pack()), db=self._db.attempts)

    @_writes
    def add_dependent(self, target: str, target_id: int, dependent: int, kind: str) -> None:
        key = _TARGETS[target] + _PAIR.pack(target_id, dependent)
        self._txn.put(key, kind.encode(), db=self._db.edges)

    @_writes
    def put_group(self, group: Group) -> None:
        key = _U64.pack(group.id)
        names = self._db.group_names
        raw = self._txn.get(key, db=self._db.groups)
        if raw is not None:
            old_name = _unpack(raw)[1]
            if old_name != group.name and self._txn.get(_text_key(old_name), db=names) == key:
                self._txn.delete(_text_key(old_name), db=names)
        self._txn.put(key, self._batch.pack(group.pack()), db=self._db.groups)
        self._txn.put(_text_key(group.name), key, db=names)

    @_writes
    def put_worker(self, worker: Worker) -> None:
        key = _text_key(worker.name)
        self._txn.put(key, self._batch.pack(worker.pack()), db=self._db.workers)
        # Heartbeats rewrite workers all the time: touch the claimers index only on a change.
        claiming = self._txn.get(key, db=self._db.claimers) is not None
        if worker.wants > 0 and not claiming:
            self._txn.put(key, worker.name.encode(), db=self._db.claimers)
        elif worker.wants <= 0 and claiming:
            self._txn.delete(key, db=self._db.claimers)

    @_writes
    def delete_worker(self, name: str) -> None:
        key = _text_key(name)
        self._txn.delete(key, db=self._db.workers)
        self._txn.delete(key, db=self._db.claimers)
        self._batch.clock.notes.pop(name, None)

    @_writes
    def put_submit_key(self, owner: str, key: str, value: Any) -> None:
        self._txn.put(
            _text_key(f"{owner}\0{key}"), self._batch.pack(value), db=self._db.submit_keys
        )

    @_writes
    def append_event(
        self, time: float, job: int, frm: str | None, to: str, reason: str | None
    ) -> int:
        seq = self._last_key(self._db.events) + 1
        row = [seq, time, job, frm, to, reason]  # Event.pack() order
        self._txn.put(_U64.pack(seq), self._batch.pack(row), append=True, db=self._db.events)
        return seq

    @_writes
    def append_events(self, rows: list[tuple[float, int, str | None, str, str | None]]) -> int:
        """Several events, numbered from the returned seq."""
        cursor = self._txn.cursor(self._db.events)
        first = (_U64.unpack(cursor.key())[0] if cursor.last() else 0) + 1
        pack = self._batch.pack
        items = [(_U64.pack(seq), pack([seq, *row])) for seq, row in enumerate(rows, first)]
        cursor.putmulti(items, append=True)
        return first

    @_writes
    def put_meta(self, key: str, value: Any) -> None:
        self._txn.put(_text_key(key), self._batch.pack(value), db=self._db.meta)


class Store:
    """One LMDB environment holding the broker's state.

    Use from one thread at a time: the map can only grow while no transaction is open.
    """

    def __init__(
        self,
        path: str | Path,
        map_size: int = INITIAL_MAP_SIZE,
        sync: bool = True,
        max_map_size: int = MAX_MAP_SIZE,
    ) -> None:
        self.max_map_size = max_map_size
        # No writemap: LMDB refuses nested (child) transactions with it.
        self._env = lmdb.open(
            str(path),
            map_size=min(map_size, max_map_size),
            subdir=True,
            max_dbs=len(_Dbs.__annotations__) + 2,  # + the old `counts`, for _upgrade
            lock=True,
            sync=sync,
            metasync=sync,
        )
        self._db = _Dbs(self._env)
        self._writing = False
        self._readers = 0  # open read views: the map must not move under them
        self._clock = _Clock()
        self._upgrade()

    def _upgrade(self) -> None:
        """Convert a store from before the per-state counts moved into `by_state` and job and
        event numbers into their tables' last keys (module docstring)."""
        with self._env.begin(write=True) as txn:
            if txn.get(b"counts") is None:  # the main DB names every table
                return
            counts = self._env.open_db(b"counts", txn=txn)
            for key, value in txn.cursor(counts):
                txn.put(key, value, db=self._db.by_state)
            txn.drop(counts, delete=True)
            for counter in _TABLE_IDS:
                txn.delete(counter.encode(), db=self._db.ids)

    @property
    def map_size(self) -> int:
        return self._env.info()["map_size"]

    def _begin(self, write: bool) -> lmdb.Transaction[bytes]:
        try:
            return self._env.begin(write=write)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
            return self._env.begin(write=write)

    @contextmanager
    def write(self) -> Iterator[WriteTx]:
        """A write transaction: committed on normal exit, undone on exception.

        Running out of room undoes the whole transaction, even if the body swallowed the
        error; then it raises MapGrown when the map could double (run it again) or StoreFull.
        """
        if self._writing:
            raise StoreError("a write transaction is already open")  # LMDB would deadlock
        txn = self._begin(write=True)
        batch = _Batch(self._env, self._clock)
        self._writing = True
        committed = False
        try:
            try:
                tx = WriteTx(txn, self._db, batch)
                yield tx
                if batch.failure is None:
                    tx._flush()
                    tx._commit()
                    committed = True
                    return
            except lmdb.Error as exc:  # from commit, or a getter in a failed transaction
                error = batch.note(exc)
                if batch.failure is None:
                    raise error from exc
            except BaseException:
                if batch.failure is None:
                    raise
        finally:
            txn.abort()  # a no-op once committed
            self._writing = False
            if not committed:
                self._clock.grown += 1  # the undo may put back eligible entries
        self._grow(batch.failure)  # out of room: whatever the body raised, this is the cause

    def _grow(self, failure: str | None) -> None:
        size = self.map_size
        if failure == "disk":
            raise StoreFull("no space left on device")
        if self._readers:
            raise StoreError("the map is full but cannot grow while a read view is open")
        if size >= self.max_map_size:
            raise StoreFull(f"store reached its maximum size of {self.max_map_size} bytes")
        try:
            self._env.set_mapsize(min(2 * size, self.max_map_size))
        except lmdb.Error as exc:
            raise StoreFull(f"cannot grow the store: {exc}") from exc
        raise MapGrown(f"map grown from {size} to {self.map_size} bytes")

    def write_batch(self, fn: Callable[[WriteTx], T]) -> T:
        """Run fn in a write transaction and commit, growing the map and running fn again from
        scratch as often as needed. So fn must be re-runnable: no external side effects (no
        replies sent, no shared state changed) before it returns. Raises StoreFull."""
        while True:
            try:
                with self.write() as tx:
                    result = fn(tx)
                return result
            except MapGrown:
                continue

    @contextmanager
    def read(self) -> Iterator[ReadTx]:
        """A read-only snapshot with the same getters."""
        txn = self._begin(write=False)
        self._readers += 1
        try:
            yield ReadTx(txn, self._db, _Batch(self._env, self._clock))
        finally:
            self._readers -= 1
            txn.abort()

    def sync(self) -> None:
        """Flush to disk; only needed when opened with sync=False."""
        self._env.sync(True)

    def dump(self) -> bytes:
        """Every job, group, attempt and edge record, in key order: equal dumps, equal state."""
        with self._begin(write=False) as txn:
            tables = [[name, list(txn.cursor(getattr(self._db, name)))] for name in _DUMPED]
        return _pack(tables)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
