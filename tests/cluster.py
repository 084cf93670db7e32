"""Real brokers and workers as subprocesses on loopback, for integration tests.

Every process started here is stopped by its PID. Deadlines scale with BANYAN_TIME_FACTOR.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import psutil
import pytest

from banyan import keys
from banyan.broker.store import Store
from banyan.client import Client
from banyan.worker.cgroups import Cgroups

TIME_FACTOR = float(os.environ.get("BANYAN_TIME_FACTOR", "1"))
HEARTBEAT = 0.2  # fast heartbeats keep liveness tests short: a 1 s window
ALLOW_ROOT = ("--allow-root-jobs",) if os.geteuid() == 0 else ()
LIVENESS = 5
T = TypeVar("T")


def scaled(seconds: float) -> float:
    return seconds * TIME_FACTOR


def wait_for(
    cond: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `cond` until it returns something truthy; bounded in time and in count."""
    deadline = time.monotonic() + scaled(timeout)
    for _ in range(int(scaled(timeout) / interval) + 10):
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {scaled(timeout):g} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A broker plus workers; `stop()` ends every process it started, by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.client_port = free_port()
        self.worker_port = free_port()
        self.state_dir = root / "state"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.home = root / "home"
        self.env = {**os.environ, "BANYAN_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.clients: list[Client] = []
        # Hooks for fault tests: where this process reaches the broker, extra broker options,
        # a command prefix per program (e.g. `ip netns exec NS`), each worker's broker host.
        self.host = "127.0.0.1"
        self.broker_args: list[str] = []
        self.prefix: dict[str, list[str]] = {}
        self.worker_hosts: dict[str, str] = {}

    def _spawn(self, key: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{key}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            [*self.prefix.get(key, []), sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        self.procs[key] = proc
        return proc

    def start_broker(self, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            "broker",
            [
                "banyan.cli.broker",
                "--client-port",
                str(self.client_port),
                "--worker-port",
                str(self.worker_port),
                "--state-dir",
                str(self.state_dir),
                "--heartbeat",
                str(HEARTBEAT),
                "--liveness",
                str(LIVENESS),
                "--log-level",
                "debug",
                *self.broker_args,
            ],
        )
        if wait:
            wait_for(self._pings, 20, what="the broker to answer")
        return proc

    def _pings(self) -> bool:
        try:
            with Client(f"{self.host}:{self.client_port}", self.home, timeout=0.5) as c:
                c.ping()
            return True
        except Exception:
            return False

    def start_worker(
        self,
        name: str,
        cpus: float = 2,
        memory: int = 1000,
        gpus: int = 0,
        tags: tuple[str, ...] = (),
        wait: bool = True,
        extra: tuple[str, ...] = ALLOW_ROOT,
    ) -> subprocess.Popen[bytes]:
        """A worker; `extra` options go last. By default it runs root's jobs where the tests
        run as root: the cluster's own admin key is bound to the account running the tests."""
        args = [
            "banyan.cli.worker",
            "--broker",
            f"{self.worker_hosts.get(name, '127.0.0.1')}:{self.worker_port}",
            "--name",
            name,
            "--cpus",
            str(cpus),
            "--memory",
            str(memory),
            "--gpus",
            str(gpus),
            "--spool",
            str(self.root / "spool" / name),
            "--log-level",
            "debug",
        ]
        for t in tags:
            args += ["--tag", t]
        proc = self._spawn(name, [*args, *extra])
        if wait:
            self.wait_worker(name)
        return proc

    def wait_worker(self, name: str, state: str = "idle") -> None:
        def ready() -> bool:
            return any(
                w.name == name and w.state in (state, "busy") for w in self.client().workers()
            )

        wait_for(ready, 20, what=f"worker {name} to register")

    def client(self, timeout: float = 5.0) -> Client:
        c = Client(f"{self.host}:{self.client_port}", self.home, timeout=scaled(timeout))
        self.clients.append(c)
        return c

    def user_client(self, name: str, timeout: float = 5.0) -> Client:
        """A client with a user key of its own, as `banyan-keygen user NAME` makes it (bound
        to the account NAME, which need not exist for jobs that never run)."""
        _, secret, _ = keys.issue(self.home, "user", name)
        home = self.root / f"client-{name}"
        (home / "keys").mkdir(parents=True)
        shutil.copyfile(secret, home / "keys" / "client.key_secret")
        os.chmod(home / "keys" / "client.key_secret", 0o600)
        shutil.copyfile(self.home / "keys" / "broker.key", home / "keys" / "broker.key")
        c = Client(f"{self.host}:{self.client_port}", home, timeout=scaled(timeout))
        self.clients.append(c)
        return c

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[key]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=scaled(20))

    def dump(self, restart: bool = True) -> bytes:
        """The job, group, attempt and edge records, read with the broker stopped."""
        self.kill("broker", signal.SIGTERM)
        store = Store(self.state_dir)
        try:
            return store.dump()
        finally:
            store.close()
            if restart:
                self.start_broker()

    def log(self, key: str) -> str:
        return (self.root / f"{key}.log").read_text(errors="replace")

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for _key, proc in self.procs.items():
            if proc.poll() is None:
                _cont(proc.pid)
                proc.send_signal(signal.SIGTERM)
        for _key, proc in self.procs.items():
            try:
                proc.wait(timeout=scaled(5))
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait(timeout=scaled(5))


def _cont(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def pids_with_marker(marker: str) -> list[int]:
    """Processes whose command line carries `marker`: how tests find what a job left behind."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or ()):
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def have_cgroups() -> bool:
    """Whether a worker on this machine gets a cgroup per job (cgroup2, writable)."""
    probe = Cgroups.make(f"probe-{os.getpid()}")
    if probe is None:
        return False
    probe.close()
    return True


def in_ci() -> bool:
    """Whether this run is CI's (CI set, as every CI service sets it): there every test must
    run its real scenario, since a skip would hide a broken environment."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cannot_run(why: str) -> NoReturn:
    """This machine cannot run the test's real scenario: skip here, fail under CI. The one way
    a test of this suite may skip."""
    if in_ci():
        pytest.fail(f"CI must run this test's real scenario, but {why}", pytrace=False)
    pytest.skip(why)


def shrunk(why: str) -> None:
    """The test is about to run less than its real scenario: fail under CI, go on here."""
    if in_ci():
        pytest.fail(f"CI must run this test's whole scenario, but {why}", pytrace=False)


def need_cgroups() -> None:
    """A cgroup per job is what the test is about: without one, `cannot_run`."""
    if not have_cgroups():
        cannot_run("there is no writable cgroup2 hierarchy here (it needs cgroup v2 and root)")


@contextlib.contextmanager
def pinging(cluster: Cluster) -> Iterator[list[float]]:
    """A client pinging every 50 ms meanwhile; yields the latencies (s) as they come."""
    latencies: list[float] = []
    stop = threading.Event()

    def pinger() -> None:
        with Client(f"127.0.0.1:{cluster.client_port}", cluster.home, timeout=scaled(10)) as p:
            for _ in range(100_000):
                if stop.is_set():
                    return
                started = time.monotonic()
                p.ping()
                latencies.append(time.monotonic() - started)
                stop.wait(0.05)

    thread = threading.Thread(target=pinger)
    thread.start()
    try:
        wait_for(lambda: latencies, what="the first ping")
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=scaled(20))
