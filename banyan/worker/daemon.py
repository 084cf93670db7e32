"""The worker daemon: one DEALER to the broker, one poll loop, jobs as process groups.

It registers, heartbeats, keeps one claim outstanding while it is not draining, runs what it
is assigned, and reports progress and results. Results stay in `unacked` until the broker
acknowledges them, across reconnects and broker restarts (SPEC §5). A job it cannot run as its
owner's account it hands back unstarted (accounts.py).

Stopping: the first SIGTERM or SIGINT drains (the broker is told at once and assigns nothing
more); the worker exits 0 when its jobs have ended and their results are acknowledged, telling
the broker it stops. A second signal cancels the jobs, which the broker requeues elsewhere.

Connection problems the socket's monitor reports (banyan.link) are logged as what they are. At
the first start a refused key or a wrong port ends the worker with exit 3, as it does for the
tools: it is a mistake in its setup, and nothing runs yet. Once registered, the worker keeps
trying with backoff instead: its jobs go on running, and a key can be authorized again on the
broker without touching the worker. A name another live worker holds ends it with exit 1.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from banyan import defaults, protocol
from banyan.config import home
from banyan.errors import BrokerUnavailable, KeyRefused, WrongPort
from banyan.keys import Curve
from banyan.link import Credentials, Watch
from banyan.worker import accounts, cgroups, watchdog
from banyan.worker.accounts import Account
from banyan.worker.runner import Finished, Launch, Runner
from banyan.worker.spool import Spool, SpoolPolicy

log = logging.getLogger("banyan.worker")

# Jobs held ahead made ready to start at a time (Runner.stage): those next in line. Each holds
# its two output files open.
STAGED_AHEAD = 2
# How much each ended job moves the moving average of job length that `ahead_wanted` reads.
LENGTH_WEIGHT = 0.2

Key = tuple[int, int]  # (job, token)


@dataclass(frozen=True)
class WorkerConfig:
    broker: str  # tcp://host:port of the broker's worker socket
    name: str
    spool: Path
    cpus: float
    memory: int
    gpus: list[str]  # visible device ids; len() is the gpu capacity
    tags: tuple[str, ...] = ()
    heartbeat: float = defaults.HEARTBEAT_INTERVAL
    liveness: int = defaults.LIVENESS
    curve: Curve | None = None  # this machine's worker key and the broker's public key
    spool_policy: SpoolPolicy = field(default_factory=SpoolPolicy)
    run_any_owner: bool = False  # not root: run everyone's jobs as this account
    allow_root_jobs: bool = False  # root: run root's jobs as root
    home: Path | None = None  # where that key lives ($BANYAN_HOME), named in messages
    prefetch: int | None = None  # jobs to hold ahead (SPEC §5); None: the broker's default


@dataclass
class Link:
    """What the worker knows about its connection to the broker."""

    registered: bool = False
    # How many more jobs the standing claim at the broker covers. The broker keeps a claim
    # until it has assigned that many, so one claim serves hundreds of jobs.
    claim_left: int = 0
    reclaim: bool = False  # the broker refused something: renew the claim at the next heartbeat
    last_heard: float = 0.0
    next_heartbeat: float = 0.0
    next_connect: float = 0.0
    backoff: float = defaults.RECONNECT_MIN
    unacked: dict[Key, tuple[bytes, float]] = field(default_factory=dict)  # result, last sent
    register_req: int = 0  # the req of the last `register`, which a refusal echoes
    ever_registered: bool = False
    trouble: BrokerUnavailable | None = None  # what the monitor last said went wrong
    told: tuple[str, float] = ("", -math.inf)  # the trouble last logged, and when
    ahead_asked: int | None = None  # the `ahead` of the last claim


class WorkerDaemon:
    def __init__(
        self,
        config: WorkerConfig,
        ctx: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.ctx = ctx or zmq.Context.instance()
        self.policy = accounts.Policy(config.name, config.run_any_owner, config.allow_root_jobs)
        self.runner = Runner(config.spool, config.gpus, cgroups=True)
        self.spool = Spool(self.runner.spool, config.spool_policy)
        # Jobs live in sessions of their own: if this process dies, the watchdog kills them.
        cgroup = self.runner.cgroups.base if self.runner.cgroups else None
        moved = self.runner.move_time
        if moved is not None and not self.runner.launcher.broken:
            hint = cgroups.remount_hint()
            log.info(
                "a move into a cgroup took %.1f ms here, so a launcher process clones each job "
                "straight into its own%s",
                moved * 1e3,
                f"; `{hint}` (as root) makes moves cheap" if hint else "",
            )
        self.watchdog, self._lifeline = watchdog.start(self.runner.nonce, cgroup)
        self.link = Link()
        self.sock: zmq.Socket[Any] | None = None
        self.watch: Watch | None = None
        self.creds = Credentials("worker", config.home or home(), config.curve)
        self.instance = os.urandom(8).hex()  # this process, to the broker (one per name)
        self._reqs = itertools.count(1)
        self.draining = False  # by the broker (admin) or by our own first SIGTERM
        self.stop_requested = 0  # count of SIGTERM/SIGINT received
        self.hangups = 0  # SIGHUPs not yet logged: a closed terminal must not stop the worker
        self.signals: list[str] = []  # their names, in order
        self.announced = False  # the broker was told this worker drains for a signal
        self.cold = False  # the second signal: running jobs are being cancelled
        self.exit_code = 0
        self.heartbeat = config.heartbeat
        self.liveness = config.liveness
        self._stale: set[Key] = set()  # attempts the broker said are not ours, logged once
        # Started jobs whose `started` report is not due yet: key -> (pid, start time).
        self._unreported: dict[Key, tuple[int, float]] = {}
        # Claim-ahead (SPEC §5): jobs assigned beyond free room, in the order they came, each
        # with its exported environment; started as room frees, or given back (`returned`).
        self.ahead: dict[Key, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self._sizes: dict[Key, tuple[float, int]] = {}  # (cpus, memory) of each started job
        self._job_length: float | None = None  # recent jobs' run time, a moving average
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._poller: tuple[zmq.Socket[Any] | None, zmq.Poller] = (None, zmq.Poller())
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self._connect(self.clock())

    # ---- connection -------------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        self._disconnect()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE_BYTES)
        if self.config.curve is not None:
            self.config.curve.apply(self.sock)
        self.watch = Watch(self.sock, self.config.broker, self.creds)
        self.sock.connect(self.config.broker)
        self._register(now)

    def _register(self, now: float) -> None:
        """Say who this worker is, what it has and runs, and whose jobs it refuses. What it
        held ahead it drops: the broker takes back every such job it does not list."""
        self.ahead.clear()
        self.link.registered = False
        self.link.claim_left = 0
        self.link.last_heard = now
        self.link.register_req = next(self._reqs)
        self._send(
            "register",
            {
                "name": self.config.name,
                "host": socket.gethostname(),
                "cpus": float(self.config.cpus),
                "memory": int(self.config.memory),
                "gpus": len(self.config.gpus),
                "tags": list(self.config.tags),
                "running": [list(k) for k in self._held()],
                "pid": os.getpid(),
                "only_account": self.policy.only_account,
                "refused": dict(self.policy.refused),
                "instance": self.instance,
                "draining": self.stop_requested > 0,
                "spool": self.runner.spool,
                "prefetch": self.config.prefetch,
            },
            self.link.register_req,
        )

    def _disconnect(self, linger: float = 0.0) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.sock is not None:
            self.sock.close(linger=int(linger * 1000))
            self.sock = None

    def _held(self) -> list[Key]:
        """Attempts this worker answers for: running ones, and ended ones not yet acked."""
        return sorted(set(self.runner.running()) | set(self.link.unacked))

    def _send(self, kind: str, body: dict[str, Any], req: int = 0) -> None:
        assert self.sock is not None
        try:
            frame = protocol.encode(kind, body, req, allowed=protocol.WORKER_TO_BROKER)
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            log.debug("send queue full; %s dropped (it will be repeated)", kind)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        previous = signal.set_wakeup_fd(self._wakeup_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the poll via the fd
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            while not self.finished():
                self.step(timeout=self._timeout())
            if self.exit_code == 0 and self.link.registered:
                self._send("stopping", {})
        finally:
            signal.set_wakeup_fd(previous)
            self.close()
        return self.exit_code

    def _on_stop(self, signum: int, _frame: Any = None) -> None:
        # Handlers only set flags; the loop does the work (a warm stop, then a cold one).
        self.signals.append(signal.Signals(signum).name)
        self.stop_requested += 1

    def _on_hangup(self, _signum: int, _frame: Any = None) -> None:
        self.hangups += 1

    def finished(self) -> bool:
        if self.runner.running():
            return False
        return bool(self.exit_code) or (self.stop_requested > 0 and not self.link.unacked)

    def give_up(self, code: int, why: str) -> None:
        """End the worker with exit `code`, cancelling whatever it runs (its broker has given
        those jobs to others, or never gave it any)."""
        log.error("%s", why)
        self.exit_code = code
        self.cold = True

    def _timeout(self) -> float:
        """Sleep until the next heartbeat, or the runner's next kill or time limit."""
        now = self.clock()
        due = min(self.link.next_heartbeat, self.runner.next_deadline() or math.inf)
        if self._unreported:
            first = min(t for _, t in self._unreported.values())
            due = min(due, first + defaults.STARTED_REPORT_DELAY)
        if self.spool.urgent:
            due = now  # making room on a full disk: keep at it
        return min(defaults.PROGRESS_INTERVAL, max(0.0, due - now))

    def step(self, timeout: float = 0.0) -> None:
        assert self.sock is not None and self.watch is not None
        if self._poller[0] is not self.sock:  # made anew with each connection
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.watch.monitor, zmq.POLLIN)
            poller.register(self._wakeup_r.fileno(), zmq.POLLIN)
            self._poller = (self.sock, poller)
        poller = self._poller[1]
        # Rounded up: a deadline 0.3 ms away must not become a busy loop of 0 ms polls.
        ready = dict(poller.poll(math.ceil(timeout * 1000)))
        if self._wakeup_r.fileno() in ready:
            with contextlib.suppress(BlockingIOError):
                self._wakeup_r.recv(4096)
        now = self.clock()
        self._obey_signals(now)
        if self.watch.monitor in ready:
            self._trouble(self.watch.read(), now)
        if self.sock in ready:
            for _ in range(1000):
                try:
                    frame = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_message(frame, now)
        self._report(now)
        self._maybe_claim(now)
        self._timers(now)
        self._stage(now)
        busy = {job for job, _ in self.runner.running()} | {job for job, _ in self.link.unacked}
        busy.update(job for job, _ in self.runner.staged())
        self.spool.step(now, time.time(), busy, defaults.SPOOL_SLICE)

    def _stage(self, now: float) -> None:
        """Keep the next jobs held ahead made ready to start (Runner.stage), and only them:
        what was asked back, cancelled or dropped is undone here."""
        nexts = [] if self.draining else list(itertools.islice(self.ahead, STAGED_AHEAD))
        for key in self.runner.staged():
            if key not in nexts:
                self.runner.unstage(key)
        staged = set(self.runner.staged())
        for key in nexts:
            if key in staged:
                continue
            a, environment = self.ahead[key]
            account = self.policy.resolve(a["account"], now)
            if not isinstance(account, str):
                self.runner.stage(_launch(a, environment, account))

    def _obey_signals(self, now: float) -> None:
        running = len(self.runner.running())
        if self.hangups:
            log.info("SIGHUP ignored: the worker goes on (SIGTERM drains it)")
            self.hangups = 0
        if self.stop_requested and not self.announced:
            self.announced = self.draining = True
            self.link.claim_left = 0
            # Given back by `draining` (or, unregistered, by `register`): the broker takes back
            # at once what it held ahead, as its `started` reports went first.
            self.ahead.clear()
            log.info(
                "%s: draining; finishing %s, claiming nothing new (a second signal cancels "
                "them, to run elsewhere)",
                self.signals[0],
                _running(running),
            )
            if self.link.registered:  # else `register` says so
                self._send("draining", {"reason": self.signals[0]})
        if self.stop_requested >= 2 and not self.cold:
            self.cold = True
            log.info(
                "%s again: cancelling %s; the broker requeues them on other workers",
                self.signals[1],
                _running(running),
            )
        if self.cold and running:
            self.runner.shutdown_all(now)  # those already being stopped are left alone

    def _trouble(self, trouble: BrokerUnavailable | None, now: float) -> None:
        """A connection problem: the end at the first start, else logged (and retried)."""
        if trouble is None:
            return
        self.link.trouble = trouble
        definite = isinstance(trouble, (KeyRefused, WrongPort))
        if definite and not self.link.ever_registered and not self._held():
            self.give_up(3, f"cannot register with the broker: {trouble}")
            return
        told, when = self.link.told
        if str(trouble) != told or now - when >= defaults.TROUBLE_LOG_INTERVAL:
            text = str(trouble)
            log.error(
                "%s", text if text.startswith("cannot ") else f"cannot reach the broker: {text}"
            )
            self.link.told = (str(trouble), now)

    def _on_message(self, frame: bytes, now: float) -> None:
        try:
            msg = protocol.decode(frame, protocol.BROKER_TO_WORKER)
        except protocol.ProtocolError as e:
            log.warning("ignored a malformed message from the broker: %s", e.reason)
            return
        self.link.last_heard = now
        self.link.backoff = defaults.RECONNECT_MIN
        b = msg.body
        if msg.type == "registered":
            if self.policy.learn_broker_account(b.get("broker_account"), now):
                # Claim nothing before the broker knows this worker refuses that account.
                log.info(
                    "the broker runs as %s: not running that account's jobs",
                    b["broker_account"],
                )
                self._register(now)
                return
            again = self.link.ever_registered
            self.link.registered = self.link.ever_registered = True
            if again:
                ended = len(set(self.link.unacked) - set(self.runner.running()))
                log.info(
                    "registered again with the broker at %s (%s re-attached%s)",
                    self.config.broker,
                    _running(len(self.runner.running())),
                    f"; {ended} ended meanwhile, results to deliver" if ended else "",
                )
            else:
                log.info("registered with the broker at %s", self.config.broker)
            self.link.trouble, self.link.told = None, ("", -math.inf)
            self.heartbeat, self.liveness = float(b["heartbeat"]), int(b["liveness"])
            if self.stop_requested:  # a signal that came while `register` was on its way
                self._send("draining", {"reason": self.signals[0]})
            for payload, _ in self.link.unacked.values():
                self.sock.send(payload, zmq.NOBLOCK)  # type: ignore[union-attr]
        elif msg.type == "assign":
            self.link.claim_left -= len(b["jobs"])
            for a in b["jobs"]:
                environment = b["environments"].get(a["environ"]) if a["environ"] else None
                if not a["ahead"]:
                    self._start(a, environment, now)
                elif self.draining:
                    self._give_back((a["job"], a["token"]), "the worker drains")
                else:
                    self.ahead[(a["job"], a["token"])] = (a, environment)
            for (job, token), pid in self._start_ahead(now):  # room it had already
                self._send("started", {"job": job, "token": token, "pid": pid, "age": 0.0})
        elif msg.type == "revoke":
            key = (b["job"], b["token"])
            if key in self.ahead:  # not started: it never will be here
                del self.ahead[key]
                self._give_back(key, "asked back by the broker for a worker with room")
        elif msg.type == "cancel":
            key = (b["job"], b["token"])
            if key in self.ahead:
                del self.ahead[key]
                self._give_back(key, "cancelled before it started")
            else:
                self.runner.cancel(b["job"], b["token"], now, b.get("reason", ""))
        elif msg.type == "kill_stale":
            key = (b["job"], b["token"])
            self.ahead.pop(key, None)
            self._sizes.pop(key, None)
            self.link.unacked.pop(key, None)
            self._unreported.pop(key, None)
            self.runner.kill_stale(*key)
            # The broker answers each report about a stale attempt so: say it once.
            if key not in self._stale:
                if len(self._stale) >= defaults.MAX_CLAIM:
                    self._stale.clear()
                self._stale.add(key)
                log.info("job %d token %d is not ours any more: killed", *key)
        elif msg.type == "ack":
            self.link.unacked.pop((b["job"], b["token"]), None)
        elif msg.type == "drain":
            self.draining = not b["resume"] or self.stop_requested > 0
            self.link.claim_left = 0  # the broker dropped the claim; resuming needs a new one
            if self.draining:
                for key in list(self.ahead):
                    del self.ahead[key]
                    self._give_back(key, "the worker drains")
            if b["resume"] and self.stop_requested:  # resumed while stopping: still stopping
                self._send("draining", {"reason": self.signals[0]})
        elif msg.type == "reregister":
            self._connect(now)
        elif msg.type == "fetch_log":
            self._send_log(b)
        elif msg.type == "error" and msg.req and msg.req == self.link.register_req:
            self._refused(b["code"], b["message"])
        elif msg.type == "error":
            log.warning("broker refused a message: %s", b["message"])
            # It may have been our claim (e.g. the broker's disk is full): claim again at the
            # next heartbeat, or an idle worker would wait for an assignment forever.
            self.link.reclaim = True

    def _refused(self, code: str, message: str) -> None:
        """The broker refused this worker's `register`."""
        if code == "conflict":  # the name is another live worker's (SPEC §5: refuse and exit)
            self.give_up(1, f"the broker refused this worker: {message}")
        elif code == "wrong_port":
            self._trouble(WrongPort(f"{self.config.broker}: {message}"), self.clock())
        else:  # e.g. its store is full: try again after the usual silence
            log.error("the broker refused to register this worker: %s", message)

    def _send_log(self, b: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"request": b["request"], "offset": b["offset"]}
        try:
            data, size = self.runner.tail(
                b["job"], b["token"], b["stream"], b["offset"], b["limit"]
            )
        except Exception as e:
            reply["error"] = str(e)[:1000] or type(e).__name__
        else:
            reply.update(
                data=data,
                size=size,
                eof=(b["job"], b["token"]) not in set(self.runner.running())
                and b["offset"] + len(data) >= size,
            )
        self._send("log_chunk", reply)

    def _give_back(self, key: Key, reason: str) -> None:
        self._send("returned", {"job": key[0], "token": key[1], "reason": reason})

    def _room(self, freed: Collection[Key] = ()) -> tuple[float, int]:
        """Free cpus and memory, by the sizes of the jobs this worker runs (but those in
        `freed`, which have ended)."""
        cpus, memory = float(self.config.cpus), int(self.config.memory)
        for key in self.runner.running():
            if key in freed:
                continue
            c, m = self._sizes.get(key, (0.0, 0))
            cpus, memory = cpus - c, memory - m
        return cpus, memory

    def _start_ahead(self, now: float, freed: Collection[Key] = ()) -> list[tuple[Key, int]]:
        """Start the jobs held ahead that the free room takes, in the order they came;
        returns those started with their pids (the caller reports them at once)."""
        if not self.ahead or self.draining:
            return []
        if now - self.link.last_heard > self.heartbeat * self.liveness / 2:
            # Cut off long enough that the broker may count it lost, and so have given these
            # back: they wait for the broker (registering again drops them).
            return []
        cpus, memory = self._room(freed)
        started: list[tuple[Key, int]] = []
        for key, (a, environment) in list(self.ahead.items()):
            if a["cpus"] > cpus + 1e-9 or a["memory"] > memory:
                break  # in order: a big job is not passed over by small ones behind it
            del self.ahead[key]
            pid = self._start(a, environment, now, report=False)
            if pid is not None:
                started.append((key, pid))
                cpus, memory = cpus - a["cpus"], memory - a["memory"]
        return started

    def _start(
        self,
        a: dict[str, Any],
        environment: dict[str, Any] | None,
        now: float,
        report: bool = True,
    ) -> int | None:
        """Start an assigned job: its pid (0: not known), or None if it was handed back.
        `report`: its `started` goes out a little later (`_report_started`); else the caller
        reports it at once."""
        account = self.policy.resolve(a["account"], now)
        if isinstance(account, str):
            log.info("job %d handed back: %s", a["job"], account)
            self._send("hand_back", {"job": a["job"], "token": a["token"], "reason": account})
            self.link.claim_left += 1
            return None
        if a["environ"] and environment is None:
            log.warning("job %d came without its exported environment", a["job"])
        launch = _launch(a, environment, account)
        running = self.runner.start(launch, now)
        key = (launch.job, launch.token)
        self._sizes[key] = (float(a["cpus"]), int(a["memory"]))
        if report:
            self._unreported[key] = (running.pid or 0, running.started)
        return running.pid or 0

    def _report_started(self, now: float) -> None:
        for (job, token), (pid, started) in list(self._unreported.items()):
            if now - started >= defaults.STARTED_REPORT_DELAY:
                del self._unreported[(job, token)]
                self._send(
                    "started", {"job": job, "token": token, "pid": pid, "age": now - started}
                )

    def _report(self, now: float) -> None:
        # Jobs held ahead start in the room that frees, as soon as a job's leader has exited
        # (before its end is handled: its output tails, what it left behind), and before the
        # results go: the last result names them (`then`), so the broker sees the room freed
        # and taken at once.
        freed = self.runner.exited(now) if self.ahead else []
        first = self._start_ahead(now, freed) if freed else []
        ended = self.runner.poll(now)
        then = [key for key, _ in first]
        if ended:  # and room that a cancel or a time limit freed
            then += [key for key, _ in self._start_ahead(now)]
        else:  # cannot be (poll ends what exited by itself), but never leave a start untold
            for (job, token), pid in first:
                self._send("started", {"job": job, "token": token, "pid": pid, "age": 0.0})
        # One that started and ended within this step is told by its own result.
        over = {(done.job, done.token) for done in ended}
        then = [key for key in then if key not in over]
        for i, done in enumerate(ended):
            self._result(done, now, then if i == len(ended) - 1 else [])
        if not ended:
            # Room that went unused: jobs held ahead that waited for word from the broker
            # (after a pause of this process, say) start once it has been heard again.
            for (job, token), pid in self._start_ahead(now):
                self._send("started", {"job": job, "token": token, "pid": pid, "age": 0.0})
        self._report_started(now)
        for p in self.runner.progress(now):
            self._send(
                "progress",
                {
                    "job": p.job,
                    "token": p.token,
                    "percent": p.percent,
                    "message": p.message,
                    "cpu_percent": None,
                    "rss": None,
                },
            )

    def _result(self, done: Finished, now: float, then: list[Key]) -> None:
        payload = protocol.encode(
            "result",
            {
                "job": done.job,
                "token": done.token,
                "outcome": done.outcome,
                "exit_code": done.exit_code,
                "signal": done.signal,
                "stdout_tail": done.stdout_tail,
                "stderr_tail": done.stderr_tail,
                "runtime": max(0.0, done.ended - done.started),
                "then": [list(k) for k in then],
            },
        )
        self._unreported.pop((done.job, done.token), None)
        self._sizes.pop((done.job, done.token), None)
        length = max(0.0, done.ended - done.started)
        self._job_length = (
            length
            if self._job_length is None
            else (self._job_length + LENGTH_WEIGHT * (length - self._job_length))
        )
        self.link.unacked[(done.job, done.token)] = (payload, now)
        assert self.sock is not None
        with contextlib.suppress(zmq.Again):
            self.sock.send(payload, zmq.NOBLOCK)

    def _maybe_claim(self, now: float) -> None:
        link = self.link
        if not link.registered or self.draining:
            return
        # A worker given --prefetch holds that many; else as many as its jobs' length calls for:
        # that of the jobs that ended lately, or of one running now if it has run longer (long
        # jobs that follow short ones are not held ahead for long).
        wish = None
        if self.config.prefetch is None:
            length = self._job_length
            if length is not None:
                length = max(length, self.runner.longest_running(now))
            wish = ahead_wanted(length, self.config.cpus)
        if link.claim_left < defaults.MAX_CLAIM // 2 or _moved(link.ahead_asked, wish):
            self._send("claim", {"max": defaults.MAX_CLAIM, "ahead": wish})
            link.claim_left, link.ahead_asked = defaults.MAX_CLAIM, wish
        if wish is not None and len(self.ahead) > wish:  # the newest go back to the queue
            for key in list(self.ahead)[wish:]:
                del self.ahead[key]
                self._give_back(key, "the worker's jobs run longer now: it holds fewer ahead")

    def _timers(self, now: float) -> None:
        link = self.link
        if now - link.last_heard > self.heartbeat * self.liveness and now >= link.next_connect:
            if link.trouble is None:
                log.warning("broker silent for %.1f s; reconnecting", now - link.last_heard)
            link.next_connect = now + link.backoff
            link.backoff = min(link.backoff * 2, defaults.RECONNECT_MAX)
            self._connect(now)
            return
        if self.policy.recheck(now):
            log.info("an account it refused exists now: registering again")
            self._connect(now)
            return
        if now >= link.next_heartbeat:
            usage = self.runner.usage(now)
            rows = [[j, t, *usage.get((j, t), (None, None))] for j, t in self._held()]
            self._send("heartbeat", {"running": rows})
            link.next_heartbeat = now + self.heartbeat
            if link.reclaim:
                link.claim_left, link.reclaim = 0, False
        for key, (payload, sent) in list(link.unacked.items()):
            if now - sent >= defaults.RESULT_RESEND:
                link.unacked[key] = (payload, now)
                self._send_raw(payload)

    def _send_raw(self, payload: bytes) -> None:
        assert self.sock is not None
        with contextlib.suppress(zmq.Again):
            self.sock.send(payload, zmq.NOBLOCK)

    def close(self) -> None:
        for key in self.runner.staged():
            self.runner.unstage(key)
        self._disconnect(linger=defaults.STOP_LINGER)  # a last `stopping` gets time to leave
        self._wakeup_r.close()
        self._wakeup_w.close()
        self.runner.launcher.close()
        if self.runner.cgroups is not None:
            self.runner.cgroups.close()
        os.close(self._lifeline)  # the watchdog sweeps (nothing, after a clean stop) and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.watchdog.wait(timeout=5)


def ahead_wanted(length: float | None, cpus: float) -> int:
    """How many jobs to ask the broker to hold ahead (SPEC §5): as many as `cpus` one-cpu slots
    run in AHEAD_HORIZON at the recent job `length`, so a slot that frees starts its next job
    without a round trip; none for jobs longer than that, or before any job has ended here."""
    if length is None:
        return 0
    slots = max(1, math.floor(cpus))
    return min(
        defaults.MAX_PREFETCH, math.floor(slots * defaults.AHEAD_HORIZON / max(length, 1e-4))
    )


def _moved(asked: int | None, wish: int | None) -> bool:
    """Whether `wish` differs enough from what the last claim asked to say it again."""
    if asked is None or wish is None or (asked == 0) != (wish == 0):
        return asked != wish
    return abs(wish - asked) * 4 > asked


def _launch(a: dict[str, Any], environment: dict[str, Any] | None, account: Account) -> Launch:
    """The runner's view of an `assign` entry."""
    return Launch(
        job=a["job"],
        token=a["token"],
        attempt=a["attempt"],
        command=a["command"],
        cwd=a["cwd"],
        env=dict(a["env"]),
        gpu_ids=list(a["gpu_ids"]),
        time_limit=a["time_limit"],
        cancel_grace=float(a["cancel_grace"]),
        output=a["output"],
        account=account,
        environment=environment,
        umask=a["umask"],
        cpus=float(a["cpus"]),
        memory=int(a["memory"]),
    )


def _running(n: int) -> str:
    return f"{n} running job{'' if n == 1 else 's'}"
