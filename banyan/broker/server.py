"""The broker's shell: recv → decode → state machine → one commit → send.

One process, one poll loop, two ROUTER sockets. Each turn drains what is waiting on both
sockets, applies every message to the state machine inside one LMDB write transaction (each
message in its own child transaction, so a refused one leaves nothing behind), commits once,
and only then sends replies, assignments and cancels. Nothing is acknowledged before it is
durable (SPEC §7).

Two clocks: `clock`, monotonic, times every interval (liveness, heartbeats, wait and fetch
deadlines), so a step of the wall clock expires nobody and silences nothing; `wall` dates what
people read (records, events, "last seen").
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from banyan import defaults, protocol
from banyan.broker import follow, longops, owners, queries, retention, statelock
from banyan.broker.auth import ZapHandler
from banyan.broker.state import Actor, Config, Core, Effect, Logged
from banyan.broker.store import ReadTx, Store, StoreFull, WriteTx
from banyan.config import home
from banyan.errors import BanyanError, Busy, NoSpace, NotFound
from banyan.keys import Authorizer, ensure_local, own_account, parse_user_id, private_dir

log = logging.getLogger("banyan.broker")
T = TypeVar("T")

# Messages taken from one socket per turn: enough to batch commits, few enough that a flood
# on one socket cannot starve heartbeats on the other.
BATCH = 512
# A turn stops taking client requests once it has worked this long; the rest wait for the
# next turn, after heartbeats have gone out. 512 big submissions (or waits on many jobs) in one
# transaction held the loop for seconds, and workers took the broker for dead.
TURN_BUDGET = 0.1
# Client requests taken from the socket at a time while the budget lasts: the budget is
# checked between them, and the drain's own cost is shared.
PULL = 16
# pyzmq's flags as plain ints, and recv/send one frame at a time: its recv_multipart and
# send_multipart, and the enum conversions on each call, cost 8-14 µs of a 80 µs request.
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# Submits of up to this many jobs may share a child transaction and a Core.submit with their
# neighbours: the per-request cost (child transaction, index writes, events) is paid once.
MERGE_JOBS = 16
# The heartbeat of a worker that runs nothing, byte for byte (msgpack encodes it one way).
IDLE = protocol.encode("heartbeat", {"running": []})
# Per client connection: requests queued here before TCP holds the sender back, and replies
# queued for a client that does not read them. A client more than SLOW_CONSUMER replies behind
# is a slow consumer, and further replies to it are dropped (its requests time out) rather
# than kept in the broker's memory. The send limit is twice that: ZeroMQ's pipe learns what
# its reader took only every half-limit messages, so it refuses anywhere from half its limit.
SLOW_CONSUMER = 1000
CLIENT_HWM = (64, 2 * SLOW_CONSUMER)
# A worker that does not send the output it was asked for within this time is answered for.
LOG_FETCH_TIMEOUT = 2.0
# Jobs one user may wait on at once, over all its pending waits: two of the biggest
# submission. Each costs a few hundred bytes and a look when it ends.
MAX_WAITED_PER_USER = 2 * defaults.MAX_JOBS_PER_SUBMIT


@dataclass(frozen=True)
class BrokerConfig:
    state_dir: str
    bind: str = defaults.BROKER_HOST
    client_port: int = defaults.CLIENT_PORT
    worker_port: int = defaults.WORKER_PORT
    core: Config = field(default_factory=Config)
    sync: bool = True
    home: Path | None = None  # where keys live; None: $BANYAN_HOME
    secure: bool = True  # CurveZMQ on both sockets; False only with --insecure


@dataclass
class Session:
    """A worker's live connection: volatile, rebuilt from re-registration after a restart."""

    identity: bytes | None
    last_seen: float  # on the monotonic clock
    key: str | None = None  # the authenticated worker key that registered this name
    instance: str = ""  # the worker process's own id: its reconnections may take over
    host: str = ""
    pid: int = 0
    address: str = ""  # the peer's address, as ZeroMQ saw the connection

    def who(self) -> str:
        """`HOST at ADDRESS (pid P, key K)`: for the log, where host names may repeat."""
        return _who(self.host, self.address, self.pid, self.key)


@dataclass(eq=False)
class Waiter:
    identity: bytes
    req: int
    jobs: set[int]
    all_jobs: list[int]
    deadline: float | None
    owner: str = ""  # who asked: what each user waits on is bounded (MAX_WAITED_PER_USER)


@dataclass
class Turn:
    """What one poll turn decided; sent only after its commit."""

    replies: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # socket, peer, bytes
    effects: list[Effect] = field(default_factory=list)
    events: list[Logged] = field(default_factory=list)
    waiters: list[Waiter] = field(default_factory=list)
    followers: list[follow.Follower] = field(default_factory=list)  # events reads that wait
    fetches: list[LogFetch] = field(default_factory=list)
    deferred: list[Inbound] = field(default_factory=list)  # client requests left for later
    # Workers whose sessions end once this turn is durable (lost, stopped): log level, line.
    gone: dict[str, tuple[int, str]] = field(default_factory=dict)
    # Small submits of one owner in a row, run as one (see Broker._run_submits).
    submits: list[tuple[bytes, protocol.Message]] = field(default_factory=list)
    submitter: Actor | None = None
    ops: longops.Staged = field(default_factory=longops.Staged)  # long operations
    environment: dict[str, str] | None = None  # the merged submits' exported environment

    def merge(self, other: Turn) -> None:
        self.replies += other.replies
        self.effects += other.effects
        self.events += other.events
        self.waiters += other.waiters
        self.followers += other.followers
        self.fetches += other.fetches
        self.deferred += other.deferred
        self.gone.update(other.gone)


@dataclass
class LogFetch:
    """A client's `logs` request, forwarded to the worker that has the file."""

    identity: bytes
    req: int
    worker: str
    body: dict[str, Any]  # the fetch_log body
    fallback: dict[str, Any]  # the reply if the worker cannot answer: the stored tail
    deadline: float = 0.0


Inbound = tuple[str, list[bytes], str | None]  # socket, frames, authenticated user


class Broker:
    def __init__(
        self,
        config: BrokerConfig,
        ctx: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        actor: Actor | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if config.core.account is None:  # what this process runs as, for its workers to know
            config = replace(config, core=replace(config.core, account=own_account()))
        self.config = config
        self.clock = clock
        self.wall = wall
        # The monotonic time of the turn being handled, for the intervals it starts.
        self.mono = clock()
        # A context of its own: the ZAP endpoint is per context, and tests run several brokers.
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        # A first start makes its state directory (and $BANYAN_HOME), private to this account.
        private_dir(Path(config.state_dir))
        self.state_lock = statelock.take(Path(config.state_dir))
        try:
            self.store = Store(config.state_dir, sync=config.sync)
        except BaseException:
            os.close(self.state_lock)
            raise
        # Without keys every peer is the local administrator (loopback or --insecure only),
        # and its jobs run as the broker's own account.
        self.actor = actor or Actor("local", "admin", own_account())
        self._actors: dict[str, Actor] = {}
        self.poller = zmq.Poller()
        self.zap: ZapHandler | None = None
        self.curve: tuple[bytes, bytes] | None = None
        if config.secure:
            home_dir = home(config.home)
            self.curve = ensure_local(home_dir)
            self.zap = ZapHandler(self.ctx, Authorizer(home_dir))
            self.poller.register(self.zap.sock, zmq.POLLIN)
        self.client = self._bind(config.client_port, b"client")
        self.worker = self._bind(config.worker_port, b"worker")
        self.client_port = _port(self.client)
        self.worker_port = _port(self.worker)
        self.poller.register(self.client, zmq.POLLIN)
        self.poller.register(self.worker, zmq.POLLIN)
        # Connections the kernel would not let it take (no descriptors left): said in the log,
        # since the peers only see a connection that never answers.
        self.refusing = {
            sock.get_monitor_socket(zmq.EVENT_ACCEPT_FAILED): name
            for sock, name in ((self.client, "client"), (self.worker, "worker"))
        }
        for monitor in self.refusing:
            self.poller.register(monitor, zmq.POLLIN)
        self._refusing_told = -math.inf
        self.sessions: dict[str, Session] = {}
        self.names: dict[bytes, str] = {}  # routing id -> name, for live sessions only
        # The peer address of each worker connection without a session that sent something
        # this step (a registration comes from one): read once, forgotten when the step ends.
        self.addresses: dict[bytes, str] = {}
        self.waiters: dict[int, list[Waiter]] = {}
        self.waited: collections.Counter[str] = collections.Counter()  # jobs waited on, by user
        # Waits with a timeout, soonest first: a step looks only at those that are due, not at
        # every job anyone waits for (one `wait` on 100k jobs made each step cost 0.15 s).
        self.deadlines: list[tuple[float, int, Waiter]] = []
        self._deadline_seq = itertools.count()
        self.fetches: dict[int, LogFetch] = {}
        self.followers = follow.Followers()
        self.backlog: list[Inbound] = []  # client requests a turn left for the next
        self.longops = longops.LongOps()
        self.next_fetch = 1
        self.refused = 0  # malformed or undeliverable messages, dropped or answered
        self.declined = 0  # well-formed requests answered with a refusal (not found, forbidden)
        self._reported = 0
        self.stopping = False
        self.hangups = 0  # SIGHUPs the loop has not logged yet (set by banyan-broker's handler)
        self.next_heartbeat = 0.0
        self.next_expiry = 0.0
        self.next_purge = 0.0  # on the monotonic clock
        self.next_save = self.clock() + self._window()  # of when workers were last heard from
        self._purged_at = 0.0  # when the last purge slice ended, on the monotonic clock
        self.purged = retention.Purged()  # this pass so far, for the log
        self._recover()

    def _bind(self, port: int, domain: bytes) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.curve
            sock.zap_domain = domain
        sock.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE_BYTES)
        # Workers never lose a message to a queue limit. Clients are bounded both ways, so the
        # broker's memory is too however hard they flood it (see CLIENT_HWM).
        client = domain == b"client"
        sock.setsockopt(zmq.RCVHWM, CLIENT_HWM[0] if client else 0)
        sock.setsockopt(zmq.SNDHWM, CLIENT_HWM[1] if client else 0)
        if port:
            sock.bind(f"tcp://{self.config.bind}:{port}")
        else:
            sock.bind_to_random_port(f"tcp://{self.config.bind}")
        return sock

    def _recover(self) -> None:
        """After a start or restart, every worker that was connected gets one liveness window
        to re-register with the attempts it holds; claims from before are void."""
        now = self.clock()

        def reset(tx: WriteTx) -> list[str]:
            names = []
            for worker in list(tx.workers()):
                if worker.wants:
                    worker.wants = 0
                    tx.put_worker(worker)
                if not worker.gone:
                    names.append(worker.name)
            return names

        for name in self.store.write_batch(reset):
            self.sessions[name] = Session(None, now)
        with self.store.read() as view:
            self.longops.recover(view)
        log.info(
            "state loaded from %s; %d workers expected back",
            self.config.state_dir,
            len(self.sessions),
        )

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        log.info(
            "listening: clients on %s:%d, workers on %s:%d",
            self.config.bind,
            self.client_port,
            self.config.bind,
            self.worker_port,
        )
        while not self.stopping:
            self.step(timeout=self._poll_timeout())
            if self.hangups:
                log.info("SIGHUP ignored: the broker goes on (SIGTERM stops it)")
                self.hangups = 0
        self.close()

    def _poll_timeout(self) -> float:
        if self.backlog or self.longops.ready(self.clock()):
            return 0.0
        purge = self.next_purge if self.config.core.retention is not None else math.inf
        reads = self.followers.next_deadline()
        wait = min(self.next_heartbeat, purge, math.inf if reads is None else reads) - self.clock()
        return max(0.0, min(wait, self.config.core.heartbeat))

    def step(self, timeout: float = 0.0) -> None:
        """One turn: wait up to `timeout` s for input, handle it all, commit once, send."""
        ready = dict(self.poller.poll(math.ceil(timeout * 1000)))  # never a 0 ms spin
        if self.zap is not None and self.zap.sock in ready:
            self.zap.handle()
        for monitor in self.refusing:
            if monitor in ready:
                self._accept_failed(monitor)
        # Workers' messages are all taken at once and never deferred; clients' are taken one by
        # one while the turn's budget lasts (see TURN_BUDGET), after any the last turn left.
        inbox: list[Inbound] = []
        if self.worker in ready:
            taken = _drain(self.worker, self.curve, peers=(self.names, self.addresses))
            inbox += [("worker", frames, user) for frames, user in taken]
        inbox += self.backlog
        self.backlog = []
        pull = self.client in ready
        mono = self.mono = self.clock()
        # An idle worker's heartbeat changes nothing but its liveness: it skips the transaction.
        inbox = [
            m
            for m in inbox
            if not (m[0] == "worker" and m[1] and self._touch(m[1][0], mono) and m[1][-1] == IDLE)
        ]
        lost = self._expired(mono)
        # A wait that times out while the cascade runs is answered once it has ended: its
        # jobs' states are then all or nothing of the cascade, as a status's are.
        due = [] if self.longops.cascading() else self._due_waiters(mono)
        if inbox or lost or due or pull:
            self._turn(inbox, lost, due, self.wall(), pull)
        self.addresses.clear()
        if self.longops.ready(mono):
            # A transaction of its own, after the messages' turn has answered them: a request
            # that came in meanwhile waits for one slice, not for a slice and a turn.
            self._turn([], [], [], self.wall(), False, slices=True)
        self._expire_fetches(mono)
        for identity, payload in self.followers.due(mono):
            _send(self.client, identity, payload)
        if mono >= self.next_heartbeat:
            self._heartbeat(mono)
            self._report_refusals()
        if self.config.core.retention is not None and mono >= self.next_purge:
            self._purge(mono, self.config.core.retention)
        if mono >= self.next_save:
            self._save_seen()
            self.next_save = mono + self._window()

    def _save_seen(self) -> None:
        """Store when each connected worker was last heard from: once a liveness window (so a
        broker killed outright is at most that far behind) and at a stop. A restarted broker
        shows these times for the workers it waits for, not its own start."""
        seen = self._last_seen()
        if not seen:
            return
        try:
            self.store.write_batch(lambda tx: Core(tx, self.wall(), self.config.core).heard(seen))
        except StoreFull as e:
            log.debug("could not store when workers were last heard from: %s", e)

    def _purge(self, mono: float, keep: float) -> None:
        """One slice of retention (retention.py): a transaction of its own, PURGE_SLICE long,
        or PURGE_SHARE of the time since the last slice while it is behind; the next one at
        once while there is more, else once the oldest event kept comes of age. What is old
        is judged on the wall clock (the records' times); when to look again, on `mono`."""
        if self.longops.submitting():
            self.next_purge = mono + defaults.PURGE_REST  # what it depends on stays meanwhile
            return
        start = time.monotonic()
        budget = defaults.PURGE_SLICE
        if self.purged.jobs or self.purged.events:  # this pass has gone on a while: behind
            share = defaults.PURGE_SHARE * (start - self._purged_at)
            budget = min(max(budget, share), defaults.PURGE_SLICE_MAX)
        stop = start + budget
        wall = self.wall()
        try:
            done = self.store.write_batch(
                lambda tx: retention.purge(tx, wall - keep, lambda: time.monotonic() < stop)
            )
        except StoreFull as e:
            log.warning("store full; purging old jobs again in a minute: %s", e)
            self.next_purge = mono + 60
            return
        finally:
            self._purged_at = time.monotonic()
        log.debug("purged %d jobs and %d events in a slice", done.jobs, done.events)
        total = self.purged
        total.add(done)
        if not done.done:
            self.next_purge = mono
            return
        due = keep if done.oldest is None else done.oldest + keep - wall
        self.next_purge = mono + min(max(due, defaults.PURGE_REST), keep)
        if total.jobs or total.events:
            log.info(
                "purged %d jobs, %d events, %d groups and %d submit keys older than %gs",
                total.jobs,
                total.events,
                total.groups,
                total.submit_keys,
                keep,
            )
        self.purged = retention.Purged()

    def _turn(
        self,
        inbox: list[Inbound],
        lost: list[str],
        due: list[Waiter],
        now: float,
        pull: bool,
        slices: bool = False,
    ) -> None:
        self.store.make_room(defaults.MAP_HEADROOM)
        try:
            turn = self.store.write_batch(
                lambda tx: self._apply(tx, inbox, lost, due, now, pull, slices)
            )
        except StoreFull as e:
            log.error("store full: %s; applying this turn's %d messages one by one", e, len(inbox))
            if slices:
                self.longops.stall(self.mono)
            turn = self._one_by_one(inbox, lost, due, now)
        for name, (level, line) in turn.gone.items():
            self._end_session(name)
            log.log(level, "%s", line)
        # What this turn left, with what an earlier turn of the same step left (a slice's turn
        # follows the messages' turn), and what long operations let go, for the next turn.
        self.backlog = self.longops.commit(turn.ops, turn.deferred + self.backlog)
        self._send(turn)

    def _one_by_one(
        self, inbox: list[Inbound], lost: list[str], due: list[Waiter], now: float
    ) -> Turn:
        """A full store refuses only what needs room: each message, loss and the due waiters
        get a transaction of their own, so reads are still answered. Losses that could not be
        recorded are tried again next turn."""
        turn = Turn()
        parts: list[tuple[list[Inbound], list[str], list[Waiter]]] = [([], [], due)]
        parts += [([m], [], []) for m in inbox] + [([], [n], []) for n in lost]
        for msgs, names, waiters in parts:
            apply = functools.partial(
                self._apply, inbox=msgs, lost=names, due=waiters, now=now, ops=turn.ops
            )
            try:
                part = self.store.write_batch(apply)
            except StoreFull as e:
                part = self._refuse_all(msgs, NoSpace(f"no space left in the broker's store: {e}"))
            else:
                turn.ops = part.ops  # what the parts did to long operations adds up
            turn.merge(part)
        return turn

    def _apply(
        self,
        tx: WriteTx,
        inbox: list[Inbound],
        lost: list[str],
        due: list[Waiter],
        now: float,
        pull: bool = False,
        slices: bool = False,
        ops: longops.Staged | None = None,
    ) -> Turn:
        """Apply a turn's messages in one transaction. With `pull`, more client requests are
        taken from the socket while the budget lasts; they join `inbox`, so a run again after
        the map grew sees them too. Requests past the budget are left in `turn.deferred`. With
        `slices`, the running long operation, if any, gets its slice of the turn; `ops` is what
        earlier transactions of the same turn did to long operations (see _one_by_one)."""
        turn = Turn(ops=longops.Staged() if ops is None else ops.copy())
        wake = served = False
        budget = time.monotonic() + TURN_BUDGET
        n = 0
        while n < len(inbox) or (pull and n < BATCH):
            if n == len(inbox):
                more = _drain(self.client, self.curve, PULL)
                if not more:
                    break
                inbox += [("client", frames, user) for frames, user in more]
            kind, frames, user = inbox[n]
            n += 1
            if kind == "worker":
                wake = self._run_submits(tx, now, turn) or wake
                wake = self._worker_message(tx, frames, user, now, turn) or wake
            elif served and time.monotonic() > budget:
                turn.deferred.append((kind, frames, user))
                pull = False
            else:
                wake = self._client_message(tx, frames, user, now, turn) or wake
                served = True
        wake = self._run_submits(tx, now, turn) or wake
        if slices:
            wake = self._long_slice(tx, now, turn) or wake
        for name in lost:
            # Expiry was decided before this turn's messages: a worker heard from since (it
            # registered again, from a new connection) is not lost, and keeps its jobs.
            if not self._silent(name):
                continue
            session = self.sessions.get(name)
            heard = None  # never, by this broker: it waited for the worker since it started
            why = f"worker {name} did not come back within {self._window():g} s of a restart"
            if session is not None and session.identity is not None:
                heard = now - (self.mono - session.last_seen)
                why = f"worker {name} silent for {self._window():g} s"
            moved: list[tuple[int, str]] = []
            wake = self._in_child(tx, now, turn, _losing(name, why, heard, moved)) or wake
            turn.gone[name] = (logging.WARNING, f"{why}: lost{_jobs_went(moved)}")
        for waiter in due:
            turn.replies.append(("client", waiter.identity, self._waited(tx, waiter, True)))
        if wake:
            ready = self.longops.held(turn.ops)
            self._in_child(tx, now, turn, lambda c: (ready(c), c.match()))
        self.longops.notice(tx, turn.ops)
        return turn

    def _in_child(self, tx: WriteTx, now: float, turn: Turn, fn: Callable[[Core], Any]) -> bool:
        with tx.child() as child:
            core = Core(child, now, self.config.core)
            fn(core)
        turn.effects += core.effects
        turn.events += core.events
        return core.wake

    # ---- clients ----------------------------------------------------------------------------

    def _actor(self, user: str | None) -> Actor:
        """One Actor per authenticated user, made once: `_client_message` compares by identity."""
        if user is None:
            return self.actor
        actor = self._actors.get(user)
        if actor is None:
            if len(self._actors) >= 4096:  # keys come and go; keep the cache small
                self._actors.clear()
            who = parse_user_id(user)
            actor = self._actors[user] = Actor(who.name, who.role, who.account)
        return actor

    def _decode(
        self, kind: str, frames: list[bytes], turn: Turn
    ) -> tuple[bytes, protocol.Message] | None:
        """The sender and its message, or None after counting (and where routable, answering)
        a malformed one."""
        if len(frames) != 2:
            self._drop(f"{kind} message with {len(frames)} frames")
            return None
        identity, payload = frames
        allowed = protocol.CLIENT_REQUESTS if kind == "client" else protocol.WORKER_TO_BROKER
        try:
            return identity, protocol.decode(payload, allowed)
        except protocol.ProtocolError as e:
            self.refused += 1
            code, reason = e.code, e.reason
            if e.type in _OTHER_DOOR[kind]:
                code, reason = "wrong_port", self._wrong_port(kind)
            log.info("refused %s message: %s", kind, reason)
            if e.req is not None:
                turn.replies.append((kind, identity, _error(code, reason, e.req)))
            return None
        except Exception:  # a checker's own bug: this message is refused, the broker goes on
            self.refused += 1
            log.exception("refused a %s message that its checks failed on", kind)
            return None

    def _wrong_port(self, kind: str) -> str:
        """What a peer at the other socket is told (keyless brokers; with keys, the ZAP handler
        refuses its key there)."""
        if kind == "client":
            mine, other, port = "client", "workers", self.worker_port
        else:
            mine, other, port = "worker", "tools", self.client_port
        return f"this is the broker's {mine} port; {other} connect to its other port, {port}"

    def _client_message(
        self, tx: WriteTx, frames: list[bytes], user: str | None, now: float, turn: Turn
    ) -> bool:
        decoded = self._decode("client", frames, turn)
        if decoded is None:
            return False
        identity, msg = decoded
        actor = self._actor(user)
        op = longops.starts(msg)
        key = msg.body.get("submit_key") if msg.type == "submit" else None
        mine = (actor.name, key) if key else None
        mergeable = _mergeable(msg)
        # The submits waiting to be run came first: run now, they may start the cascade, which
        # this request must then wait for, as for whatever the turn's messages started so far.
        wake = False if mergeable else self._run_submits(tx, now, turn)
        self.longops.notice(tx, turn.ops)
        reads = msg.type == "submit" and _reads(msg)
        if self.longops.parks(msg.type, op, identity, frames, turn.ops, mine, reads):
            submit = msg.type == "submit"
            parked = longops.Parked(("client", frames, user), identity, actor.name, op, submit)
            try:
                self.longops.park(parked, turn.ops)
            except BanyanError as e:
                self.refused += 1
                turn.replies.append(("client", identity, _error(e.code, e.message, msg.req)))
            return wake
        if mergeable:
            environment = msg.body["environment"]
            alike = turn.submitter is actor and turn.environment == environment
            wake = self._run_submits(tx, now, turn) if not alike else False
            turn.submits.append((identity, msg))
            turn.submitter, turn.environment = actor, environment
            return wake
        return self._request(tx, identity, msg, actor, now, turn, frames[1]) or wake

    def _run_submits(self, tx: WriteTx, now: float, turn: Turn) -> bool:
        """The turn's waiting small submits as one submission: one child transaction, one
        Core.submit, one batch of writes, rather than one each. Each request still gets its
        own ids, in order, as if run alone; if any is refused they run one by one, so that
        only that one is."""
        batch, actor = turn.submits, turn.submitter
        turn.submits, turn.submitter = [], None
        environment, turn.environment = turn.environment, None
        if actor is None:
            return False  # nothing waiting
        if len(batch) > 1:
            core: Core | None = None
            try:
                with tx.child() as child:
                    core = Core(child, now, self.config.core)
                    jobs = [job for _, msg in batch for job in msg.body["jobs"]]
                    ids = core.submit(actor, jobs, [], None, environment=environment)["jobs"]
            except StoreFull:
                raise
            except Exception:  # refused or worse: below, each request gets its own answer
                core = None
            if core is not None:
                turn.effects += core.effects
                turn.events += core.events
                first = 0
                for identity, msg in batch:
                    end = first + len(msg.body["jobs"])
                    body = {"jobs": ids[first:end], "groups": {}}
                    turn.replies.append(
                        ("client", identity, protocol.pack("submitted", body, msg.req))
                    )
                    first = end
                return core.wake
        wake = False
        for identity, msg in batch:
            wake = self._request(tx, identity, msg, actor, now, turn) or wake
        return wake

    def _request(
        self,
        tx: WriteTx,
        identity: bytes,
        msg: protocol.Message,
        actor: Actor,
        now: float,
        turn: Turn,
        request: bytes = b"",
    ) -> bool:
        """Answer one request; `request` is its frame, which a big submission keeps."""
        if msg.type == "logs":
            self._logs(tx, identity, msg, actor, turn)
            return False
        if longops.starts(msg):
            return self._long_start(tx, identity, msg, actor, now, turn, request)

        def handle() -> tuple[Core, Any]:
            if msg.type == "wait":
                self._check_waited(tx, actor, msg.body, turn)
            with tx.child() as child:
                core = Core(child, now, self.config.core)
                return core, queries.handle(core, actor, msg.type, msg.body, self._last_seen())

        done = self._answering(identity, msg, turn, handle)
        if done is None:
            return False
        core, reply = done
        turn.effects += core.effects
        turn.events += core.events
        if msg.type == "wait" and reply is not None:
            pending = set(reply["pending"])
            if pending:
                timeout = msg.body.get("timeout")
                deadline = self.mono + timeout if timeout is not None else None
                waiter = Waiter(identity, msg.req, pending, reply["all"], deadline, actor.name)
                turn.waiters.append(waiter)
                return core.wake
            reply = {"jobs": reply["jobs"], "timed_out": False}
        assert reply is not None
        if msg.type == "events" and not reply["events"] and msg.body.get("wait"):
            deadline = self.mono + msg.body["wait"]
            b = msg.body
            turn.followers.append(
                follow.Follower(identity, msg.req, b["since"], b["limit"], deadline)
            )
            return core.wake
        rtype, body = reply.pop("_type", None) or queries.REPLY[msg.type], reply
        turn.replies.append(("client", identity, protocol.encode(rtype, body, msg.req)))
        return core.wake

    # ---- long operations (see longops.py) ------------------------------------------------------

    def _long_start(
        self,
        tx: WriteTx,
        identity: bytes,
        msg: protocol.Message,
        actor: Actor,
        now: float,
        turn: Turn,
        request: bytes,
    ) -> bool:
        """Admit a cancel, a modify_many or a big submit and do its first slice; answered now
        if that was all."""
        admit = self.longops.admit
        done = self._answering(
            identity,
            msg,
            turn,
            lambda: admit(tx, self._core_at(now), actor, identity, msg, turn.ops, request),
        )
        if done is None:
            return False
        core, reply = done
        turn.effects += core.effects
        turn.events += core.events
        if reply is not None:
            turn.replies.append(("client", identity, reply))
        return core.wake

    def _check_waited(self, tx: WriteTx, actor: Actor, body: dict[str, Any], turn: Turn) -> None:
        """Refuse a wait that would take its user past MAX_WAITED_PER_USER jobs waited on, as
        counted before the wait is looked at: every job waited on costs the broker's memory
        and its loop until it ends."""
        asked = len(body["jobs"])
        for ref in body["groups"]:
            group = tx.get_group(ref) if isinstance(ref, int) else tx.group_by_name(ref)
            asked += group.total if group is not None else 0
        held = self.waited[actor.name]
        held += sum(len(w.jobs) for w in turn.waiters if w.owner == actor.name)  # this turn's
        if held + asked > MAX_WAITED_PER_USER:
            raise Busy(
                f"{actor.name} waits on {held:,} jobs in other requests, and this wait adds "
                f"up to {asked:,}: at most {MAX_WAITED_PER_USER:,} may be waited on at once "
                "(MAX_WAITED_PER_USER); wait for fewer, or once others have been answered"
            )

    def _answering(
        self, identity: bytes, msg: protocol.Message, turn: Turn, fn: Callable[[], T]
    ) -> T | None:
        """`fn()`, or None after answering the client's refusal (or an internal error) for it.
        A full store is the caller's to handle: the turn is run again or one by one."""
        try:
            return fn()
        except BanyanError as e:
            self.declined += 1
            turn.replies.append(("client", identity, _error(e.code, e.message, msg.req)))
        except StoreFull:
            raise
        except Exception:
            log.exception("internal error on %s", msg.type)
            turn.replies.append(
                ("client", identity, _error("internal", "internal broker error", msg.req))
            )
        return None

    def _long_slice(self, tx: WriteTx, now: float, turn: Turn) -> bool:
        """The running long operation's slice of this turn (none if it began this turn)."""
        if turn.ops.head is not None or turn.ops.ended:
            return False
        core, replies = self.longops.work(tx, self._core_at(now), turn.ops)
        turn.replies += [("client", identity, reply) for identity, reply in replies]
        if core is None:
            return False
        turn.effects += core.effects
        turn.events += core.events
        return core.wake

    def _core_at(self, now: float) -> Callable[[WriteTx], Core]:
        return lambda child: Core(child, now, self.config.core)

    def _logs(
        self, tx: WriteTx, identity: bytes, msg: protocol.Message, actor: Actor, turn: Turn
    ) -> None:
        """A running job's output comes from its worker; an ended one's is the stored tail,
        or the whole file while its worker still has it. Only its owner and admins read it."""
        b = msg.body
        job = tx.get_job(b["job"])
        refusal = queries.may_read_output(actor, job, b["job"])
        if job is None or refusal is not None:
            error = refusal or NotFound(f"no job {b['job']}")
            self.declined += 1
            turn.replies.append(("client", identity, _error(error.code, error.message, msg.req)))
            return
        attempts = tx.attempts_of(job.id)
        last = attempts[-1] if attempts else None
        tail = (last.stdout_tail if b["stream"] == "stdout" else last.stderr_tail) if last else ""
        data = tail.encode()
        fallback = {
            "data": data[b["offset"] : b["offset"] + b["limit"]],
            "offset": b["offset"],
            "size": len(data),
            "live": False,
            "eof": True,
            "tail": True,  # the stored tail, not the worker's file
        }
        session = self.sessions.get(last.worker) if last else None
        if last is None or session is None or session.identity is None:
            turn.replies.append(("client", identity, protocol.encode("logs", fallback, msg.req)))
            return
        body = {
            "request": 0,
            "job": job.id,
            "token": last.token,
            "stream": b["stream"],
            "offset": b["offset"],
            "limit": b["limit"],
        }
        if job.st.terminal:
            fallback["live"] = False
        turn.fetches.append(LogFetch(identity, msg.req, last.worker, body, fallback))

    def _expire_fetches(self, now: float) -> None:
        for request, fetch in list(self.fetches.items()):
            if fetch.deadline <= now:
                del self.fetches[request]
                _send(
                    self.client, fetch.identity, protocol.encode("logs", fetch.fallback, fetch.req)
                )

    def _log_chunk(self, body: dict[str, Any], worker: str) -> None:
        """A worker's answer to a fetch: taken only from the worker that was asked."""
        fetch = self.fetches.get(body["request"])
        if fetch is None:
            return  # answered already: the fallback went when the worker was too slow
        if fetch.worker != worker:
            self._drop(f"worker {worker} answered request {body['request']}, not its own")
            return
        del self.fetches[body["request"]]
        if body["error"]:
            reply = fetch.fallback
        else:
            with self.store.read() as tx:
                job = tx.get_job(fetch.body["job"])
                running = job is not None and not job.st.terminal
            data = body["data"]
            reply = {
                "data": data,
                "offset": body["offset"],
                "size": body["size"],
                "live": running,
                "eof": not running and body["offset"] + len(data) >= body["size"],
            }
        _send(self.client, fetch.identity, protocol.encode("logs", reply, fetch.req))

    def _waited(
        self,
        tx: ReadTx,
        waiter: Waiter,
        timed_out: bool,
        seen: dict[int, dict[str, Any] | None] | None = None,
    ) -> bytes:
        jobs = queries.brief(tx, waiter.all_jobs, seen)
        return protocol.encode("waited", {"jobs": jobs, "timed_out": timed_out}, waiter.req)

    # ---- workers ----------------------------------------------------------------------------

    def _worker_message(
        self, tx: WriteTx, frames: list[bytes], user: str | None, now: float, turn: Turn
    ) -> bool:
        decoded = self._decode("worker", frames, turn)
        if decoded is None:
            return False
        identity, msg = decoded
        if msg.type == "register":
            return self._register(tx, identity, user, msg, now, turn)
        name = self.names.get(identity)
        if name is None or self.sessions.get(name, Session(None, 0)).identity != identity:
            if msg.type != "stopping":  # one that is leaving needs no welcome
                turn.replies.append(("worker", identity, protocol.encode("reregister", {})))
            return False
        if msg.type == "log_chunk":
            self._log_chunk(msg.body, name)  # read-only: answered at once, nothing to commit
            return False
        if msg.type == "draining":
            log.info("worker %s drains (%s)", name, msg.body["reason"] or "asked to")
        moved: list[tuple[int, str]] = []
        try:
            if msg.type == "stopping":
                wake = self._in_child(tx, now, turn, lambda c: moved.extend(c.stopped(name)))
                turn.gone[name] = (logging.INFO, f"worker {name} stopped{_jobs_went(moved)}")
                return wake
            return self._in_child(tx, now, turn, lambda c: _worker_report(c, name, msg))
        except NotFound:
            turn.replies.append(("worker", identity, protocol.encode("reregister", {})))
            return False
        except StoreFull:
            raise
        except BanyanError as e:
            self.declined += 1
            turn.replies.append(("worker", identity, _error(e.code, e.message, msg.req)))
            return False
        except Exception:
            log.exception("internal error on worker %s's %s", name, msg.type)
            return False

    def _register(
        self,
        tx: WriteTx,
        identity: bytes,
        user: str | None,
        msg: protocol.Message,
        now: float,
        turn: Turn,
    ) -> bool:
        """One live session per name (SPEC §5): a new connection of the same worker process
        takes its session over; another process is refused while the session is alive, and
        may have the name once it expired."""
        body = msg.body
        name, instance = body["name"], body.get("instance", "")
        address = self.addresses.get(identity) or self._address_of(identity)
        held = self._held_by_another(name, identity, instance, user)
        if held is not None:
            self.declined += 1
            why = (
                f"worker name {name!r} is in use by a live worker on {held.host or '?'} "
                f"(pid {held.pid or '?'}); give this one another --name, or stop that one "
                f"(a name is free {self._window():g} s after its worker stops answering)"
            )
            log.warning(
                "refused a second worker named %s from %s: the one from %s was heard from "
                "%.1f s ago (a name is free %g s after its worker stops answering)",
                name,
                _who(body["host"], address, body["pid"], user),
                held.who(),
                self.mono - held.last_seen,
                self._window(),
            )
            turn.replies.append(("worker", identity, _error("conflict", why, msg.req)))
            return False
        self._end_session(name)
        self.names[identity] = name
        self.sessions[name] = Session(
            identity, self.mono, user, instance, body["host"], int(body["pid"]), address
        )
        running = [(int(j), int(t)) for j, t in body["running"]]
        capacity = (float(body["cpus"]), int(body["memory"]), int(body["gpus"]))
        log.info(
            "worker %s registered from %s: %g cpus, %d MiB, %d gpus, %d running",
            name,
            self.sessions[name].who(),
            *capacity,
            len(running),
        )
        draining = bool(body.get("draining", False))
        key = None if user is None else parse_user_id(user).name
        return self._in_child(
            tx,
            now,
            turn,
            lambda c: c.register(
                name,
                body["host"],
                capacity,
                body["tags"],
                running,
                _runs(body),
                draining,
                address=address,
                key=key,
                spool=body.get("spool", ""),
                instance=instance,
                prefetch=body.get("prefetch"),
            ),
        )

    def _address_of(self, identity: bytes) -> str:
        """The address of the session on this connection, if it has one (a registration again
        on a connection the broker knows, whose address it took when it was new)."""
        name = self.names.get(identity)
        session = self.sessions.get(name) if name else None
        return session.address if session is not None else ""

    def _held_by_another(
        self, name: str, identity: bytes, instance: str, user: str | None
    ) -> Session | None:
        """The live session of another worker process with this name, if there is one."""
        held = self.sessions.get(name)
        if held is None or held.identity in (None, identity) or self._silent(name):
            return None
        same = bool(instance) and instance == held.instance and user == held.key
        return None if same else held

    def _end_session(self, name: str) -> None:
        """Forget a worker's session and its routing id (the table does not grow with
        reconnections)."""
        session = self.sessions.pop(name, None)
        if session is not None and self.names.get(session.identity or b"") == name:
            del self.names[session.identity or b""]

    def _silent(self, name: str) -> bool:
        """No session, or none heard from within the liveness window."""
        session = self.sessions.get(name)
        return session is None or session.last_seen < self.mono - self._window()

    def _last_seen(self) -> dict[str, float]:
        """When each connected worker was last heard from, in wall-clock time for people. The
        workers a restarted broker waits for are not connected: it has not heard from them."""
        offset = self.wall() - self.clock()
        return {
            name: s.last_seen + offset
            for name, s in self.sessions.items()
            if s.identity is not None
        }

    def _touch(self, identity: bytes, now: float) -> bool:
        """Mark a worker's session alive; False if `identity` has no session."""
        name = self.names.get(identity)
        session = self.sessions.get(name) if name else None
        if session is None or session.identity != identity:
            return False
        session.last_seen = now
        return True

    def _window(self) -> float:
        return self.config.core.heartbeat * self.config.core.liveness

    def _expired(self, now: float) -> list[str]:
        """Sessions silent past the window, looked for four times a heartbeat rather than
        every step: with a thousand workers the scan was most of the broker's work."""
        if now < self.next_expiry:
            return []
        self.next_expiry = now + self.config.core.heartbeat / 4
        limit = now - self._window()
        return [name for name, s in self.sessions.items() if s.last_seen < limit]

    def _heartbeat(self, now: float) -> None:
        beat = protocol.encode("heartbeat", {})
        for session in self.sessions.values():
            if session.identity is not None:
                _send(self.worker, session.identity, beat)
        self.next_heartbeat = now + self.config.core.heartbeat

    # ---- after the commit -------------------------------------------------------------------

    def _send(self, turn: Turn) -> None:
        for kind, identity, payload in turn.replies:
            _send(self.client if kind == "client" else self.worker, identity, payload)
        for effect in turn.effects:
            session = self.sessions.get(effect.worker)
            if session is None or session.identity is None:
                continue  # it will re-register and be reconciled then
            payload = protocol.encode(effect.type, effect.body, checked=False)
            _send(self.worker, session.identity, payload)
        for fetch in turn.fetches:
            session = self.sessions.get(fetch.worker)
            if session is None or session.identity is None:
                _send(
                    self.client, fetch.identity, protocol.encode("logs", fetch.fallback, fetch.req)
                )
                continue
            request, self.next_fetch = self.next_fetch, self.next_fetch + 1
            fetch.body["request"] = request
            fetch.deadline = self.mono + LOG_FETCH_TIMEOUT
            self.fetches[request] = fetch
            _send(self.worker, session.identity, protocol.encode("fetch_log", fetch.body))
        for waiter in turn.waiters:
            self.waited[waiter.owner] += len(waiter.jobs)
            for job in waiter.jobs:
                self.waiters.setdefault(job, []).append(waiter)
            if waiter.deadline is not None:
                entry = (waiter.deadline, next(self._deadline_seq), waiter)
                heapq.heappush(self.deadlines, entry)
        # Waits registered this turn saw the state as of their own message; whatever ended
        # after it in this turn is in `turn.events`, so this one pass settles them too.
        ended = {e.job for e in turn.events if e.to in ("terminated", "cancelled")}
        self._wake_waiters(ended)
        for follower in turn.followers:
            self.followers.add(follower)
        if turn.events and len(self.followers):
            with self.store.read() as tx:
                for identity, payload in self.followers.wake(tx.events_from):
                    _send(self.client, identity, payload)

    def _wake_waiters(self, ended: set[int]) -> None:
        ready: list[Waiter] = []
        for job in ended:
            for waiter in self.waiters.pop(job, []):
                waiter.jobs.discard(job)
                self.waited[waiter.owner] -= 1
                if not waiter.jobs:
                    ready.append(waiter)
        if not ready:
            return
        seen: dict[int, dict[str, Any] | None] = {}
        with self.store.read() as tx:
            for waiter in ready:
                _send(self.client, waiter.identity, self._waited(tx, waiter, False, seen))

    def _due_waiters(self, now: float) -> list[Waiter]:
        due = []
        while self.deadlines and self.deadlines[0][0] <= now:
            waiter = heapq.heappop(self.deadlines)[2]
            if not waiter.jobs:
                continue  # answered already: every job it waited for ended
            self.waited[waiter.owner] -= len(waiter.jobs)
            for job in waiter.jobs:
                left = [w for w in self.waiters.get(job, ()) if w is not waiter]
                if left:
                    self.waiters[job] = left
                else:
                    self.waiters.pop(job, None)
            due.append(waiter)
        return due

    def _refuse_all(self, inbox: list[Inbound], error: BanyanError) -> Turn:
        turn = Turn()
        for kind, frames, _ in inbox:
            if len(frames) != 2:
                continue
            schema = protocol.CLIENT_REQUESTS if kind == "client" else protocol.WORKER_TO_BROKER
            try:
                req = protocol.decode(frames[1], schema).req
            except protocol.ProtocolError:
                continue
            # A worker told of the refusal claims again; its results it sends again anyway.
            turn.replies.append((kind, frames[0], _error(error.code, error.message, req)))
        return turn

    def _drop(self, why: str) -> bool:
        self.refused += 1
        log.info("dropped: %s", why)
        return False

    def refusals(self) -> int:
        """Messages refused so far: key handshakes, malformed ones, and requests answered with
        a refusal (no such job, not allowed, a conflict)."""
        return self.refused + self.declined + (self.zap.refused if self.zap else 0)

    def _report_refusals(self) -> None:
        count = self.refusals()
        if count != self._reported:
            # Each kind apart: an unknown key or a malformed message may be an attack, while a
            # `banyan-cancel 999` refused as not found is an ordinary answer.
            log.info(
                "refused %s so far: %s, %d malformed, %s answered with a refusal (no such "
                "job, not allowed, a conflict)",
                _many(count, "message"),
                _many(self.zap.refused if self.zap else 0, "key handshake"),
                self.refused,
                _many(self.declined, "request"),
            )
            self._reported = count

    def _accept_failed(self, monitor: zmq.Socket[Any]) -> None:
        """Connections the kernel refused the broker: said at most once a minute."""
        failed, errnos = 0, set()
        # ZeroMQ tries the accept again at once, and says so each time: take a bounded number
        # of its events a turn, or the turn would never end while the connections wait.
        for _ in range(1000):
            if not monitor.poll(0):
                break
            event = recv_monitor_message(monitor)
            failed += 1
            errnos.add(int(event["value"]))
        now = self.clock()
        if failed and now - self._refusing_told >= 60:
            self._refusing_told = now
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            why = ", ".join(sorted(os.strerror(e) for e in errnos))
            log.warning(
                "cannot take new connections on the %s port (%s): it holds as many as its "
                "open-files limit (%d) allows; raise it (LimitNOFILE= in its systemd unit, "
                "ulimit -n) or find who holds so many connections",
                self.refusing[monitor],
                why,
                soft,
            )

    def close(self) -> None:
        self._save_seen()
        for monitor, name in self.refusing.items():
            (self.client if name == "client" else self.worker).disable_monitor()
            monitor.close(linger=0)
        self.client.close(linger=0)
        self.worker.close(linger=0)
        if self.zap is not None:
            self.zap.close()
        self.store.close()
        os.close(self.state_lock)
        if self._own_ctx:
            self.ctx.destroy(linger=0)  # and any socket a caller made on it
        log.info("stopped; %d messages refused in this run", self.refusals())


# Messages only a peer at the wrong socket sends first: a worker's `register` at the client
# port, a tool's requests at the worker port.
_OTHER_DOOR = {
    "client": frozenset({"register"}),
    "worker": protocol.CLIENT_REQUESTS - protocol.WORKER_TO_BROKER,
}


def _mergeable(msg: protocol.Message) -> bool:
    """A submit that may run as part of a bigger one: a few jobs, no groups or submit key,
    and no dependency on a job of its own (`local` counts from the request's first job)."""
    b = msg.body
    return (
        msg.type == "submit"
        and 0 < len(b["jobs"]) <= MERGE_JOBS
        and not b["groups"]
        and b["submit_key"] is None
        and b.get("array") is None
        and b.get("each") is None
        and not any("local" in dep for job in b["jobs"] for dep in job["depends_on"])
    )


def _reads(msg: protocol.Message) -> bool:
    """A submit whose jobs depend on others or join groups: what it is told depends on them."""
    return any(job["depends_on"] or job.get("groups") for job in msg.body["jobs"])


def _runs(register: dict[str, Any]) -> owners.Runs:
    return owners.Runs(register["only_account"], register["refused"])


def _losing(
    name: str, why: str, heard: float | None, moved: list[tuple[int, str]]
) -> Callable[[Core], None]:
    return lambda core: moved.extend(core.worker_lost(name, why, heard))


def _many(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _jobs_went(moved: list[tuple[int, str]]) -> str:
    """`; jobs 4, 7 requeued; job 9 ended lost`: where a gone worker's jobs went."""
    if not moved:
        return ""
    words = {"available": "requeued", "terminated": "ended lost", "cancelled": "cancelled"}
    by: dict[str, list[str]] = {}
    for job, state in moved:
        by.setdefault(words.get(state, state), []).append(str(job))
    return "".join(
        f"; job{'s' if len(ids) > 1 else ''} {', '.join(ids)} {what}" for what, ids in by.items()
    )


def _worker_report(core: Core, name: str, msg: protocol.Message) -> None:
    b = msg.body
    if msg.type == "heartbeat":
        core.heartbeat(name, [(int(r[0]), int(r[1]), r[2], r[3]) for r in b["running"]])
    elif msg.type == "draining":
        core.draining(name)
    elif msg.type == "claim":
        core.claim(name, b["max"], b.get("ahead"))
    elif msg.type == "started":
        core.started(name, b["job"], b["token"], b["age"])
    elif msg.type == "hand_back":
        core.hand_back(name, b["job"], b["token"], b["reason"])
    elif msg.type == "returned":
        core.returned(name, b["job"], b["token"], b["reason"])
    elif msg.type == "progress":
        core.progress(
            name, b["job"], b["token"], b["percent"], b["message"], (b["cpu_percent"], b["rss"])
        )
    elif msg.type == "result":
        tails = (_text(b["stdout_tail"]), _text(b["stderr_tail"]))
        core.result(
            name,
            b["job"],
            b["token"],
            b["outcome"],
            b["exit_code"],
            b["signal"],
            tails,
            b["runtime"],
            [(int(j), int(t)) for j, t in b.get("then", ())],
        )
        core.wake = True  # its resources are free again for its standing claim


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _error(code: str, message: str, req: int) -> bytes:
    return protocol.encode("error", {"code": code, "message": message}, req)


def _drain(
    sock: zmq.Socket[Any],
    secure: object,
    limit: int = BATCH,
    peers: tuple[dict[bytes, str], dict[bytes, str]] | None = None,
) -> list[tuple[list[bytes], str | None]]:
    """Up to `limit` waiting messages, each with its authenticated `role:name` when secure.
    With `peers` (the known routing ids, and a map to fill), the peer address of each message
    from a routing id not known is kept in the map."""
    out: list[tuple[list[bytes], str | None]] = []
    for _ in range(limit):
        # Asking is cheaper than the zmq.Again exception that would end every drain.
        if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
            break
        # A ROUTER always hands over the peer's routing id first, then at least one frame. The
        # id comes as bytes (no Frame object); the rest as Frames, for `more` and User-Id.
        frames: list[bytes] = [sock.recv(_NOBLOCK)]
        while True:
            frame = sock.recv(_NOBLOCK, copy=False)
            frames.append(frame.bytes)
            if not frame.more:
                break
        user = frame.get("User-Id") if secure is not None else None
        if peers is not None and frames[0] not in peers[0]:
            address = frame.get("Peer-Address")
            peers[1][frames[0]] = address if isinstance(address, str) else ""
        out.append((frames, user if isinstance(user, str) else None))
    return out


def _who(host: str, address: str, pid: object, user: str | None) -> str:
    """`HOST at ADDRESS (pid P, key K)`: the host a worker names, where the broker saw it
    connect from, and the worker key it authenticated with."""
    key = "no key" if user is None else f"key {parse_user_id(user).name}"
    at = f" at {address}" if address and address != host else ""
    return f"{host or '?'}{at} (pid {pid or '?'}, {key})"


def _send(sock: zmq.Socket[Any], identity: bytes, payload: bytes) -> None:
    try:
        sock.send(identity, _NOBLOCK | _SNDMORE)
        sock.send(payload, _NOBLOCK)
    except zmq.ZMQError as e:  # the peer is gone; it will ask again
        log.debug("send to %r failed: %s", identity, e)


def _port(sock: zmq.Socket[Any]) -> int:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])
