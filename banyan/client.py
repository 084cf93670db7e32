"""The Python API every command-line tool is built on.

    from banyan.client import Client
    with Client() as c:
        (job,) = c.submit("python train.py", cpus=4).jobs
        print(c.wait([job]).jobs[0].outcome)

Every call is one request on a DEALER socket to the broker's client port. Refusals raise the
typed errors of `banyan.errors` with the broker's message. A broker that cannot be reached
raises `BrokerUnavailable` at once when the address is wrong or nothing listens there, and
after `timeout` when it does not answer; a refused or missing key raises `KeyRefused` (a
`BrokerUnavailable`) as soon as the handshake fails. Never a hang, with one exception asked
for: `wait` on a client that has reached its broker outlives the broker's outages, however
long (a restart, an upgrade, a kill -9), unless its own `timeout` runs out first.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from banyan import defaults, protocol
from banyan import export as _export
from banyan.config import address, home
from banyan.errors import BrokerUnavailable, Invalid, from_wire
from banyan.link import Credentials, Watch, credentials

# Requests that wait behind a long operation in the broker (its longops.PARKED) or are one
# (a submit of many jobs is made a slice at a time).
PATIENT = frozenset(
    {"status", "wait", "cancel", "modify", "modify_many", "close_group", "stats", "submit"}
)

__all__ = ["BrokerUnavailable", "Client"]


@dataclass(frozen=True)
class Submitted:
    jobs: list[int]
    groups: dict[str, int]


@dataclass(frozen=True)
class JobInfo:
    id: int
    name: str
    state: str
    outcome: str | None
    exit_code: int | None
    attempts: int
    worker: str | None
    progress: float | None
    progress_message: str | None
    owner: str
    reason: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def of(cls, d: dict[str, Any]) -> JobInfo:
        return cls(
            id=d["id"],
            name=d.get("name", ""),
            state=d["state"],
            outcome=d.get("outcome"),
            exit_code=d.get("exit_code"),
            attempts=d.get("attempts", 0),
            worker=d.get("worker"),
            progress=d.get("progress"),
            progress_message=d.get("progress_message"),
            owner=d.get("owner", ""),
            reason=d.get("reason"),
            raw=d,
        )

    @property
    def terminal(self) -> bool:
        return self.state in ("terminated", "cancelled")

    @property
    def succeeded(self) -> bool:
        return self.state == "terminated" and self.outcome == "success"


@dataclass(frozen=True)
class TargetError:
    """A job (or group) named in a request asked `each`, passed over: `code` and `message`
    as an error reply would give them (`not_found`, `forbidden`)."""

    target: int | str
    code: str
    message: str


@dataclass(frozen=True)
class Status:
    jobs: list[JobInfo]
    groups: list[dict[str, Any]]
    truncated: bool  # more match than `jobs` holds
    next: int | None = None  # the cursor of the page after this one (newest first)
    counts: dict[str, int] = field(default_factory=dict)  # every match by state, not the shown
    matched: int | None = None  # all of them (None when jobs were named by id)
    exact: bool = True  # False: counting stopped at the broker's bound; counts are a floor
    errors: list[TargetError] = field(default_factory=list)  # named jobs not shown, and why


@dataclass(frozen=True)
class Waited:
    """What `wait` returns: each job's id, name, owner, state, outcome, exit code, attempts
    and worker (the short rows of the broker's `waited` reply; `job()` has the rest)."""

    jobs: list[JobInfo]
    timed_out: bool

    @property
    def all_succeeded(self) -> bool:
        return all(j.succeeded for j in self.jobs)


@dataclass(frozen=True)
class Cancelled:
    cancelled: list[int]
    pending: list[int]
    already: list[int]
    errors: list[TargetError] = field(default_factory=list)  # targets passed over (`each`)


@dataclass(frozen=True)
class Modified:
    modified: list[int]
    skipped: list[tuple[int, str]]  # (job, why its state did not allow the change)


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    offset: int
    size: int
    live: bool  # the job runs, and this was read from the worker's file now
    eof: bool  # the job has ended and this is the end of its output
    tail: bool = False  # the broker's stored tail (the last 4 KiB), not the worker's file


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    host: str
    state: str
    cpus: float
    memory: int
    gpus: int
    used_cpus: float
    used_memory: int
    used_gpus: int
    tags: list[str]
    running: list[int]
    completed: int
    last_seen: float
    only_account: str | None = None  # a worker not started as root runs this account's jobs only
    refused_accounts: dict[str, str] = field(default_factory=dict)  # account -> why not here
    address: str = ""  # where it registered from, as the broker saw it
    key: str | None = None  # the worker key it registered with; None without keys
    held: bool = False  # drained by an admin: drained across its restarts until resumed
    ahead: list[int] = field(default_factory=list)  # jobs held ahead, waiting for a slot
    prefetch: int | None = None  # how many it may hold ahead; None: the broker's default

    @classmethod
    def of(cls, d: dict[str, Any]) -> WorkerInfo:
        """From a WorkerInfo map; a field an older broker does not send keeps its default."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# Requests that change nothing, so asking twice is harmless.
READS = frozenset({"ping", "status", "workers", "stats", "events", "logs"})

JOB_FIELDS = (
    "name",
    "cwd",
    "env",
    "cpus",
    "memory",
    "gpus",
    "tags",
    "priority",
    "max_attempts",
    "time_limit",
    "cancel_grace",
    "output",
    "depends_on",
    "groups",
    "hold",
    "umask",
)


def seconds(value: float) -> str:
    """A timeout as a person gave it: `10`, `2.5`, `0.3`; never `2.0005`."""
    return f"{round(value, 1):g}" if value >= 1 else f"{value:.2g}"


class Client:
    def __init__(
        self,
        broker: str | None = None,
        home_dir: str | Path | None = None,
        timeout: float = defaults.CLIENT_TIMEOUT,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = address(broker, defaults.CLIENT_PORT)
        self.home = home(home_dir)
        self.timeout = timeout
        self.ctx = ctx or zmq.Context.instance()
        self._reqs = itertools.count(1)
        # Whether this client has ever talked with its broker: a wait then takes the broker's
        # absence for an outage to outlive, not for a wrong address.
        self.reached = False
        self.sock, self.watch = self._socket()

    def _socket(self) -> tuple[zmq.Socket[Any], Watch]:
        # This machine's client key and the broker's public key, when keys are set up. Read
        # at every (re)connect: a broker starting for the first time makes them.
        creds: Credentials = credentials(self.home, "client")
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if creds.curve is not None:
            creds.curve.apply(sock)
        watch = Watch(sock, self.endpoint, creds)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            watch.close()
            sock.close(linger=0)
            raise BrokerUnavailable(f"cannot connect to {self.endpoint}: {e}") from None
        return sock, watch

    def _reset(self) -> None:
        """A fresh connection: nothing queued on the old one can be mistaken for a reply."""
        self.close()
        self.sock, self.watch = self._socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)

    # ---- transport --------------------------------------------------------------------------

    def _send(self, kind: str, body: dict[str, Any], flags: int = 0) -> int:
        req = next(self._reqs)
        try:
            frame = protocol.encode(kind, body, req, allowed=protocol.CLIENT_REQUESTS)
        except protocol.ProtocolError as e:
            raise Invalid(e.reason) from None
        self.sock.send(frame, flags)
        return req

    def _begin(self) -> None:
        """Before a call: what the connection's monitor said about a broker that was not
        there is history (it may be back by now; only what the monitor says from now on
        counts), while a key or port problem stands."""
        trouble = self.watch.read()
        self.reached = self.reached or self.watch.handshakes > 0
        if trouble is not None and type(trouble) is not BrokerUnavailable:
            self._reset()
            raise trouble

    def _next(self, wait: float, keep: bool = False) -> protocol.Message | None:
        """The next reply within `wait` s, or None. A connection problem the socket's monitor
        reports (a refused key, nothing listening) raises at once, on a fresh socket; with
        `keep`, a broker that is not there (as opposed to a key or port problem) raises on
        the same socket, which goes on trying to connect."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        ready = dict(poller.poll(max(1, math.ceil(wait * 1000))))
        if self.watch.monitor in ready:
            trouble = self.watch.read()
            self.reached = self.reached or self.watch.handshakes > 0
            if trouble is not None:
                if not (keep and type(trouble) is BrokerUnavailable):
                    self._reset()
                raise trouble
        if self.sock in ready:
            self.reached = True
            return protocol.decode(self.sock.recv(), protocol.CLIENT_REPLIES)
        return None

    def request(self, kind: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """Send one request and return the reply body; `timeout=None` uses the client's.

        A read is asked again when the connection is made anew (the broker restarted while
        it was on its way); a change is not, as the broker may have made it already. A request
        the broker may hold back behind a long operation (PATIENT) is waited for as long as
        the broker answers pings meanwhile."""
        if kind in PATIENT and timeout is None:
            return self._patiently(kind, body)
        self._begin()
        req = self._send(kind, body)
        on = max(1, self.watch.handshakes)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            msg = self._next(left) if left > 0 else None
            if self.watch.handshakes > on and kind in READS:
                req, on = self._send(kind, body), self.watch.handshakes
            if msg is None and time.monotonic() >= deadline:
                # The request may still be queued in the socket: start afresh so a late
                # reply cannot be mistaken for the next request's.
                silent = self._no_answer(limit)
                self._reset()
                raise silent
            if msg is None or msg.req != req:
                continue  # nothing yet, or a reply to an abandoned request
            if msg.type == "error":
                raise from_wire(msg.body["code"], msg.body["message"])
            return msg.body

    def _no_answer(self, limit: float) -> BrokerUnavailable:
        """The one way every call says that the broker did not answer in time, with what the
        connection got that far (before it is made anew)."""
        self.watch.read()  # the last word on how far it got; a problem would have come sooner
        if not self.watch.reached:
            why = (
                "no connection could be made: is that machine up, does every firewall on the "
                "way let it through, and is the address in BANYAN_BROKER or --broker right?"
            )
        elif not self.watch.handshakes:
            why = "it took the connection but never answered: is banyan-broker stopped there?"
        elif self.watch.closed:
            why = (
                "its connection closed: banyan-broker stopped or restarted there (see its "
                "log), and is not back"
            )
        else:
            why = "it is connected: is banyan-broker stopped or overloaded? see its log"
        return BrokerUnavailable(
            f"no answer from the broker at {self.endpoint} within {seconds(limit)} s ({why})"
        )

    # ---- the API ----------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return dict(self.request("ping", {}))

    def submit(
        self,
        command: str | None = None,
        *,
        jobs: list[dict[str, Any]] | None = None,
        groups: list[dict[str, Any]] | None = None,
        submit_key: str | None = None,
        array: str | None = None,
        each: Sequence[str] | None = None,
        export: str | Sequence[str] | None = "ALL",
        **fields: Any,
    ) -> Submitted:
        """One job (`command` plus JobSpec fields), or a whole workflow (`jobs`, `groups`).

        With `array` (`1-100`, `0-99:2`, `3,5,8-9`) the one job is a template: the broker
        makes one job per index, `{}` in its command, name and output replaced by the index,
        which is also in $BANYAN_ARRAY_INDEX. With `each` (lines, as `banyan-submit --each`)
        it makes one job per line, `{}` replaced by the line, or without `{}` in the command
        the line appended to it as one quoted argument. The broker makes a big submission a
        slice at a time; the reply comes once every job exists, and the client waits for it as
        long as the broker answers meanwhile.

        Like `sbatch`, every job gets this process's environment (`export="ALL"`), less the
        daemons' variables; `"NONE"` (or None) gives the account's clean login environment,
        `"VAR,VAR=value"` only those (banyan/export.py). It travels once per request and
        counts against its size (MAX_ENVIRONMENT_BYTES). A variable that is not UTF-8 is left
        out of `"ALL"`; one named, or one past the limits, raises ValueError naming it."""
        if command is not None:
            unknown = set(fields) - set(JOB_FIELDS)
            if unknown:
                raise TypeError(f"unknown job field(s): {', '.join(sorted(unknown))}")
            jobs = [{"command": command, **fields}, *(jobs or [])]
        body: dict[str, Any] = {
            "jobs": jobs or [],
            "groups": groups or [],
            "submit_key": submit_key,
        }
        if array is not None:
            body["array"] = array
        if each is not None:
            body["each"] = list(each)
        environment = _export.capture(export)
        if environment is not None:
            body["environment"] = environment
        reply = self.request("submit", body)
        return Submitted(list(reply["jobs"]), dict(reply["groups"]))

    def cancel(
        self,
        jobs: Sequence[int] = (),
        groups: Sequence[str | int] = (),
        reason: str | None = None,
        select: dict[str, Any] | None = None,
        each: bool = False,
    ) -> Cancelled:
        """Cancel jobs by id and groups by name or id (each must exist and be yours), and the
        unfinished jobs `select` matches (see `Client.select`). With `each`, a named job or
        group that is missing or not yours is listed in `errors` and the rest are cancelled;
        without, it refuses the whole request. Many jobs take the broker a while: the reply
        comes when all are done, and the client waits for it as long as the broker answers
        meanwhile."""
        body = {"jobs": list(jobs), "groups": list(groups), "reason": reason, "select": select}
        if each:
            body["each"] = True
        reply = self.request("cancel", body)
        errors = _errors(reply)
        return Cancelled(reply["cancelled"], reply["pending"], reply["already"], errors)

    @staticmethod
    def select(
        ids: Sequence[tuple[int, int]] = (),
        owner: str | None = None,
        state: str | None = None,
        name: str | None = None,
        group: str | int | None = None,
    ) -> dict[str, Any]:
        """A selector for `cancel` and `modify_many`: the jobs every given criterion holds
        for. `ids` are inclusive ranges; `name` is a glob over the name shown (the command when
        there is none). A user's selector means only their own jobs."""
        ranges = [list(r) for r in ids]
        return {"ids": ranges, "owner": owner, "state": state, "name": name, "group": group}

    def modify_many(
        self,
        jobs: Sequence[int] = (),
        select: dict[str, Any] | None = None,
        hold: bool = False,
        release: bool = False,
        **changes: Any,
    ) -> Modified:
        """Change many jobs in one request: the named ones (each must exist and be yours) and
        those `select` matches (by default those still held or queued). A job whose state does
        not allow the change is skipped, with the reason; all the rest change together."""
        body: dict[str, Any] = {"jobs": list(jobs), "select": select, "set": changes}
        body |= {"hold": hold, "release": release}
        reply = self.request("modify_many", body)
        return Modified(reply["modified"], [(j, why) for j, why in reply["skipped"]])

    def modify(
        self, job: int, hold: bool = False, release: bool = False, **changes: Any
    ) -> JobInfo:
        reply = self.request(
            "modify", {"job": job, "set": changes, "hold": hold, "release": release}
        )
        return JobInfo.of(reply["job"])

    def hold(self, job: int) -> JobInfo:
        return self.modify(job, hold=True)

    def release(self, job: int) -> JobInfo:
        return self.modify(job, release=True)

    def close_group(self, group: str | int) -> dict[str, Any]:
        return dict(self.request("close_group", {"group": group})["group"])

    def status(
        self,
        jobs: Sequence[int] = (),
        group: str | int | None = None,
        state: str | None = None,
        owner: str | None = None,
        all: bool = False,
        detail: bool = False,
        limit: int | None = None,
        name: str | None = None,
        since: float | None = None,
        until: float | None = None,
        cursor: int | None = None,
        each: bool = False,
    ) -> Status:
        """The named jobs, in that order; or without `jobs`, the newest `limit` (default
        1,000) jobs that match: active ones, or with `all` every one, or those in `state`,
        `owner`'s, in `group`, named like the glob `name`, submitted in [since, until) (Unix
        times), below `cursor` (a previous page's `next`). The broker answers a page at a
        time; this asks for as many pages as `limit` takes. A named job that does not exist
        refuses the request, or with `each` is listed in `errors` with why."""
        body: dict[str, Any] = {"group": group, "state": state, "owner": owner, "all": all}
        body |= {"detail": detail, "name": name, "since": since, "until": until}
        want = limit or defaults.STATUS_LIMIT
        page = defaults.STATUS_PAGE
        if jobs:
            ids = list(jobs)[:want]
            rows, errors = [], []
            if each:
                body["each"] = True
            for i in range(0, len(ids), page):
                reply = self.request("status", body | {"jobs": ids[i : i + page]})
                rows += reply["jobs"]
                errors += _errors(reply)
            return Status([JobInfo.of(j) for j in rows], [], len(jobs) > want, errors=errors)
        rows, first = [], None
        while True:
            reply = self.request(
                "status", body | {"limit": min(page, want - len(rows))} | {"cursor": cursor}
            )
            first = first or reply
            rows += reply["jobs"]
            cursor = reply.get("next")
            if cursor is None or len(rows) >= want:
                break
        counts, matched = dict(first.get("counts") or {}), first.get("matched")
        exact = bool(first.get("exact", True))
        if not exact:  # a floor, counted on the first page: the later pages' rows count too
            for state, n in Counter(j["state"] for j in rows).items():
                counts[state] = max(counts.get(state, 0), n)
            matched = None if matched is None else sum(counts.values())
        infos = [JobInfo.of(j) for j in rows]
        return Status(infos, first["groups"], cursor is not None, cursor, counts, matched, exact)

    def job(self, job: int) -> JobInfo:
        """One job in full detail (attempt history, output tail, usage)."""
        return self.status([job], detail=True).jobs[0]

    def wait(
        self,
        jobs: Sequence[int] = (),
        groups: Sequence[str | int] = (),
        timeout: float | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> Waited:
        """Block until the jobs end; the broker answers when they do. `timeout` (seconds)
        bounds the whole wait: the broker then answers with `timed_out`, or, when it cannot
        be reached at that moment, `BrokerUnavailable` is raised.

        The wait outlives the broker: while it waits, the client pings the broker every
        `self.timeout` seconds, and when the broker stops answering (a restart, an upgrade, a
        kill -9, a network cut) it keeps trying to reach it, for as long as it takes, and asks
        again on the new connection. `notice`, if given, is called with a sentence when the
        broker becomes unreachable and when it answers again. What ends a wait at once is what
        no waiting mends: a key the broker refuses (`KeyRefused`) or a wrong port
        (`WrongPort`), and, on a client that has never reached its broker, an address where
        no broker is (`BrokerUnavailable`, as for every other call).
        """
        body = {"jobs": list(jobs), "groups": list(groups)}
        reply = self._patiently("wait", body, timeout, notice)
        return Waited([JobInfo.of(j) for j in reply["jobs"]], reply["timed_out"])

    def _patiently(
        self,
        kind: str,
        body: dict[str, Any],
        limit: float | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> Any:
        """Send a request whose answer may take long (a wait, or a request that waits behind
        a long operation in the broker), and wait for it (at most `limit` s plus the client's
        timeout, if given) while pings show the broker is alive. When the connection is made
        anew (the broker restarted), a wait or a read is asked again, a wait for the time
        that is left; a change is not, as the broker may have made it already. A wait, once
        this client has reached the broker, outlives the broker's absence (see `wait`)."""
        self._begin()
        end = None if limit is None else time.monotonic() + limit
        away: str | None = None  # why the broker cannot be reached, while a wait outlives it

        def ask() -> tuple[int, int]:
            sent = body
            if kind == "wait":
                sent = {
                    **body,
                    "timeout": None if end is None else max(0.0, end - time.monotonic()),
                }
            # Sent before any handshake, it travels on the first connection.
            return self._send(kind, sent), max(1, self.watch.handshakes)

        def gone(why: str) -> None:
            nonlocal away
            if away is None and notice is not None:
                notice(
                    f"the broker at {self.endpoint} is unreachable ({why}); still waiting "
                    "for it to come back (the jobs go on meanwhile)"
                )
            away = away or why

        req, on = ask()
        ping_req, ping_sent = 0, 0.0
        renewed: float | None = None  # when the connection was made anew under a change
        while True:
            now = time.monotonic()
            outlive = kind == "wait" and self.reached
            if renewed is not None and now - renewed > self.timeout:
                # The broker restarted with the change on its way: a new broker answers pings
                # but never this request, which it may or may not have carried out.
                self._reset()
                raise BrokerUnavailable(
                    f"the broker at {self.endpoint} restarted while the {kind} was on its way "
                    "and did not answer it: it may or may not have been carried out (look with "
                    "banyan-status; a submission with a submit key can be sent again safely)"
                )
            if end is not None and now > end + (0.0 if away else self.timeout):
                silent = self._no_answer(self.timeout)
                self._reset()
                if away is None:
                    raise silent
                raise BrokerUnavailable(
                    f"the broker at {self.endpoint} was still unreachable when the wait's "
                    f"{seconds(limit or 0.0)} s ran out ({away})"
                )
            if ping_req and now - ping_sent > self.timeout:
                if not outlive:
                    silent = self._no_answer(self.timeout)
                    self._reset()
                    raise silent
                gone(f"no answer within {seconds(self.timeout)} s")
                # A fresh connection finds the broker wherever and whenever it is back (an old
                # one may lead to a broker that is stopped, or cut off); the wait goes with it.
                self._reset()
                (req, on), ping_req = ask(), 0
                continue
            try:
                msg = self._next(self.timeout / 2, keep=outlive)
            except BrokerUnavailable as e:
                if not outlive or type(e) is not BrokerUnavailable:
                    raise
                gone(str(e))
                msg = None
            if self.watch.handshakes > on and (kind == "wait" or kind in READS):
                req, on = ask()
                ping_req = 0
            elif self.watch.handshakes > on and renewed is None:
                renewed = now  # its reply may still come, if it went on the new connection
            if msg is not None and away is not None:
                away = None
                if notice is not None:
                    notice(f"the broker at {self.endpoint} answers again; still waiting")
            if msg is None:
                if not ping_req:
                    # Not blocking: with no broker connected a DEALER's send may wait for one;
                    # an unsent ping is just never answered.
                    with contextlib.suppress(zmq.Again):
                        ping_req, ping_sent = self._send("ping", {}, zmq.NOBLOCK), now
                continue
            if msg.req == ping_req:
                ping_req = 0
            elif msg.req == req:
                if msg.type == "error":
                    raise from_wire(msg.body["code"], msg.body["message"])
                return msg.body

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo.of(w) for w in self.request("workers", {})["workers"]]

    def drain(self, worker: str, resume: bool = False) -> list[WorkerInfo]:
        reply = self.request("drain", {"worker": worker, "resume": resume})
        return [WorkerInfo.of(w) for w in reply["workers"]]

    def forget(self, worker: str) -> list[WorkerInfo]:
        """Remove a lost or stopped worker from the list (admins only)."""
        reply = self.request("forget", {"worker": worker})
        return [WorkerInfo.of(w) for w in reply["workers"]]

    def stats(self) -> dict[str, Any]:
        return dict(self.request("stats", {}))

    def users(self) -> list[dict[str, Any]]:
        """Each user's shares, limits, running and queued jobs, usage and fair-share factor."""
        return list(self.request("users", {})["users"])

    def set_user(self, name: str, **settings: Any) -> dict[str, Any]:
        """Set `shares`, `max_running` or `max_queued` (None lifts a limit); admins only.
        Returns the user's row."""
        (row,) = self.request("set_user", {"name": name, "set": settings})["users"]
        return dict(row)

    def logs(
        self, job: int, stream: str = "stdout", offset: int = 0, limit: int = 1 << 20
    ) -> LogChunk:
        """Bytes of a job's output from `offset`: from its worker's file while it has it,
        else the stored tail."""
        reply = self.request(
            "logs", {"job": job, "stream": stream, "offset": offset, "limit": limit}
        )
        return LogChunk(
            reply["data"],
            reply["offset"],
            reply["size"],
            reply["live"],
            reply["eof"],
            reply["tail"],
        )

    def events(
        self, since: int = 1, limit: int = 1000, wait: float | None = None
    ) -> tuple[list[list[Any]], int]:
        """Up to `limit` events `[seq, time, job, from, to, reason]` from sequence number
        `since`, and the `since` of the next read. With `wait` (at most EVENTS_WAIT_MAX s),
        a read that finds none yet is answered when the next one is recorded, or empty once
        `wait` is over: follow the log with one request outstanding and no polling."""
        body: dict[str, Any] = {"since": since, "limit": limit}
        timeout = None
        if wait:
            body["wait"] = wait
            timeout = wait + self.timeout
        reply = self.request("events", body, timeout)
        return reply["events"], reply["next"]

    def events_head(self) -> int:
        """The sequence number the next event will get: `events(since=events_head())` taken
        before a change shows that change and everything after it, and nothing older.

        The log is dense and ordered, so a galloping then binary search over one-event reads
        finds its end in about 2·log2(length) small requests.
        """

        def beyond_end(seq: int) -> bool:
            return not self.events(since=seq, limit=1)[0]

        hi = 1
        while not beyond_end(hi):
            hi *= 2
        lo = hi // 2  # lo == 0, or an event exists at or after lo
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if beyond_end(mid):
                hi = mid
            else:
                lo = mid
        return hi


def _errors(reply: dict[str, Any]) -> list[TargetError]:
    return [TargetError(target, code, message) for target, code, message in reply.get("errors", ())]
