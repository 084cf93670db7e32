"""Banyan as an operator runs it: the installed programs, from a bare BANYAN_HOME, as real
processes (docs/operations.md). First start, both stop signals, duplicate names, a broker
killed under a waiting client, each key problem with its message and its time, a worker at
the wrong port, and forgetting workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq.auth

from banyan.client import Client
from banyan.errors import BrokerUnavailable
from tests.cluster import ALLOW_ROOT, _kill_tree, cannot_run, free_port, scaled, wait_for

BIN = Path(sys.executable).parent  # where `pip install` put the programs
HEARTBEAT, LIVENESS = 0.2, 5  # a one-second liveness window keeps these tests short
WINDOW = HEARTBEAT * LIVENESS
FAST = 1.5  # seconds within which a connection problem must be reported


@dataclass
class Ran:
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.out)


class Operator:
    """One machine's worth of Banyan: a BANYAN_HOME that does not exist yet, the broker and
    workers as the installed programs, and the tools run as a person would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.client_port, self.worker_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BANYAN_")}
        self.env.update(BANYAN_HOME=str(self.home), PYTHONUNBUFFERED="1")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: list[Client] = []

    def program(self, name: str) -> str:
        path = BIN / name
        assert path.exists(), f"{name} is not installed next to {sys.executable}"
        return str(path)

    def spawn(
        self, key: str, argv: list[str], env: dict[str, str] | None = None, session: bool = False
    ) -> Any:
        """Start an installed program (in a session of its own, as a login shell's job is,
        with `session`). A worker also runs root's jobs where the tests run as root: the
        broker's own admin key, which the tools use, is bound to this account."""
        if argv[0] == "banyan-worker":
            argv = [*argv, *ALLOW_ROOT]
        log = open(self.root / f"{key}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [self.program(argv[0]), *argv[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=session,
        )
        log.close()
        self.procs[key] = proc
        return proc

    def log(self, key: str) -> str:
        return (self.root / f"{key}.log").read_text(errors="replace")

    def start_broker(
        self, key: str = "broker", *extra: str, ports: tuple[int, int] = (0, 0)
    ) -> Any:
        client, worker = ports if ports != (0, 0) else (self.client_port, self.worker_port)
        argv = ["banyan-broker", "--client-port", str(client), "--worker-port", str(worker)]
        argv += ["--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS), *extra]
        proc = self.spawn(key, argv)
        wait_for(lambda: self._answers(client) or proc.poll() is not None, 20, what="the broker")
        assert proc.poll() is None, f"the broker exited {proc.returncode}:\n{self.log(key)}"
        return proc

    def _answers(self, port: int) -> bool:
        try:
            with Client(f"127.0.0.1:{port}", self.home, timeout=scaled(0.5)) as c:
                c.ping()
            return True
        except Exception:
            return False

    def start_worker(self, name: str | None, *extra: str, key: str = "", wait: bool = True) -> Any:
        argv = ["banyan-worker", "--broker", f"127.0.0.1:{self.worker_port}", "--cpus", "2"]
        argv += ["--memory", "1G", "--log-level", "debug", *extra]
        if name is not None:
            argv += ["--name", name]
        proc = self.spawn(key or name or "worker", argv)
        if wait and name is not None:
            wait_for(lambda: self.states().get(name) in ("idle", "busy"), 20, what=name)
        return proc

    def client(self) -> Client:
        c = Client(f"127.0.0.1:{self.client_port}", self.home, timeout=scaled(5))
        self.clients.append(c)
        return c

    def states(self) -> dict[str, str]:
        with Client(f"127.0.0.1:{self.client_port}", self.home, timeout=scaled(5)) as c:
            return {w.name: w.state for w in c.workers()}

    def run(self, tool: str, *args: str, env: dict[str, str] | None = None) -> Ran:
        """A tool as a person runs it, with this site's broker unless `env` says otherwise."""
        base = {"BANYAN_BROKER": f"127.0.0.1:{self.client_port}"}
        started = time.monotonic()
        done = subprocess.run(
            [self.program(f"banyan-{tool}"), *args],
            capture_output=True,
            text=True,
            env={**self.env, **base, **(env or {})},
            timeout=scaled(60),
        )
        return Ran(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    def stop(self) -> None:
        """Workers first, while their broker can still take their last reports; two signals
        (different ones, which the kernel cannot merge), so they cancel what they run."""
        for c in self.clients:
            c.close()
        brokers = [p for key, p in self.procs.items() if key.startswith(("broker", "plain"))]
        others = [p for p in self.procs.values() if p not in brokers]
        for group in (others, brokers):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGINT)
            for proc in group:
                try:
                    proc.wait(timeout=scaled(10))
                except subprocess.TimeoutExpired:
                    _kill_tree(proc.pid)
                    proc.wait(timeout=scaled(5))
        reap_orphans({p.pid for p in self.procs.values()})


def reap_orphans(known: set[int]) -> None:
    """Wait for, and reap, the daemons' helpers (a worker's watchdog and launcher) that came to
    this process when their daemon ended: a worker's runner made in-process by another test
    leaves pytest a child subreaper, and a zombie left here would fail later tests' checks."""
    orphans = [p for p in psutil.Process().children() if p.pid not in known]
    _, alive = psutil.wait_procs(orphans, timeout=scaled(10))
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=scaled(5))


@pytest.fixture
def op(tmp_path: Path) -> Iterator[Operator]:
    o = Operator(tmp_path)
    try:
        yield o
    finally:
        o.stop()


def job_row(op: Operator, job: int) -> dict[str, Any]:
    with Client(f"127.0.0.1:{op.client_port}", op.home, timeout=scaled(5)) as c:
        return dict(c.job(job).raw)


# ---- first start ------------------------------------------------------------------------------


def test_first_start_on_a_bare_home(op: Operator) -> None:
    assert not op.home.exists()
    op.start_broker()
    assert (op.home / "state").stat().st_mode & 0o777 == 0o700
    op.start_worker("w1")
    ran = op.run("submit", "--wait", "--", "echo hello from a fresh machine")
    assert ran.code == 0, ran.err
    (job,) = [int(x) for x in ran.out.split()]
    assert op.run("logs", str(job)).out == "hello from a fresh machine\n"


# ---- stopping a worker ------------------------------------------------------------------------


def test_sigterm_drains_and_a_second_signal_requeues_elsewhere(op: Operator) -> None:
    op.start_broker()
    a = op.start_worker("a")
    c = op.client()
    (first,) = c.submit("sleep 60", name="long").jobs
    wait_for(lambda: job_row(op, first)["state"] == "running", 20, what="the long job")
    a.send_signal(signal.SIGTERM)
    # The broker withdraws a's claim at once: a job submitted now waits for another worker.
    wait_for(lambda: op.states()["a"] == "draining", 2, what="a to show draining")
    (second,) = c.submit("echo second").jobs
    op.start_worker("b")
    assert c.wait([second], timeout=scaled(20)).jobs[0].succeeded
    assert job_row(op, second)["worker"] == "b"
    # The second signal cancels a's job; it runs again on b, spending no attempt.
    a.send_signal(signal.SIGINT)
    wait_for(lambda: job_row(op, first)["worker"] == "b", 20, what="the long job on b")
    assert a.wait(timeout=scaled(10)) == 0
    assert op.states()["a"] == "stopped"
    history = job_row(op, first)["history"]
    assert [h["worker"] for h in history] == ["a", "b"]
    assert history[0]["outcome"] == "cancelled"
    row = job_row(op, first)
    assert row["state"] == "running"
    # Two runs, one attempt spent: ATTEMPT reads 1/1 (docs/cli.md), not 2/1.
    assert (row["attempts"], row["counted"], row["max_attempts"]) == (2, 1, 1)
    shown = op.run("status")
    assert shown.code == 0 and " running  1/1 " in shown.out, shown.out
    log = op.log("a")
    assert "SIGTERM: draining; finishing 1 running job, claiming nothing new" in log
    assert "SIGINT again: cancelling 1 running job;" in log
    c.cancel([first])


def test_drain_by_an_admin_then_stop_and_forget(op: Operator) -> None:
    op.start_broker()
    a = op.start_worker("a")
    op.start_worker("b")
    ran = op.run("workers", "--drain", "a")
    assert ran.code == 0 and ran.out.startswith("a: drained"), ran
    (job,) = op.client().submit("true").jobs
    assert op.client().wait([job], timeout=scaled(20)).jobs[0].succeeded
    assert job_row(op, job)["worker"] == "b"
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=scaled(10)) == 0
    listed = op.run("workers")
    assert listed.code == 0 and "stopped" in listed.out.split("\n")[1], listed.out
    refused = op.run("workers", "--forget", "b")
    assert refused.code == 1 and "only a lost or stopped worker" in refused.err
    assert op.run("workers", "--forget", "a").code == 0
    assert set(op.states()) == {"b"}
    # An admin's drain outlives the worker: started again, it is still drained.
    op.run("workers", "--drain", "b")
    op.procs["b"].send_signal(signal.SIGTERM)
    assert op.procs["b"].wait(timeout=scaled(10)) == 0
    op.start_worker("b", key="b2", wait=False)
    wait_for(lambda: op.states().get("b") == "drained", 20, what="b back, drained")
    # One already stopped can be drained too, before it is started again (an upgrade).
    assert op.run("workers", "--resume", "b").code == 0
    op.procs["b2"].send_signal(signal.SIGTERM)
    assert op.procs["b2"].wait(timeout=scaled(10)) == 0
    ran = op.run("workers", "--drain", "b")
    assert ran.code == 0, ran
    assert ran.out.strip() == "b: stopped; it comes back drained when it registers again"
    op.start_worker("b", key="b3", wait=False)
    wait_for(lambda: op.states().get("b") == "drained", 20, what="b back, drained again")


def test_the_broker_says_when_a_worker_is_lost_and_where_its_jobs_went(op: Operator) -> None:
    op.start_broker()
    a = op.start_worker("a")
    (job,) = op.client().submit("sleep 60").jobs
    wait_for(lambda: job_row(op, job)["state"] == "running", 20, what="the job")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=scaled(10))
    wait_for(lambda: "worker a silent" in op.log("broker"), 20, what="the broker's log line")
    line = next(x for x in op.log("broker").splitlines() if "worker a silent" in x)
    assert f"lost; job {job} requeued" in line


# ---- identity ---------------------------------------------------------------------------------


def test_a_second_worker_with_a_live_name_is_refused(op: Operator) -> None:
    op.start_broker()
    first = op.start_worker(None, key="one")  # both take this host's name
    wait_for(lambda: len(op.states()) == 1, 20, what="the first worker")
    (name,) = op.states()
    second = op.start_worker(None, key="two", wait=False)
    assert second.wait(timeout=scaled(10)) == 1
    assert f"worker name {name!r} is in use by a live worker" in op.log("two")
    (job,) = op.client().submit("true").jobs
    assert op.client().wait([job], timeout=scaled(20)).jobs[0].succeeded
    assert op.log("broker").count(f"worker {name} registered") == 1
    said = [line for line in op.log("broker").splitlines() if "refused a second worker" in line]
    assert said, op.log("broker")
    assert f"named {name} from {name} at 127.0.0.1 (pid {second.pid}, key " in said[0]
    assert f"the one from {name} at 127.0.0.1 (pid {first.pid}, key " in said[0]
    assert "was heard from" in said[0] and "a name is free 1 s after" in said[0]
    # A crashed worker's name is free once its session has expired.
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=scaled(10))
    started = time.monotonic()
    wait_for(lambda: op.states()[name] == "lost", 20, what="the crash to be noticed")
    op.start_worker(name, key="three")
    assert time.monotonic() - started < scaled(10)


# ---- a wait across a broker restart -----------------------------------------------------------


def test_a_wait_survives_a_broker_kill9(op: Operator) -> None:
    op.start_broker()
    op.start_worker("w1")
    go = op.root / "go"
    waiting = op.spawn(
        "waiting",
        ["banyan-submit", "--wait", "--", f"while [ ! -e {go} ]; do sleep 0.05; done"],
        env={"BANYAN_BROKER": f"127.0.0.1:{op.client_port}"},
    )
    wait_for(lambda: op.log("waiting").split("\n")[0].isdigit(), 20, what="the job id")
    job = int(op.log("waiting").split("\n")[0])
    wait_for(lambda: job_row(op, job)["state"] == "running", 20, what="the job to run")
    op.procs["broker"].send_signal(signal.SIGKILL)
    op.procs["broker"].wait(timeout=scaled(10))
    op.start_broker("broker2")
    go.touch()
    assert waiting.wait(timeout=scaled(30)) == 0, op.log("waiting")
    assert "1 job ended, all succeeded" in op.log("waiting")


def test_a_worker_says_when_it_is_registered_again_and_with_what(op: Operator) -> None:
    """After an outage the worker's last word is that it is back, not the error."""
    op.start_broker()
    op.start_worker("w1")
    broker = f"tcp://127.0.0.1:{op.worker_port}"
    # Listed by the broker as it registers; its log line comes as the answer reaches it.
    first = f"INFO banyan.worker: registered with the broker at {broker}\n"
    wait_for(lambda: first in op.log("w1"), 20, what="the worker's first line")
    go = op.root / "go"
    (job,) = op.client().submit(f"until [ -e {go} ]; do sleep 0.05; done").jobs
    wait_for(lambda: job_row(op, job)["state"] == "running", 20, what="the job to run")
    op.procs["broker"].send_signal(signal.SIGKILL)
    op.procs["broker"].wait(timeout=scaled(10))
    wait_for(lambda: "broker silent" in op.log("w1"), 20, what="the worker to miss it")
    op.start_broker("broker2")
    again = f"INFO banyan.worker: registered again with the broker at {broker} (1 running job "
    wait_for(lambda: again + "re-attached)" in op.log("w1"), 20, what="the worker's line")
    go.touch()
    assert op.client().wait([job], timeout=scaled(20)).jobs[0].succeeded


def test_a_fenced_worker_says_once_per_attempt_that_it_is_not_its_own(op: Operator) -> None:
    """A worker frozen past the liveness window: the broker requeues its job, and answers each
    of its reports about the old attempt with a kill. The worker says so once."""
    op.start_broker()
    a = op.start_worker("a")
    c = op.client()
    (job,) = c.submit("echo 50 half > $BANYAN_PROGRESS_FILE; sleep 60").jobs
    wait_for(lambda: job_row(op, job)["state"] == "running", 20, what="the job to run")
    a.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: op.states()["a"] == "lost", 20, what="a to be lost")
    finally:
        a.send_signal(signal.SIGCONT)
    wait_for(lambda: "registered again" in op.log("a"), 20, what="a back")
    # Every report a sent about the old attempt has been answered once the job runs again.
    wait_for(lambda: job_row(op, job)["attempts"] == 2, 20, what="the job to run again")
    assert op.log("a").count(f"job {job} token ") == 1, op.log("a")
    c.cancel([job])


def test_the_broker_counts_ordinary_refusals_apart(op: Operator) -> None:
    op.start_broker()
    assert op.run("modify", "--priority", "3", "999").code == 1
    said = "refused 1 message so far: 0 key handshakes, 0 malformed, 1 request answered with a "
    wait_for(lambda: said + "refusal (no such job" in op.log("broker"), 10, what="the count")


def _unread_bytes(port: int) -> int:
    """Bytes the kernel holds for the broker's reading on its client port (/proc/net/tcp)."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            total += int(fields[4].split(":")[1], 16)
    return total


def test_a_change_on_its_way_when_the_broker_restarts_is_not_waited_for(op: Operator) -> None:
    """A submission sent to a broker that dies before reading it: the restarted broker answers
    pings but never that request, so the client says so instead of waiting forever."""
    broker = op.start_broker()
    c = op.client()
    c.timeout = scaled(1)
    c.ping()
    broker.send_signal(signal.SIGSTOP)
    box: dict[str, Any] = {}

    def submit() -> None:
        try:
            box["jobs"] = c.submit("true", submit_key="on-its-way").jobs
        except BrokerUnavailable as e:
            box["error"] = str(e)

    api = threading.Thread(target=submit)
    try:
        api.start()
        wait_for(lambda: _unread_bytes(op.client_port) > 0, 10, what="the request to arrive")
    finally:
        broker.send_signal(signal.SIGKILL)
        broker.send_signal(signal.SIGCONT)
    broker.wait(timeout=scaled(10))
    op.start_broker("broker2")
    api.join(timeout=scaled(20))
    assert not api.is_alive(), "the submission is still waited for"
    assert "restarted while the submit was on its way" in box["error"], box
    # A submit key makes sending it again safe: the broker never had it, so now it has it once.
    again = op.client().submit("true", submit_key="on-its-way").jobs
    assert len(again) == 1


def test_a_request_whose_broker_went_away_says_so(op: Operator) -> None:
    """The broker dies with a request on its way and is not back: the tool is told that the
    connection closed, not that a broker there is overloaded."""
    broker = op.start_broker()
    c = op.client()
    c.timeout = scaled(1)
    c.ping()
    broker.send_signal(signal.SIGKILL)
    broker.wait(timeout=scaled(10))
    with pytest.raises(BrokerUnavailable) as e:
        c.workers()
    assert "its connection closed: banyan-broker stopped or restarted there" in str(e.value)
    assert "overloaded" not in str(e.value)


def test_a_second_broker_on_the_same_state_is_refused(op: Operator) -> None:
    """A second banyan-broker on a live one's state directory (other ports: a test start, a
    second unit) refuses to start and changes nothing: the live one's workers stay."""
    broker = op.start_broker()
    op.start_worker("w1")
    argv = ["banyan-broker", "--client-port", str(free_port()), "--worker-port"]
    second = op.spawn("second", [*argv, str(free_port())])
    assert second.wait(timeout=scaled(20)) == 1
    said = f"is in use by another broker (pid {broker.pid}): one broker per state directory"
    assert said in op.log("second"), op.log("second")
    assert "state loaded" not in op.log("second")
    assert op.states() == {"w1": "idle"}
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=scaled(20)) == 0
    op.start_broker("broker2")  # once it has stopped, its state is free
    wait_for(lambda: op.states().get("w1") == "idle", 20, what="w1 back")


def test_a_wait_outlives_an_outage_longer_than_its_timeout(op: Operator) -> None:
    """A broker away for longer than the tool's --timeout (an upgrade, a slow restart): the
    waiting tool says so once, waits on, and ends with the job's outcome."""
    op.start_broker()
    op.start_worker("w1")
    go = op.root / "go"
    argv = [
        "banyan-submit",
        "--timeout",
        "1",
        "--wait",
        "--",
        f"until [ -e {go} ]; do sleep 0.05; done",
    ]
    waiting = op.spawn("waiting", argv, env={"BANYAN_BROKER": f"127.0.0.1:{op.client_port}"})
    wait_for(lambda: op.log("waiting").split("\n")[0].isdigit(), 20, what="the job id")
    job = int(op.log("waiting").split("\n")[0])
    wait_for(lambda: job_row(op, job)["state"] == "running", 20, what="the job to run")
    c = op.client()
    c.timeout = 0.5
    c.ping()  # a client that has reached its broker: a wait then outlives its absence
    notices: list[str] = []
    box: dict[str, Any] = {}
    api = threading.Thread(target=lambda: box.update(w=c.wait([job], notice=notices.append)))
    api.start()
    op.procs["broker"].send_signal(signal.SIGKILL)
    op.procs["broker"].wait(timeout=scaled(10))
    # Away for longer than both timeouts: until the tool has said it is still waiting.
    wait_for(lambda: "unreachable" in op.log("waiting"), 10, what="the tool's notice")
    wait_for(lambda: notices, 10, what="the API's notice")
    assert waiting.poll() is None and api.is_alive()
    op.start_broker("broker2")
    go.touch()
    assert waiting.wait(timeout=scaled(30)) == 0, op.log("waiting")
    api.join(timeout=scaled(30))
    assert box["w"].jobs[0].succeeded and not box["w"].timed_out
    said = op.log("waiting").splitlines()
    (gone,) = [x for x in said if "unreachable" in x]
    assert gone.startswith(f"banyan-submit: the broker at tcp://127.0.0.1:{op.client_port} is ")
    assert "still waiting" in gone
    assert said[-1] == "banyan-submit: 1 job ended, all succeeded"
    assert "is unreachable" in notices[0] and "answers again" in notices[-1]


def test_a_client_that_found_the_broker_gone_works_once_it_is_back(op: Operator) -> None:
    """What its connection's monitor said while the broker was away (nothing listening) is
    over once it has connected again: it is not reported then."""
    op.start_broker()
    c = op.client()
    c.ping()
    c.timeout = 0.5
    op.procs["broker"].send_signal(signal.SIGKILL)
    op.procs["broker"].wait(timeout=scaled(10))
    with pytest.raises(BrokerUnavailable, match="no answer from the broker"):
        c.ping()  # then it connects anew
    # The new connection has failed again meanwhile (the broker is still away) ...
    wait_for(lambda: c.watch.monitor.poll(0), 10, what="a failed connection attempt")
    op.start_broker("broker2")
    assert c.ping()  # ... and then succeeded


def test_a_bounded_wait_ends_in_time_while_the_broker_is_away(op: Operator) -> None:
    op.start_broker()
    c = op.client()
    (job,) = c.submit("true", hold=True).jobs
    c.timeout = 0.5
    op.procs["broker"].send_signal(signal.SIGKILL)
    op.procs["broker"].wait(timeout=scaled(10))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="still unreachable when the wait's 2 s ran out"):
        c.wait([job], timeout=2)
    assert 2 <= time.monotonic() - started < 2 + scaled(1)


def test_a_waiting_tool_whose_key_is_refused_after_a_restart_ends_at_once(op: Operator) -> None:
    op.start_broker()
    alice = keygen(op, "user", "alice")
    home = machine(
        op, "alice", {"client.key_secret": alice, "broker.key": op.home / "keys" / "broker.key"}
    )
    env = {"BANYAN_HOME": str(home), "BANYAN_BROKER": f"127.0.0.1:{op.client_port}"}
    waiting = op.spawn(
        "waiting", ["banyan-submit", "--timeout", "1", "--wait", "--hold", "true"], env=env
    )
    wait_for(lambda: op.log("waiting").split("\n")[0].isdigit(), 20, what="the job id")
    op.procs["broker"].send_signal(signal.SIGKILL)
    op.procs["broker"].wait(timeout=scaled(10))
    (op.home / "keys" / "authorized" / "user" / "alice.key").unlink()
    wait_for(lambda: "unreachable" in op.log("waiting"), 10, what="the tool's notice")
    op.start_broker("broker2")
    started = time.monotonic()
    assert waiting.wait(timeout=scaled(30)) == 3
    assert time.monotonic() - started < scaled(FAST) + 1  # + a reconnection's backoff
    assert "refused this key" in op.log("waiting").splitlines()[-1]


# ---- keys -------------------------------------------------------------------------------------


def machine(op: Operator, name: str, files: dict[str, Path | None]) -> Path:
    """Another machine's BANYAN_HOME with the given files in keys/ (None: a made-up key)."""
    home = op.root / f"home-{name}"
    (home / "keys").mkdir(parents=True)
    for target, source in files.items():
        if source is None:
            zmq.auth.create_certificates(home / "keys", "made-up")
            source = home / "keys" / "made-up.key_secret"
        shutil.copyfile(source, home / "keys" / target)
        if target.endswith("_secret"):  # as the README says to install one
            (home / "keys" / target).chmod(0o600)
    return home


def keygen(op: Operator, role: str, name: str) -> Path:
    ran = op.run("keygen", "--json", role, name)
    assert ran.code == 0, ran.err
    return Path(ran.json()["secret"])


def test_each_key_problem_is_named_within_a_second(op: Operator) -> None:
    op.start_broker()
    keys = op.home / "keys"
    alice = keygen(op, "user", "alice")
    node = keygen(op, "worker", "node7")
    cases: list[tuple[str, Path, str]] = [
        ("no keys at all", machine(op, "bare", {}), "requires a key and this machine has none"),
        (
            "no client key",
            machine(op, "half", {"broker.key": keys / "broker.key"}),
            "client.key_secret is missing",
        ),
        (
            "a wrong broker.key",
            machine(op, "wrong", {"client.key_secret": alice, "broker.key": None}),
            "broker.key is not its public key",
        ),
        (
            "a worker key used as a client key",
            machine(op, "mixed", {"client.key_secret": node, "broker.key": keys / "broker.key"}),
            "knows this key, but not on this port",
        ),
    ]
    revoked = machine(
        op, "revoked", {"client.key_secret": alice, "broker.key": keys / "broker.key"}
    )
    assert op.run("status", env={"BANYAN_HOME": str(revoked)}).code == 0
    (keys / "authorized" / "user" / "alice.key").unlink()
    cases.append(("a revoked key", revoked, "refused this key"))
    for what, home, words in cases:
        ran = op.run("status", "--timeout", "10", env={"BANYAN_HOME": str(home)})
        assert ran.code == 3, (what, ran)
        assert words in ran.err and ran.err.count("\n") == 1, (what, ran.err)
        assert ran.seconds < scaled(FAST) + 0.5, (what, ran.seconds)  # + the tool's start-up
    missing = op.run("status", env={"BANYAN_HOME": str(cases[0][1])})
    assert "banyan-keygen user NAME" in missing.err
    as_json = op.run("status", "--json", env={"BANYAN_HOME": str(revoked)})
    assert as_json.code == 3 and json.loads(as_json.err)["error"] == "key_refused"
    # Half a set of keys is found before connecting: even with no broker there.
    nowhere = {"BANYAN_HOME": str(cases[1][1]), "BANYAN_BROKER": f"127.0.0.1:{free_port()}"}
    assert "client.key_secret is missing" in op.run("status", env=nowhere).err


def test_a_keyed_tool_and_a_keyless_broker(op: Operator) -> None:
    ports = (free_port(), free_port())
    plain = str(op.root / "plain-state")
    op.start_broker("plain", "--insecure", "--state-dir", plain, ports=ports)
    ran = op.run("status", env={"BANYAN_BROKER": f"127.0.0.1:{ports[0]}"})  # before keys exist
    assert ran.code == 0, ran.err
    op.start_broker()  # makes this home's keys
    ran = op.run("status", "--timeout", "10", env={"BANYAN_BROKER": f"127.0.0.1:{ports[0]}"})
    assert ran.code == 3 and "runs without keys (--insecure)" in ran.err, ran
    assert ran.seconds < scaled(FAST) + 0.5


def test_no_broker_at_the_address(op: Operator) -> None:
    for where, words in (
        (f"127.0.0.1:{free_port()}", "nothing is listening at tcp://127.0.0.1:"),
        ("no-such-host.invalid", "cannot find the broker's host 'no-such-host.invalid'"),
    ):
        ran = op.run("status", "--timeout", "10", env={"BANYAN_BROKER": where})
        assert ran.code == 3 and words in ran.err, ran
        assert ran.seconds < scaled(FAST) + 0.5


def isolated(op: Operator, setup: str, tool: str, *args: str) -> Ran:
    """A tool run in a network namespace of its own, made by `setup` (ip commands)."""
    script = f'ip link set lo up && {setup} && exec "$@"'
    argv = ["unshare", "--net", "sh", "-c", script, "sh", op.program(f"banyan-{tool}"), *args]
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**op.env, "BANYAN_HOME": str(op.root / "no-keys")},
        timeout=scaled(60),
    )
    return Ran(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


VETH = (
    "ip link add vta type veth peer name vtb && ip addr add 10.1.0.1/24 dev vta && "
    "ip link set vta up && ip link set vtb up"
)


def test_when_the_network_is_at_fault_the_tools_say_so(op: Operator) -> None:
    """Only a real refusal is `connection refused`; a missing route, a machine that is not
    there and packets that are dropped are each named as what they are."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        cannot_run("it needs root, unshare and ip, for a network namespace of its own")
    cases = [
        ("ip route add unreachable 192.0.2.1", "192.0.2.1", "no route to host (is that"),
        ("true", "198.51.100.1", "network is unreachable (this machine has no route"),
        # No machine answers for 10.1.0.9 on that link: the kernel gives up after 3 s.
        (VETH, "10.1.0.9", "connecting got no answer (is that machine up"),
    ]
    for setup, host, words in cases:
        ran = isolated(op, setup, "status", "--broker", f"{host}:7411", "--timeout", "10")
        said = f"banyan-status: cannot reach the broker at tcp://{host}:7411: {words}"
        assert ran.code == 3 and ran.err.startswith(said) and ran.err.count("\n") == 1, ran
    # Packets dropped on the way (to a made-up address): nothing ever fails; time runs out.
    drop = f"{VETH} && ip neigh add 10.1.0.9 lladdr 02:00:00:00:00:09 dev vta nud permanent"
    ran = isolated(op, drop, "status", "--broker", "10.1.0.9:7411", "--timeout", "1")
    said = "banyan-status: no answer from the broker at tcp://10.1.0.9:7411 within 1 s (no "
    assert ran.code == 3 and ran.err.startswith(said + "connection could be made"), ran


def test_a_worker_says_when_the_network_is_at_fault_and_keeps_trying(op: Operator) -> None:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        cannot_run("it needs root, unshare and ip, for a network namespace of its own")
    script = 'ip link set lo up && ip route add unreachable 192.0.2.1 && exec "$@"'
    worker = [op.program("banyan-worker"), "--broker", "192.0.2.1", "--name", "far"]
    worker += ["--spool", str(op.root / "spool"), "--log-level", "debug"]
    with open(op.root / "far.log", "ab") as log:
        op.procs["far"] = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", script, "sh", *worker],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**op.env, "BANYAN_HOME": str(op.root / "no-keys")},
        )
    said = "ERROR banyan.worker: cannot reach the broker at tcp://192.0.2.1:7412: no route to host"
    wait_for(lambda: said in op.log("far"), 10, what="the worker's log line")
    assert op.procs["far"].poll() is None  # it keeps trying


def test_a_broker_that_does_not_answer_is_said_one_way(op: Operator) -> None:
    """A stopped broker (SIGSTOP): the same words from every tool, the timeout as given."""
    broker = op.start_broker()
    broker.send_signal(signal.SIGSTOP)
    try:
        for tool, args in (("submit", ["true"]), ("status", []), ("status", ["1"])):
            ran = op.run(tool, "--timeout", "1", *args)
            said = f"banyan-{tool}: no answer from the broker at tcp://127.0.0.1:"
            assert ran.code == 3 and ran.err.startswith(said), ran
            assert " within 1 s (it took the connection but never answered" in ran.err, ran
    finally:
        broker.send_signal(signal.SIGCONT)


def test_a_worker_with_a_refused_key_says_so_and_exits_3(op: Operator) -> None:
    op.start_broker()
    stranger = machine(
        op, "stranger", {"worker.key_secret": None, "broker.key": op.home / "keys" / "broker.key"}
    )
    proc = op.spawn(
        "stranger",
        ["banyan-worker", "--broker", f"127.0.0.1:{op.worker_port}", "--name", "s"],
        env={"BANYAN_HOME": str(stranger)},
    )
    assert proc.wait(timeout=scaled(10)) == 3
    assert "the broker at tcp://127.0.0.1:" in op.log("stranger")
    assert "refused this worker's key" in op.log("stranger")
    assert "broker silent" not in op.log("stranger")


# ---- ports ------------------------------------------------------------------------------------


def test_banyan_broker_names_the_client_port_for_tools_and_workers(op: Operator) -> None:
    op.start_broker()
    shared = {
        "BANYAN_BROKER": f"127.0.0.1:{op.client_port}",
        "BANYAN_WORKER_PORT": str(op.worker_port),
    }
    op.spawn("w1", ["banyan-worker", "--name", "w1", "--cpus", "1"], env=shared)
    wait_for(lambda: op.states().get("w1") == "idle", 20, what="w1 with BANYAN_BROKER")
    assert op.run("submit", "--wait", "true", env=shared).code == 0
    # A worker pointed at the tools' port is told so and stops at once.
    wrong = op.spawn(
        "wrong", ["banyan-worker", "--name", "w2", "--broker", f"127.0.0.1:{op.client_port}"]
    )
    assert wrong.wait(timeout=scaled(10)) == 3
    assert "this is its client port" in op.log("wrong")
    # A malformed address is a usage error, for tools and workers alike.
    bad = {"BANYAN_BROKER": "127.0.0.1:abc"}
    ran = op.run("status", env=bad)
    assert ran.code == 2 and "BANYAN_BROKER: '127.0.0.1:abc' is not HOST[:PORT]" in ran.err
    worker = subprocess.run(
        [op.program("banyan-worker")],
        env={**op.env, **bad},
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert worker.returncode == 2 and "is not HOST[:PORT]" in worker.stderr


def test_a_broker_bound_to_no_address_of_this_machine_says_so(op: Operator) -> None:
    argv = ["banyan-broker", "--insecure", "--bind", "nosuch.invalid"]
    argv += ["--client-port", str(op.client_port), "--worker-port", str(op.worker_port)]
    broker = op.spawn("broker", argv)
    assert broker.wait(timeout=scaled(20)) == 1
    said = f"cannot listen on nosuch.invalid (ports {op.client_port}, {op.worker_port}): it is "
    assert said + "no address or network interface of this machine" in op.log("broker")


def test_a_worker_at_the_client_port_of_a_keyless_broker(op: Operator) -> None:
    op.start_broker("broker", "--insecure")
    wrong = op.spawn(
        "wrong", ["banyan-worker", "--name", "w2", "--broker", f"127.0.0.1:{op.client_port}"]
    )
    assert wrong.wait(timeout=scaled(10)) == 3
    assert "this is the broker's client port; workers connect to its other port" in op.log("wrong")


def test_a_worker_broker_without_a_port_takes_banyan_worker_port(op: Operator) -> None:
    op.start_broker()
    env = {"BANYAN_WORKER_PORT": str(op.worker_port)}
    op.spawn("w1", ["banyan-worker", "--broker", "127.0.0.1", "--name", "w1"], env=env)
    wait_for(lambda: op.states().get("w1") == "idle", 20, what="w1 at BANYAN_WORKER_PORT")
    assert f"-> tcp://127.0.0.1:{op.worker_port}" in op.log("w1")
    # A bad value is a usage error that calls it a port.
    bad = {**op.env, "BANYAN_WORKER_PORT": "abc"}
    worker = subprocess.run(
        [op.program("banyan-worker"), "--broker", "127.0.0.1"],
        env=bad,
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert worker.returncode == 2
    assert worker.stderr.startswith("banyan-worker: BANYAN_WORKER_PORT: 'abc' is not a port")


def test_the_daemons_make_a_missing_banyan_home_private(op: Operator) -> None:
    """Under an ordinary umask, as `$BANYAN_HOME` is documented: only its account may enter."""
    worker_home = op.root / "worker-home"
    before = os.umask(0o022)
    try:
        op.start_broker("broker", "--insecure")
        argv = ["banyan-worker", "--broker", f"127.0.0.1:{op.worker_port}", "--name", "w1"]
        spool = ["--spool", str(worker_home / "spool" / "w1")]
        op.spawn("w1", [*argv, *spool], env={"BANYAN_HOME": str(worker_home)})
    finally:
        os.umask(before)
    wait_for(lambda: op.states().get("w1") == "idle", 20, what="w1")
    assert (op.home.stat().st_mode & 0o777, worker_home.stat().st_mode & 0o777) == (0o700, 0o700)


def test_a_hangup_is_logged_and_ignored_by_both_daemons(op: Operator) -> None:
    """A worker started from a shell whose terminal closes (the kernel's SIGHUP reaches its
    whole process group) goes on, and so do its jobs; so does a broker sent `kill -HUP`."""
    broker = op.start_broker()
    argv = ["banyan-worker", "--broker", f"127.0.0.1:{op.worker_port}", "--name", "w1"]
    worker = op.spawn("w1", argv, session=True)
    wait_for(lambda: op.states().get("w1") == "idle", 20, what="w1")
    go = op.root / "go"
    c = op.client()
    (job,) = c.submit(f"while [ ! -e {go} ]; do sleep 0.05; done").jobs
    wait_for(lambda: job_row(op, job)["state"] == "running", 20, what="the job to run")
    os.killpg(worker.pid, signal.SIGHUP)
    broker.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP ignored" in op.log("w1"), 10, what="the worker's log line")
    wait_for(lambda: "SIGHUP ignored" in op.log("broker"), 10, what="the broker's log line")
    assert worker.poll() is None and broker.poll() is None
    go.touch()
    assert c.wait([job], timeout=scaled(20)).jobs[0].succeeded
    assert op.states()["w1"] == "idle"
