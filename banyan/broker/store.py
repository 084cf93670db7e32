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
    claimers     name                                      -> name   (wants > 0, or jobs ahead)
    submit_keys  owner NUL key                             -> msgpack value
    submit_times time:f64 owner NUL key                    -> empty (when each key was made)
    events       seq:u64                                   -> Event row
    meta         key                                       -> msgpack value
    ids          counter name                              -> last id issued:u64
    eligible     owner:u32 shape:u32 (2**31-1 - priority):u32 id:u64 -> Request row
    by_state     state NUL id:u64                          -> empty
                 state                                     -> jobs in that state:u64
                 1 owner_len:u16 owner state:u8 id:u64     -> empty
                 2 group:u64 state:u8                      -> that group's jobs in it:u64
    members      group:u64 job:u64                         -> empty
    ops          id:u64                                    -> Op row (a long operation)
    op_data      op:u64 r                                  -> a submission's request, as sent
                 op:u64 d job:u64                          -> why that job of it is born doomed
                 op:u64 w band+2**63:u64 seq:u64           -> a walk the cascade has to do
    owners       name                                      -> [owner:u32, {state: jobs}, mcpus]
    owner_names  owner:u32                                 -> name
    shapes       packed [cpus, memory, gpus, sorted tags]  -> shape:u32
    users        name                                      -> User row
    environments content key (hex)                         -> [jobs naming it, env map] (an export)

`eligible` holds exactly the jobs that are available with no pending dependency, in queues:
one per owner and shape (the same cpus, memory, gpus and tags), each best first (priority
descending, then id ascending). Each entry carries its job's Request so a claim can test fit
without loading the job. Every job of a queue fits wherever its head fits, so a claim reads
only the heads, one B-tree descent each, however many jobs wait behind them, and jobs that fit
no worker never stand in the way of jobs that do. Owners and shapes are numbered on first
sight (`owners`, `shapes`); numbers are never reused. `owners` also counts each owner's jobs
by state and the cpus (in thousandths) its running jobs hold.

The owner entries of `by_state` list a user's jobs by state in id order (so by submission
time), and with the owners' tallies and the group counts they answer `banyan-status --user U`
and `--group G` summaries without reading each job; `state:u8` is the state's place in
JobState. State names begin with a letter, so the 1 and 2 prefixes never meet them. Every
write and delete of by_state's entries and counts goes through `_restate` (but for
put_new_jobs' bulk form), and `delete_job` removes a job with it.

Every commit rewrites the path to each B-tree it touches, so small tables share trees: the
per-state counts sit in `by_state` (a bare state sorts before its `state NUL` entries), and
job ids and event seqs are one past the last key of `jobs` and `events` rather than counters
in `ids`. Retention deletes the oldest records of both; when it deletes the last one of a table
it leaves that number in `ids` (under "purged job" or "purged event"), so numbers are never
reused; a submission made a slice at a time reserves its job ids there too (`reserve_jobs`).
A single-job submit so touches jobs, eligible, by_state, owners and events. Stores from before
a layout are converted on open (`_upgrade`); `meta` holds the layout's number under "format"
(`FORMAT`).

The environment folder and its files are made for the broker's account alone (0700, 0600):
they hold every job's command and the environments users exported.

Text keys past 400 bytes are cut and suffixed with their SHA-256, because LMDB keys stop at 511
bytes and names may be 256 characters of 4-byte UTF-8.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import lmdb
import msgpack

from banyan.broker.records import (
    HOLDING,
    Attempt,
    Event,
    Group,
    Head,
    Job,
    JobState,
    Request,
    Tally,
    User,
    Worker,
)
from banyan.defaults import INITIAL_MAP_SIZE, MAX_MAP_SIZE
from banyan.keys import private_dir

__all__ = ["MapGrown", "ReadOnly", "ReadTx", "Store", "StoreError", "StoreFull", "WriteTx"]

P = ParamSpec("P")
T = TypeVar("T")

# The layout version kept in meta "format". 2: eligible keys start with the owner and the
# shape; owners numbered, with their tallies; owner entries and group counts in by_state.
FORMAT = 2
_U64 = struct.Struct(">Q")
_MAX_ID = 2**64 - 1
_ATTEMPT = struct.Struct(">QI")
_ELIGIBLE = struct.Struct(">IIIQ")  # owner, shape, inverted priority, id
_QUEUE = struct.Struct(">II")  # owner, shape: the prefix of one queue's entries
_RANK = struct.Struct(">IQ")  # inverted priority, id: the rest of an eligible key
_U32 = struct.Struct(">I")
_PAIR = struct.Struct(">QQ")
_BAND_ZERO = 1 << 63  # a cascade walk's band 0, so that negative bands sort before it
_PRIORITY_TOP = 2**31 - 1
_TARGETS = {"job": b"j", "group": b"g"}
_AVAILABLE = JobState.AVAILABLE.value
_HOLDING = frozenset(s.value for s in HOLDING)
_STATES = tuple(s.value for s in JobState)
_DUMPED = ("jobs", "groups", "attempts", "edges", "environments")
# Numbered by their own table's last key, not by a counter in `ids`: one B-tree fewer per
# commit. A purge that deletes a table's last key leaves its number in `ids` (_FLOORS).
_TABLE_IDS = {"job": "jobs", "event": "events"}
_FLOORS = {"job": b"purged job", "event": b"purged event"}
_TIME = struct.Struct(">d")  # a time >= 0: its bytes sort as it does

# Positions in a packed Job row, so put_job can read the previous record's indexed fields
# without building a Job.
_F = {name: i for i, name in enumerate(Job.names())}
_ID, _STATE, _PENDING, _PRIORITY = _F["id"], _F["state"], _F["pending"], _F["priority"]
_OWNER, _SUBMITTED, _ACCOUNT = _F["owner"], _F["submitted"], _F["account"]
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


_STATE_CODE = {state: i for i, state in enumerate(_STATES)}
_BY_OWNER, _BY_GROUP = b"\x01", b"\x02"
_STATE_KEYS = {state: state.encode() for state in _STATES}
_U16 = struct.Struct(">H")


@functools.lru_cache(maxsize=4096)  # a few owners and six states make most of them
def _owner_prefix(owner: str, state: str) -> bytes:
    """The prefix of by_state's entries of `owner`'s jobs in `state`."""
    name = _text_key(owner)
    return _BY_OWNER + _U16.pack(len(name)) + name + bytes((_STATE_CODE[state],))


def _group_key(group_id: int, state: str) -> bytes:
    return _BY_GROUP + _U64.pack(group_id) + bytes((_STATE_CODE[state],))


def _rank(priority: int, job_id: int) -> bytes:
    """The part of an eligible key after the queue: best first within the queue."""
    if not -(2**31) <= priority <= _PRIORITY_TOP:
        raise ValueError(f"priority {priority} outside the int32 range")
    return _RANK.pack(_PRIORITY_TOP - priority, job_id)


def _mcpus(cpus: float) -> int:
    """Cpus in thousandths: sums of them stay exact however many jobs come and go."""
    return round(cpus * 1000)


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


class _Batch:
    """What one outer write transaction and its children share."""

    __slots__ = ("env", "failure", "mutations", "pack")

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
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
    ops: Any
    op_data: Any
    owners: Any
    owner_names: Any
    shapes: Any
    users: Any
    submit_times: Any
    environments: Any

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
        """Every eligible job, queue by queue (owner, then shape), best first in each."""
        for key, value in self._scan(self._db.eligible, b""):
            cpus, memory, gpus, tags = _unpack(value)
            yield _ELIGIBLE.unpack(key)[3], (cpus, memory, gpus, tags)

    def queue_heads(self) -> list[Head]:
        """The first entry of every queue: a skip scan, one descent per queue."""
        cursor = self._txn.cursor(self._db.eligible)
        heads: list[Head] = []
        names: dict[int, str] = {}
        found = cursor.first()
        while found:
            key, value = cursor.item()
            heads.append(self._head(key, value, names))
            owner, shape = _QUEUE.unpack_from(key)
            found = cursor.set_range(_QUEUE.pack(owner, shape + 1))  # past this queue
        return heads

    def queue_head(self, queue: bytes, after: Head | None = None) -> Head | None:
        """The queue's first entry, or with `after` (one of its entries) the one behind it."""
        cursor = self._txn.cursor(self._db.eligible)
        start = queue if after is None else queue + _rank(after.priority, after.job) + b"\0"
        if not cursor.set_range(start) or not cursor.key().startswith(queue):
            return None
        return self._head(cursor.key(), cursor.value(), {})

    def _head(self, key: bytes, value: bytes, names: dict[int, str]) -> Head:
        owner, _, rank, job_id = _ELIGIBLE.unpack(key)
        name = names.get(owner)
        if name is None:
            raw = self._txn.get(_U32.pack(owner), db=self._db.owner_names)
            name = names[owner] = "" if raw is None else raw.decode()
        cpus, memory, gpus, tags = _unpack(value)
        return Head(key[:8], name, (cpus, memory, gpus, tags), _PRIORITY_TOP - rank, job_id)

    def tally(self, owner: str) -> Tally:
        raw = self._txn.get(_text_key(owner), db=self._db.owners)
        counts, mcpus = ({}, 0) if raw is None else _unpack(raw)[1:]
        return Tally(owner, counts, mcpus / 1000)

    def tallies(self) -> Iterator[Tally]:
        for _, value in self._scan(self._db.owners, b""):
            uid, counts, mcpus = _unpack(value)
            raw = self._txn.get(_U32.pack(uid), db=self._db.owner_names)
            yield Tally("" if raw is None else raw.decode(), counts, mcpus / 1000)

    def get_user(self, name: str) -> User | None:
        raw = self._txn.get(_text_key(name), db=self._db.users)
        return None if raw is None else User.unpack(_unpack(raw))

    def users(self) -> Iterator[User]:
        for _, value in self._scan(self._db.users, b""):
            yield User.unpack(_unpack(value))

    def jobs_in_state(self, state: str) -> Iterator[int]:
        for key, _ in self._scan(self._db.by_state, state.encode() + b"\0"):
            yield _U64.unpack_from(key, len(key) - 8)[0]

    def group_members(self, group_id: int) -> Iterator[int]:
        for key, _ in self._scan(self._db.members, _U64.pack(group_id)):
            yield _PAIR.unpack(key)[1]

    def _ids(self, db: Any, prefix: bytes, lo: int, hi: int, descending: bool) -> Iterator[int]:
        """The ids in [lo, hi] of the keys `prefix id:u64`, ascending or descending. Like
        _scan it re-seeks after a write, so the caller may change the table as it goes."""
        if lo > hi:
            return
        cursor = self._txn.cursor(db)
        seen = self._batch.mutations
        end = len(prefix) + 8
        if descending:  # from the greatest key at or below prefix:hi
            top = prefix + _U64.pack(hi)
            at_or_above = cursor.set_range(top)
            found = (cursor.key() == top or cursor.prev()) if at_or_above else cursor.last()
        else:
            found = cursor.set_range(prefix + _U64.pack(lo))
        while found:
            key = cursor.key()
            if len(key) != end or not key.startswith(prefix):
                return
            job_id = _U64.unpack_from(key, len(prefix))[0]
            if not lo <= job_id <= hi:
                return
            yield job_id
            if self._batch.mutations != seen:  # pages may have moved: find our place again
                seen = self._batch.mutations
                if descending:
                    found = cursor.prev() if cursor.set_range(key) else cursor.last()
                else:
                    found = cursor.set_range(key + b"\0")
            else:
                found = cursor.prev() if descending else cursor.next()

    def job_ids(self, lo: int = 1, hi: int = _MAX_ID, descending: bool = False) -> Iterator[int]:
        """Every job id in [lo, hi]."""
        return self._ids(self._db.jobs, b"", lo, hi, descending)

    def state_ids(
        self, state: str, lo: int = 1, hi: int = _MAX_ID, descending: bool = False
    ) -> Iterator[int]:
        """The ids in [lo, hi] of the jobs in `state`."""
        return self._ids(self._db.by_state, state.encode() + b"\0", lo, hi, descending)

    def owner_ids(
        self, owner: str, state: str, lo: int = 1, hi: int = _MAX_ID, descending: bool = False
    ) -> Iterator[int]:
        """The ids in [lo, hi] of `owner`'s jobs in `state`."""
        return self._ids(self._db.by_state, _owner_prefix(owner, state), lo, hi, descending)

    def member_ids(
        self, group_id: int, lo: int = 1, hi: int = _MAX_ID, descending: bool = False
    ) -> Iterator[int]:
        """The ids in [lo, hi] of the members of a group."""
        return self._ids(self._db.members, _U64.pack(group_id), lo, hi, descending)

    def owner_counts(self, owner: str) -> dict[str, int]:
        """`owner`'s jobs per state; every JobState is present."""
        counts = self.tally(owner).counts
        return {state: counts.get(state, 0) for state in _STATES}

    def group_counts(self, group_id: int) -> dict[str, int]:
        """A group's members per state; every JobState is present."""
        return self._tally({s: _group_key(group_id, s) for s in _STATES})

    def _tally(self, keys: dict[str, bytes]) -> dict[str, int]:
        get, db = self._txn.get, self._db.by_state
        return {
            state: 0 if (raw := get(key, db=db)) is None else _U64.unpack(raw)[0]
            for state, key in keys.items()
        }

    def first_submitted_since(self, when: float) -> int:
        """The lowest id of a job submitted at or after `when` (one past the last id if none).
        Ids are issued in time order, so this is a binary search over the jobs table; a wall
        clock stepped back can blur the edge by the size of the step."""
        cursor = self._txn.cursor(self._db.jobs)
        if not cursor.last():
            return 1
        lo, hi = 1, _U64.unpack(cursor.key())[0] + 1  # the answer is in [lo, hi]
        for _ in range(130):  # each pass narrows [lo, hi]; 64 halvings cover every u64
            if lo >= hi:
                break
            mid = (lo + hi) // 2
            cursor.set_range(_U64.pack(mid))  # mid < hi <= last + 1: some id >= mid exists
            job_id = _U64.unpack(cursor.key())[0]
            if _unpack(cursor.value())[_SUBMITTED] >= when:
                hi = mid  # no job has an id in [mid, job_id)
            else:
                lo = job_id + 1
        return lo

    def get_op(self, op_id: int) -> list[Any] | None:
        raw = self._txn.get(_U64.pack(op_id), db=self._db.ops)
        return None if raw is None else list(_unpack(raw))

    def ops(self) -> list[list[Any]]:
        """Every long operation in progress, as stored rows, oldest first."""
        return [list(_unpack(value)) for _, value in self._txn.cursor(self._db.ops)]

    def get_op_request(self, op_id: int) -> bytes | None:
        """The request a long operation was admitted for, as it came (put_op_request)."""
        return self._txn.get(_U64.pack(op_id) + b"r", db=self._db.op_data)

    def state_counts(self) -> dict[str, int]:
        """Jobs per state; every JobState is present, zero or not."""
        return self._tally(_STATE_KEYS)

    def get_attempt(self, job_id: int, number: int) -> Attempt | None:
        raw = self._txn.get(_ATTEMPT.pack(job_id, number), db=self._db.attempts)
        return None if raw is None else Attempt.unpack(_unpack(raw))

    def attempts_of(self, job_id: int) -> list[Attempt]:
        scan = self._scan(self._db.attempts, _U64.pack(job_id))
        return [Attempt.unpack(_unpack(value)) for _, value in scan]

    def dependents(self, target: str, target_id: int) -> list[tuple[int, str]]:
        return list(self.dependents_after(target, target_id, 0))

    def dependents_after(
        self, target: str, target_id: int, after: int
    ) -> Iterator[tuple[int, str]]:
        """The edges to a job or group from dependents with ids past `after`, in id order,
        read as they are walked: a cascade resumes a walk where its last slice stopped."""
        prefix = _TARGETS[target] + _U64.pack(target_id)
        scan = self._scan(self._db.edges, prefix, prefix + _U64.pack(after + 1))
        return ((_U64.unpack_from(key, 9)[0], value.decode()) for key, value in scan)

    def get_group(self, group_id: int) -> Group | None:
        raw = self._txn.get(_U64.pack(group_id), db=self._db.groups)
        return None if raw is None else Group.unpack(_unpack(raw))

    def group_by_name(self, name: str) -> Group | None:
        raw = self._txn.get(_text_key(name), db=self._db.group_names)
        return None if raw is None else self.get_group(_U64.unpack(raw)[0])

    def groups(self) -> Iterator[Group]:
        for _, value in self._scan(self._db.groups, b""):
            yield Group.unpack(_unpack(value))

    def groups_from(self, first: int, limit: int) -> list[Group]:
        scan = self._scan(self._db.groups, b"", _U64.pack(first))
        return [Group.unpack(_unpack(value)) for _, value in itertools.islice(scan, limit)]

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

    def get_environment(self, key: str) -> dict[str, str] | None:
        raw = self._txn.get(key.encode(), db=self._db.environments)
        return None if raw is None else dict(_unpack(raw)[1])

    def job_account(self, job_id: int) -> str | None:
        raw = self._txn.get(_U64.pack(job_id), db=self._db.jobs)
        if raw is None:
            return None
        row = _unpack(raw)
        # A row from before accounts were recorded is shorter: its owner's name is the account.
        return (row[_ACCOUNT] if len(row) > _ACCOUNT else None) or row[_OWNER]  # type: ignore[no-any-return]

    def _last_key(self, db: Any) -> int:
        cursor = self._txn.cursor(db)
        return int(_U64.unpack(cursor.key())[0]) if cursor.last() else 0

    def _top(self, counter: str) -> int:
        """The last job id or event seq ever issued: its table's last key, or the number a
        purge left when it deleted the last one."""
        raw = self._txn.get(_FLOORS[counter], db=self._db.ids)
        last = self._last_key(getattr(self._db, _TABLE_IDS[counter]))
        return last if raw is None else max(last, int(_U64.unpack(raw)[0]))

    def last_id(self, counter: str) -> int:
        if counter in _TABLE_IDS:
            return self._top(counter)
        raw = self._txn.get(_text_key(counter), db=self._db.ids)
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def next_job_id(self) -> int:
        return self._top("job") + 1

    def first_job(self) -> Job | None:
        """The oldest job still kept."""
        cursor = self._txn.cursor(self._db.jobs)
        return Job.unpack(_unpack(cursor.value())) if cursor.first() else None

    def store_info(self) -> dict[str, int]:
        """Bytes: `file` (data.mdb), `used` (pages of every table), `free` (pages LMDB has
        freed and will reuse before it grows the file), `map` (the map's current size)."""
        env = self._batch.env
        stat = env.stat()
        page = stat["psize"]
        pages = sum(
            s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
            for s in [stat, *(self._txn.stat(getattr(self._db, n)) for n in _Dbs.__annotations__)]
        )
        ever = env.info()["last_pgno"] + 1  # pages the file has ever held, with 2 meta pages
        try:
            size = os.stat(os.path.join(env.path(), "data.mdb")).st_size
        except OSError:
            size = ever * page
        return {
            "file": size,
            "used": pages * page,
            "free": max(0, ever - 2 - pages) * page,
            "map": env.info()["map_size"],
        }

    # The writers of records.Tx, so a read view can stand wherever a Tx is expected.
    def next_id(self, counter: str, count: int = 1) -> int:
        raise ReadOnly("next_id on a read view")

    def put_user(self, user: User) -> None:
        raise ReadOnly("put_user on a read view")

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

    def put_submit_key(self, owner: str, key: str, value: Any, time: float) -> None:
        raise ReadOnly("put_submit_key on a read view")

    def delete_job(self, job_id: int) -> Job | None:
        raise ReadOnly("delete_job on a read view")

    def delete_group(self, group_id: int) -> None:
        raise ReadOnly("delete_group on a read view")

    def delete_events_through(self, seq: int) -> int:
        raise ReadOnly("delete_events_through on a read view")

    def expire_submit_keys(self, before: float, limit: int) -> int:
        raise ReadOnly("expire_submit_keys on a read view")

    def append_event(
        self, time: float, job: int, frm: str | None, to: str, reason: str | None
    ) -> int:
        raise ReadOnly("append_event on a read view")

    def put_meta(self, key: str, value: Any) -> None:
        raise ReadOnly("put_meta on a read view")

    def put_environment(self, key: str, env: dict[str, str], jobs: int) -> None:
        raise ReadOnly("put_environment on a read view")

    def append_events(self, rows: list[tuple[float, int, str | None, str, str | None]]) -> int:
        raise ReadOnly("append_events on a read view")

    def child(self) -> AbstractContextManager[WriteTx]:
        raise ReadOnly("child on a read view")

    def put_op(self, op_id: int, row: list[Any]) -> None:
        raise ReadOnly("put_op on a read view")

    def delete_op(self, op_id: int) -> None:
        raise ReadOnly("delete_op on a read view")

    def put_op_request(self, op_id: int, request: bytes) -> None:
        raise ReadOnly("put_op_request on a read view")

    def note_doomed(self, op_id: int, job_id: int, reason: str) -> None:
        raise ReadOnly("note_doomed on a read view")

    def put_walk(self, op_id: int, band: int, seq: int, walk: list[Any]) -> None:
        raise ReadOnly("put_walk on a read view")

    def take_walk(self, op_id: int) -> list[Any] | None:
        raise ReadOnly("take_walk on a read view")

    def take_doomed(self, op_id: int, limit: int) -> list[tuple[int, str]]:
        raise ReadOnly("take_doomed on a read view")

    def reserve_jobs(self, last: int) -> None:
        raise ReadOnly("reserve_jobs on a read view")


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

    __slots__ = ("_counts", "_owned", "_parent")

    def __init__(
        self,
        txn: lmdb.Transaction[bytes],
        dbs: _Dbs,
        batch: _Batch,
        parent: WriteTx | None = None,
    ) -> None:
        super().__init__(txn, dbs, batch)
        # Count deltas by their key in by_state (per state, per group and state), and per
        # owner (by state, with the owner's running mcpus under ""): a child hands its own to
        # its parent as it commits, and the outer transaction writes them (_flush), so a turn
        # of many requests writes each count once.
        self._counts: dict[bytes, int] = {}
        self._owned: dict[str, dict[str, int]] = {}
        self._parent = parent

    def _flush(self) -> None:
        """Write the count deltas: once per outer transaction."""
        for key, delta in self._counts.items():
            if delta:
                self._count(key, delta)
        self._counts.clear()
        for owner, deltas in self._owned.items():
            key = _text_key(owner)
            raw = self._txn.get(key, db=self._db.owners)
            uid, counts, mcpus = _unpack(raw) if raw is not None else (self._uid(owner), {}, 0)
            for state, delta in deltas.items():
                if state:
                    counts[state] = counts.get(state, 0) + delta
                    if not counts[state]:
                        del counts[state]
                else:
                    mcpus += delta
            self._txn.put(key, self._batch.pack([uid, counts, mcpus]), db=self._db.owners)
        self._owned.clear()

    def _tally(self, keys: dict[str, bytes]) -> dict[str, int]:
        counts = super()._tally(keys)
        tx: WriteTx | None = self
        while tx is not None:  # the deltas not written yet, here and in every ancestor
            pending = tx._counts
            for state, key in keys.items():
                counts[state] += pending.get(key, 0)
            tx = tx._parent
        return counts

    def tally(self, owner: str) -> Tally:
        stored = super().tally(owner)
        counts, mcpus = dict(stored.counts), _mcpus(stored.cpus)
        tx: WriteTx | None = self
        while tx is not None:
            for state, delta in tx._owned.get(owner, {}).items():
                if state:
                    counts[state] = counts.get(state, 0) + delta
                else:
                    mcpus += delta
            tx = tx._parent
        return Tally(owner, {k: n for k, n in counts.items() if n}, mcpus / 1000)

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
            raise
        finally:
            self._batch.mutations += 1  # the parent's tree changed (or was restored)
        try:
            child._commit()
        except lmdb.Error as exc:
            raise self._batch.note(exc) from exc
        counts = self._counts
        for key, delta in child._counts.items():
            counts[key] = counts.get(key, 0) + delta
        for owner, deltas in child._owned.items():
            mine = self._owned.setdefault(owner, {})
            for state, delta in deltas.items():
                mine[state] = mine.get(state, 0) + delta

    def _commit(self) -> None:  # the one place transactions commit, so tests can fail it
        self._txn.commit()

    def _count(self, key: bytes, delta: int) -> None:
        raw = self._txn.get(key, db=self._db.by_state)
        count = (0 if raw is None else _U64.unpack(raw)[0]) + delta
        if count:
            self._txn.put(key, _U64.pack(count), db=self._db.by_state)
        else:
            self._txn.delete(key, db=self._db.by_state)

    def _own(
        self, owner: str, old: tuple[str | None, float], new: tuple[str | None, float]
    ) -> None:
        """Count a job of `owner` going from `old` to `new`, each (state or None, cpus)."""
        deltas = self._owned.get(owner)
        if deltas is None:
            deltas = self._owned[owner] = {}
        mcpus = 0
        for (state, cpus), sign in ((old, -1), (new, 1)):
            if state is not None:
                deltas[state] = deltas.get(state, 0) + sign
                if state in _HOLDING:
                    mcpus += sign * _mcpus(cpus)
        if mcpus:
            deltas[""] = deltas.get("", 0) + mcpus

    def _uid(self, owner: str) -> int:
        """The owner's number, given on first sight."""
        key = _text_key(owner)
        raw = self._txn.get(key, db=self._db.owners)
        if raw is not None:
            return int(_unpack(raw)[0])
        uid = self.next_id("owner")
        self._txn.put(key, self._batch.pack([uid, {}, 0]), db=self._db.owners)
        self._txn.put(_U32.pack(uid), owner.encode(), db=self._db.owner_names)
        return uid

    def _sid(self, cpus: float, memory: int, gpus: int, tags: list[str]) -> int:
        """The shape's number, given on first sight. Tags are a set: order does not matter."""
        key = self._batch.pack([float(cpus), int(memory), int(gpus), sorted(set(tags))])
        raw = self._txn.get(key, db=self._db.shapes)
        if raw is not None:
            return int(_U32.unpack(raw)[0])
        sid = self.next_id("shape")
        self._txn.put(key, _U32.pack(sid), db=self._db.shapes)
        return sid

    def _queue(self, owner: str, request: list[Any]) -> bytes:
        """The eligible-key prefix of the queue for `owner`'s jobs asking for `request`."""
        return _QUEUE.pack(self._uid(owner), self._sid(*request))

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

        old_key = new_key = request = old_request = None
        if old is not None and old[_STATE] == _AVAILABLE and old[_PENDING] == 0:
            old_request = [old[i] for i in (_CPUS, _MEMORY, _GPUS, _TAGS)]
            old_key = self._queue(old[_OWNER], old_request) + _rank(old[_PRIORITY], job.id)
        if job.eligible:
            request = [job.cpus, job.memory, job.gpus, job.tags]
            new_key = self._queue(job.owner, request) + _rank(job.priority, job.id)
        if old_key is not None and old_key != new_key:
            txn.delete(old_key, db=db.eligible)
        if new_key is not None and (old_key != new_key or request != old_request):
            txn.put(new_key, pack(request), db=db.eligible)

        old_state = None if old is None else old[_STATE]
        old_cpus = 0.0 if old is None else old[_CPUS]
        if old_state != job.state or (old_cpus != job.cpus and job.state in _HOLDING):
            self._own(job.owner, (old_state, old_cpus), (job.state, job.cpus))
        old_groups = [] if old is None else old[_GROUPS]
        if old_state != job.state or old_groups != job.groups:
            was = None if old is None else (old[_STATE], old_groups)
            self._restate(job.id, job.owner, was, (job.state, job.groups))
        if old_groups != job.groups:
            for group_id in set(old_groups) - set(job.groups):
                txn.delete(_PAIR.pack(group_id, job.id), db=db.members)
            for group_id in set(job.groups) - set(old_groups):
                txn.put(_PAIR.pack(group_id, job.id), b"", db=db.members)

    def _restate(
        self,
        job_id: int,
        owner: str,
        was: tuple[str, list[int]] | None,
        now: tuple[str, list[int]] | None,
    ) -> None:
        """Move one job's by_state entries and counts from its (state, groups) `was` to `now`
        (None: not stored). The one place they change, but for put_new_jobs' bulk form."""
        txn, db, counts = self._txn, self._db.by_state, self._counts
        for side, delta in ((was, -1), (now, 1)):
            if side is None:
                continue
            state, groups = side
            owned = _owner_prefix(owner, state)
            entries = (_state_key(state, job_id), owned + _U64.pack(job_id))
            for entry in entries:
                if delta > 0:
                    txn.put(entry, b"", db=db)
                else:
                    txn.delete(entry, db=db)
            for key in (_STATE_KEYS[state], *(_group_key(g, state) for g in set(groups))):
                counts[key] = counts.get(key, 0) + delta

    @_writes
    def put_op(self, op_id: int, row: list[Any]) -> None:
        self._txn.put(_U64.pack(op_id), self._batch.pack(row), db=self._db.ops)

    @_writes
    def delete_op(self, op_id: int) -> None:
        """An operation ended: its record and whatever it kept in op_data."""
        self._txn.delete(_U64.pack(op_id), db=self._db.ops)
        self._delete_prefix(self._db.op_data, _U64.pack(op_id))

    @_writes
    def put_op_request(self, op_id: int, request: bytes) -> None:
        self._txn.put(_U64.pack(op_id) + b"r", request, db=self._db.op_data)

    @_writes
    def note_doomed(self, op_id: int, job_id: int, reason: str) -> None:
        """Job `job_id` of submission `op_id` was born doomed: cancel it (take_doomed) once
        the submission's jobs all exist."""
        key = _U64.pack(op_id) + b"d" + _U64.pack(job_id)
        self._txn.put(key, reason.encode(), db=self._db.op_data)

    @_writes
    def put_walk(self, op_id: int, band: int, seq: int, walk: list[Any]) -> None:
        """One walk of the cascade `op_id` (cascade.py), taken in (band, seq) order: a band
        may be negative, to go before every walk kept so far."""
        key = _U64.pack(op_id) + b"w" + _PAIR.pack(band + _BAND_ZERO, seq)
        self._txn.put(key, self._batch.pack(walk), db=self._db.op_data)

    @_writes
    def take_walk(self, op_id: int) -> list[Any] | None:
        """The first walk kept for `op_id`, forgotten as taken; None when there is none."""
        prefix = _U64.pack(op_id) + b"w"
        cursor = self._txn.cursor(self._db.op_data)
        if not cursor.set_range(prefix) or not cursor.key().startswith(prefix):
            return None
        walk = list(_unpack(cursor.value()))
        cursor.delete()
        return walk

    @_writes
    def take_doomed(self, op_id: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` of the jobs noted doomed, lowest id first, each forgotten as taken."""
        prefix = _U64.pack(op_id) + b"d"
        out: list[tuple[int, str]] = []
        cursor = self._txn.cursor(self._db.op_data)
        found = cursor.set_range(prefix)
        while found and len(out) < limit and cursor.key().startswith(prefix):
            out.append((_U64.unpack_from(cursor.key(), 9)[0], cursor.value().decode()))
            found = cursor.delete()
        return out

    @_writes
    def reserve_jobs(self, last: int) -> None:
        """Issue the job ids up to `last` now, their jobs to be stored later (a submission
        made a slice at a time): the next job gets a later id."""
        key = _U64.pack(last)
        kept = self._txn.get(_FLOORS["job"], db=self._db.ids)
        if kept is None or kept < key:
            self._txn.put(_FLOORS["job"], key, db=self._db.ids)

    @_writes
    def put_new_jobs(self, rows: list[list[Any]]) -> None:
        """Jobs not stored yet, as packed rows (`Job.pack()` order) with ascending ids above
        every stored one: put_job without reading anything back, each table in one putmulti."""
        if not rows:
            return
        pack, u64 = self._batch.pack, _U64.pack
        keys = [u64(row[_ID]) for row in rows]
        jobs = [(key, pack(row)) for key, row in zip(keys, rows, strict=True)]
        tally: dict[bytes, int] = {}  # count deltas by key
        where = Counter((row[_OWNER], row[_STATE]) for row in rows)
        for (owner, state), n in where.items():
            count_key = _STATE_KEYS[state]
            tally[count_key] = tally.get(count_key, 0) + n
            deltas = self._owned.setdefault(owner, {})
            deltas[state] = deltas.get(state, 0) + n
        for row in rows:
            if row[_STATE] in _HOLDING:
                held = self._owned.setdefault(row[_OWNER], {})
                held[""] = held.get("", 0) + _mcpus(row[_CPUS])
            for group_id in set(row[_GROUPS]) if row[_GROUPS] else ():
                count_key = _group_key(group_id, row[_STATE])
                tally[count_key] = tally.get(count_key, 0) + 1
        prefix = {state: state.encode() + b"\0" for state in _STATES}
        states = [(prefix[row[_STATE]] + key, b"") for key, row in zip(keys, rows, strict=True)]
        states += [
            (_owner_prefix(row[_OWNER], row[_STATE]) + key, b"")
            for key, row in zip(keys, rows, strict=True)
        ]
        queues: dict[tuple[Any, ...], bytes] = {}  # (owner, cpus, memory, gpus, tags...)
        eligible = []
        for row in rows:
            if row[_STATE] != _AVAILABLE or row[_PENDING]:
                continue
            request = [row[_CPUS], row[_MEMORY], row[_GPUS], row[_TAGS]]
            shape = (row[_OWNER], *request[:3], *request[3])
            queue = queues.get(shape)
            if queue is None:
                queue = queues[shape] = self._queue(row[_OWNER], request)
            eligible.append((queue + _rank(row[_PRIORITY], row[_ID]), pack(request)))
        eligible.sort()  # putmulti into a B-tree is cheapest in key order
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
        txn.cursor(db.by_state).putmulti(states)
        if members:
            txn.cursor(db.members).putmulti(members)
        for count_key, n in tally.items():
            counts[count_key] = counts.get(count_key, 0) + n

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
        old_name: str | None = None if raw is None else _unpack(raw)[1]
        if old_name is not None and old_name != group.name:
            old_key = _text_key(old_name)
            if self._txn.get(old_key, db=names) == key:
                self._txn.delete(old_key, db=names)
        self._txn.put(key, self._batch.pack(group.pack()), db=self._db.groups)
        if old_name != group.name:  # a member's end rewrites its groups: leave names be
            self._txn.put(_text_key(group.name), key, db=names)

    @_writes
    def put_worker(self, worker: Worker) -> None:
        key = _text_key(worker.name)
        self._txn.put(key, self._batch.pack(worker.pack()), db=self._db.workers)
        # Heartbeats rewrite workers all the time: touch the claimers index only on a change.
        claiming = self._txn.get(key, db=self._db.claimers) is not None
        # One that holds jobs ahead stays listed: a match may ask them back (state.py).
        listed = worker.wants > 0 or bool(worker.ahead)
        if listed and not claiming:
            self._txn.put(key, worker.name.encode(), db=self._db.claimers)
        elif not listed and claiming:
            self._txn.delete(key, db=self._db.claimers)

    @_writes
    def delete_worker(self, name: str) -> None:
        key = _text_key(name)
        self._txn.delete(key, db=self._db.workers)
        self._txn.delete(key, db=self._db.claimers)

    @_writes
    def put_submit_key(self, owner: str, key: str, value: Any, time: float) -> None:
        """Remember a submission's result under its key, made at `time` (for retention)."""
        name = _text_key(f"{owner}\0{key}")
        self._txn.put(name, self._batch.pack(value), db=self._db.submit_keys)
        self._txn.put(_TIME.pack(max(0.0, time)) + name, b"", db=self._db.submit_times)

    # ---- deleting, for retention -----------------------------------------------------------

    def _delete_prefix(self, db: Any, prefix: bytes) -> int:
        cursor = self._txn.cursor(db)
        deleted = 0
        found = cursor.set_range(prefix)
        # delete() moves on to the next entry; past the last one the key reads empty.
        while found and cursor.key().startswith(prefix):
            found = cursor.delete()
            deleted += 1
        return deleted

    def _keep_number(self, counter: str, key: bytes) -> None:
        """Before deleting `key` from a numbering table: if it is the last, keep its number."""
        cursor = self._txn.cursor(getattr(self._db, _TABLE_IDS[counter]))
        if cursor.last() and cursor.key() == key:
            kept = self._txn.get(_FLOORS[counter], db=self._db.ids)
            if kept is None or kept < key:
                self._txn.put(_FLOORS[counter], key, db=self._db.ids)

    @_writes
    def delete_job(self, job_id: int) -> Job | None:
        """Delete a job and everything kept about it: its attempts, its entries in every job
        index and count, and the dependency edges to and from it; returns what it was. The one
        place a job is deleted: whatever put_job indexes, this undoes."""
        key = _U64.pack(job_id)
        txn, db = self._txn, self._db
        raw = txn.get(key, db=db.jobs)
        if raw is None:
            return None
        job = Job.unpack(_unpack(raw))
        self._keep_number("job", key)
        txn.delete(key, db=db.jobs)
        if job.eligible:
            request = [job.cpus, job.memory, job.gpus, job.tags]
            txn.delete(
                self._queue(job.owner, request) + _rank(job.priority, job.id), db=db.eligible
            )
        self._restate(job_id, job.owner, (job.state, job.groups), None)
        self._own(job.owner, (job.state, job.cpus), (None, 0.0))
        for group_id in set(job.groups):
            txn.delete(_PAIR.pack(group_id, job_id), db=db.members)
        if job.environ is not None:
            self._let_go_environment(job.environ)
        self._delete_prefix(db.attempts, key)
        self._delete_prefix(db.edges, _TARGETS["job"] + key)  # its dependents'
        for _, target, target_id in job.depends_on:  # its own
            txn.delete(_TARGETS[target] + _PAIR.pack(target_id, job_id), db=db.edges)
        return job

    @_writes
    def delete_group(self, group_id: int) -> None:
        """Delete a group: its record, its name (unless a newer group took it), the edges of
        jobs that depend on it and any member entries left."""
        key = _U64.pack(group_id)
        txn, db = self._txn, self._db
        raw = txn.get(key, db=db.groups)
        if raw is None:
            return
        name = _text_key(_unpack(raw)[1])
        if txn.get(name, db=db.group_names) == key:
            txn.delete(name, db=db.group_names)
        txn.delete(key, db=db.groups)
        self._delete_prefix(db.edges, _TARGETS["group"] + key)
        self._delete_prefix(db.members, key)

    @_writes
    def delete_events_through(self, seq: int) -> int:
        """Delete every event up to and including `seq`; returns how many."""
        cursor = self._txn.cursor(self._db.events)
        last = _U64.pack(seq)
        if cursor.last() and cursor.key() <= last:
            self._keep_number("event", cursor.key())
        deleted = 0
        found = cursor.first()
        while found and b"" < cursor.key() <= last:
            found = cursor.delete()
            deleted += 1
        return deleted

    @_writes
    def expire_submit_keys(self, before: float, limit: int) -> int:
        """Forget up to `limit` submit keys made before `before`; returns how many."""
        cursor = self._txn.cursor(self._db.submit_times)
        deleted = 0
        found = cursor.first()
        while found and deleted < limit:
            stamp = cursor.key()
            if not stamp or _TIME.unpack_from(stamp)[0] >= before:
                break
            self._txn.delete(stamp[_TIME.size :], db=self._db.submit_keys)
            found = cursor.delete()
            deleted += 1
        return deleted

    @_writes
    def append_event(
        self, time: float, job: int, frm: str | None, to: str, reason: str | None
    ) -> int:
        seq = self._top("event") + 1
        row = [seq, time, job, frm, to, reason]  # Event.pack() order
        self._txn.put(_U64.pack(seq), self._batch.pack(row), append=True, db=self._db.events)
        return seq

    @_writes
    def append_events(self, rows: list[tuple[float, int, str | None, str, str | None]]) -> int:
        """Several events, numbered from the returned seq."""
        cursor = self._txn.cursor(self._db.events)
        first = self._top("event") + 1
        pack = self._batch.pack
        items = [(_U64.pack(seq), pack([seq, *row])) for seq, row in enumerate(rows, first)]
        cursor.putmulti(items, append=True)
        return first

    @_writes
    def put_meta(self, key: str, value: Any) -> None:
        self._txn.put(_text_key(key), self._batch.pack(value), db=self._db.meta)

    @_writes
    def put_user(self, user: User) -> None:
        self._txn.put(_text_key(user.name), self._batch.pack(user.pack()), db=self._db.users)

    @_writes
    def put_environment(self, key: str, env: dict[str, str], jobs: int) -> None:
        """Store an environment under its content key, once, for `jobs` more jobs: a
        submitter's many submissions from one shell share it. It is kept while a job names
        it (delete_job lets go of it)."""
        db = self._db.environments
        raw = self._txn.get(key.encode(), db=db)
        uses = jobs if raw is None else _unpack(raw)[0] + jobs
        self._txn.put(key.encode(), self._batch.pack([uses, env]), db=db)

    def _let_go_environment(self, key: str) -> None:
        """One job fewer names the environment `key`: the last one takes it along."""
        db = self._db.environments
        raw = self._txn.get(key.encode(), db=db)
        if raw is None:
            return
        uses, env = _unpack(raw)
        if uses <= 1:
            self._txn.delete(key.encode(), db=db)
        else:
            self._txn.put(key.encode(), self._batch.pack([uses - 1, env]), db=db)


def _to_format_2(tx: WriteTx) -> None:
    """Eligible entries keyed by owner and shape first; owners numbered and their jobs counted,
    owner entries and group counts added, in one pass over every job (a million jobs take a
    few seconds, once); submit keys dated now, so retention keeps them a full period."""
    now = _TIME.pack(time.time())
    for name, _ in tx._scan(tx._db.submit_keys, b""):
        tx._txn.put(now + name, b"", db=tx._db.submit_times)
    tx._txn.drop(tx._db.eligible, delete=False)
    counts = tx._counts
    for key, raw in tx._scan(tx._db.jobs, b""):
        job = Job.unpack(_unpack(raw))
        tx._own(job.owner, (None, 0.0), (job.state, job.cpus))
        tx._txn.put(_owner_prefix(job.owner, job.state) + key, b"", db=tx._db.by_state)
        for group_id in set(job.groups):
            count_key = _group_key(group_id, job.state)
            counts[count_key] = counts.get(count_key, 0) + 1
        if job.eligible:
            request = [job.cpus, job.memory, job.gpus, job.tags]
            entry = tx._queue(job.owner, request) + _rank(job.priority, job.id)
            tx._txn.put(entry, tx._batch.pack(request), db=tx._db.eligible)
    tx.put_meta("format", FORMAT)


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
        private_dir(Path(path), tighten=True)
        # No writemap: LMDB refuses nested (child) transactions with it.
        self._env = lmdb.open(
            str(path),
            mode=0o600,
            map_size=min(map_size, max_map_size),
            subdir=True,
            max_dbs=len(_Dbs.__annotations__) + 2,  # + the old `counts`, for _upgrade
            lock=True,
            sync=sync,
            metasync=sync,
        )
        with self._env.begin() as txn:
            fresh = txn.get(b"jobs") is None  # the main DB names every table
        self._db = _Dbs(self._env)
        self._writing = False
        self._readers = 0  # open read views: the map must not move under them
        if fresh:
            self.write_batch(lambda tx: tx.put_meta("format", FORMAT))
        else:
            self._upgrade()

    def _upgrade(self) -> None:
        """Convert a store written by an older broker to this layout (module docstring)."""
        with self._env.begin(write=True) as txn:
            if txn.get(b"counts") is not None:  # the main DB names every table
                # Per-state counts in a table of their own, job and event numbers in `ids`.
                counts = self._env.open_db(b"counts", txn=txn)
                for key, value in txn.cursor(counts):
                    txn.put(key, value, db=self._db.by_state)
                txn.drop(counts, delete=True)
                for counter in _TABLE_IDS:
                    txn.delete(counter.encode(), db=self._db.ids)
        with self.read() as view:
            version = view.get_meta("format") or 1
        if version < FORMAT:
            self.write_batch(_to_format_2)

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
        batch = _Batch(self._env)
        self._writing = True
        try:
            try:
                tx = WriteTx(txn, self._db, batch)
                yield tx
                if batch.failure is None:
                    tx._flush()
                    tx._commit()
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

    def make_room(self, room: int) -> None:
        """Grow the map now, while no transaction is open, if fewer than `room` bytes are
        left past the pages the file has ever used: a turn that writes that much is then not
        run again from scratch because the map had to grow under it. The map is address
        space, not disk; the file grows only as pages are written."""
        if self._writing or self._readers:
            return
        info = self._env.info()
        need = (info["last_pgno"] + 1) * self._env.stat()["psize"] + room
        size = info["map_size"]
        if need <= size or size >= self.max_map_size:
            return
        while size < need:
            size *= 2
        self._env.set_mapsize(min(size, self.max_map_size))

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
            yield ReadTx(txn, self._db, _Batch(self._env))
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
