"""Celery + Redis and HyperQueue as references beside Banyan, in the same run, round by round.

W1-W3 (throughput.py, latency.py, overhead.py) start each peer once, warm it up, and then in
every round run the same workload through xargs, Banyan and each peer in turn, so that all of
them meet the same neighbours on the machine. The ratios between them are the figures.

- **Celery + Redis**: a `redis-server` of its own on loopback (no snapshots, no append-only
  file), broker and result backend; one `celery worker` with the prefork pool and 2 processes,
  otherwise Celery's defaults. A job is a task that runs `/bin/sh -c COMMAND`.
- **HyperQueue**: its server and one worker with 2 cpus, both threads of one process (the
  PyPI wheel carries them; there is no `hq` binary), without a journal, in network and UTS
  namespaces of their own with only loopback: the server listens on every interface. A job is
  one task running `/bin/sh -c COMMAND`, its output in files, as HyperQueue does by default.

The clients run in bench/peers/.venv (see driver.py), which `make bench-peers-setup` makes.
Neither peer is durable as run; Banyan fsyncs every change before it acknowledges it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil

from bench.common import ROOT, Report, _kill_tree, free_port, wait_for
from bench.peers import install
from bench.peers.driver import READY

PEERS = ("celery", "hyperqueue")
LABELS = {"celery": "Celery + Redis", "hyperqueue": "HyperQueue"}
DRIVER = Path(__file__).with_name("driver.py")
SLOTS = 2
T = TypeVar("T")

NOT_DURABLE = (
    "neither peer is durable as run: Redis keeps Celery's queue and results in memory only "
    "(no snapshots, no append-only file) and HyperQueue runs without its journal; Banyan "
    "fsyncs every change before it acknowledges it"
)
SETUP = {
    "celery": "Celery + Redis: prefork pool, 2 processes, Celery's defaults otherwise (prefetch "
    "multiplier 4, early acknowledgement); broker and result backend on one loopback Redis; "
    "a job is a task running /bin/sh -c COMMAND, its output not kept",
    "hyperqueue": "HyperQueue: server and one 2-cpu worker in one process (the wheel's "
    "LocalCluster), in a network namespace with only loopback; a job is a task running "
    "/bin/sh -c COMMAND, its output in files; the client probes completion with one JobInfo "
    "request every 1 ms for a batch and 0.2 ms for a single job (HyperQueue's own wait asks "
    "once a second)",
}


def add_argument(p: Any) -> None:
    p.add_argument(
        "--peers",
        default="auto",
        metavar="LIST",
        help="peers to run beside Banyan: 'auto' (those `make bench-peers-setup` made ready; "
        "the others are named in the notes), 'none', or a comma-separated list of "
        f"{', '.join(PEERS)} that must all run",
    )


def not_ready(name: str) -> str | None:
    """Why the peer cannot run here, or None when it can."""
    if not install.stamp(name).exists():
        return "not set up (make bench-peers-setup)"
    if name == "celery" and not _which("redis-server"):
        return "redis-server is not on PATH (make bench-peers-setup)"
    return None


def _which(program: str) -> bool:
    return any(
        os.access(os.path.join(d, program), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    )


def round_robin(i: int, steps: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Each step once, starting round i at the i-th, so no system always goes first or last."""
    names = list(steps)
    k = i % len(names)
    return {name: steps[name]() for name in names[k:] + names[:k]}


# ---- the peers ---------------------------------------------------------------------------------


class Peer:
    """A peer's services and its client, started once and used for every round."""

    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client: Client | None = None

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def start(self) -> None:
        raise NotImplementedError

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far: by each service, and by the jobs (key "jobs")."""
        raise NotImplementedError

    def batch(self, n: int, command: str, deadline: float = 600) -> float:
        """Seconds from submitting n jobs at once to the last one's end."""
        assert self.client
        return float(self.client.request("batch", n=n, command=command, deadline=deadline))

    def sequential(self, n: int, command: str = "true", deadline: float = 60) -> list[float]:
        """Submit → finish of n jobs, each submitted when the one before has ended."""
        assert self.client
        answer = self.client.request("sequential", n=n, command=command, deadline=deadline)
        return [float(s) for s in answer]

    def spawn(self, key: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        with open(self.root / f"{key}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=self.env, **kw
            )
        self.procs[key] = proc
        return proc

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def log_tail(self, key: str) -> str:
        path = self.root / f"{key}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """The client first (end of its input), then the services in reverse order: the end of
        its input or SIGTERM, a wait, and SIGKILL for the process tree of any that is left."""
        if self.client:
            self.client.close()
            self.client = None
        for key in reversed(list(self.procs)):
            proc = self.procs.pop(key)
            if proc.stdin:  # HyperQueue's cluster stops when its input ends
                proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait(timeout=5)


class Client:
    """driver.py's client, in the peers' venv: one JSON request and answer per line."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
            )

    def request(self, op: str, deadline: float, **body: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, "deadline": deadline, **body}).encode())
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        line = _readline(self.proc.stdout, deadline + 30)
        if not line:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the peer's client ended or did not answer; {self.log}:\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{op}: {answer['error']} (see {self.log.parent})")
        return answer["seconds"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else b""


class CeleryPeer(Peer):
    name = "celery"

    def start(self) -> None:
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.root), "--daemonize", "no"]
        self.spawn("redis", argv)
        wait_for(lambda: self._listens(port), 30, "redis-server to listen")
        self.redis = f"redis://127.0.0.1:{port}"
        argv = [str(install.PYTHON), "-m", "celery", "-A", "bench.peers.celery_app", "worker"]
        argv += ["--pool", "prefork", "--concurrency", str(SLOTS), "--loglevel", "WARNING"]
        self.spawn("worker", [*argv, "--hostname", "bench@localhost"])
        self.client = Client(
            [str(install.PYTHON), str(DRIVER), "client", "celery"],
            self.root / "client.log",
            self.env,
            self.root,
        )

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "BANYAN_BENCH_REDIS": getattr(self, "redis", "")}

    def _listens(self, port: int) -> bool:
        if self.procs["redis"].poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{self.log_tail('redis')}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def cpu(self) -> dict[str, float]:
        redis = psutil.Process(self.procs["redis"].pid).cpu_times()
        main = psutil.Process(self.procs["worker"].pid)
        pool = [p.cpu_times() for p in main.children()]
        own = main.cpu_times()
        return {
            "redis": redis.user + redis.system,
            "worker": own.user + own.system + sum(t.user + t.system for t in pool),
            "jobs": sum(t.children_user + t.children_system for t in pool),
        }


class HyperQueuePeer(Peer):
    name = "hyperqueue"

    def start(self) -> None:
        server_dir = self.root / "server"
        server_dir.mkdir()
        argv = [str(install.PYTHON), str(DRIVER), "hq-cluster", str(server_dir), str(SLOTS)]
        proc = self.spawn("cluster", install.isolated(argv), stdin=subprocess.PIPE)
        wait_for(lambda: self._ready(server_dir), 60, "HyperQueue's server and worker")
        # The client joins the cluster's network namespace: its loopback is the only way in.
        nsenter = ["nsenter", f"--net=/proc/{proc.pid}/ns/net", "--"]
        self.client = Client(
            [*nsenter, str(install.PYTHON), str(DRIVER), "client", "hyperqueue", str(server_dir)],
            self.root / "client.log",
            self.env,
            self.root,
        )

    def _ready(self, server_dir: Path) -> bool:
        if self.procs["cluster"].poll() is not None:
            raise RuntimeError(f"HyperQueue's cluster exited:\n{self.log_tail('cluster')}")
        return (server_dir / READY).exists()

    def cpu(self) -> dict[str, float]:
        t = psutil.Process(self.procs["cluster"].pid).cpu_times()
        return {"server and worker": t.user + t.system, "jobs": t.children_user + t.children_system}


KINDS: dict[str, type[Peer]] = {"celery": CeleryPeer, "hyperqueue": HyperQueuePeer}


@contextlib.contextmanager
def started(spec: str, root: Path, report: Report, warm: int = 20) -> Iterator[list[Peer]]:
    """The peers `spec` names (see --peers), started, warmed up with `warm` jobs, and stopped
    at the end. A peer that `auto` cannot run is named in the notes and on stderr; one that a
    list names and cannot run stops the benchmark."""
    required = spec not in ("auto", "none")
    names = [] if spec == "none" else list(PEERS) if spec == "auto" else spec.split(",")
    unknown = set(names) - set(PEERS)
    if unknown:
        raise SystemExit(f"--peers: unknown peer(s) {', '.join(sorted(unknown))}")
    peers: list[Peer] = []
    try:
        for name in names:
            reason = not_ready(name)
            if reason is None:
                peer = KINDS[name](root)
                peers.append(peer)
                try:
                    peer.start()
                    peer.batch(warm, "true", deadline=60)  # the first jobs, and a live worker
                    continue
                except Exception as e:
                    peers.remove(peer)
                    peer.stop()
                    reason = f"did not start: {e}"
            message = f"{LABELS[name]} left out: {reason}"
            if required:
                raise SystemExit(message)
            print(f"  {message}", file=sys.stderr)
            report.notes.append(message)
        report.params["peers"] = [p.name for p in peers]
        if peers:
            pins = ", ".join(install.pins())
            report.notes.append(f"peers: {pins}; {NOT_DURABLE}")
            report.notes.extend(SETUP[p.name] for p in peers)
        yield peers
    finally:
        for peer in peers:
            peer.stop()


def cpu_delta(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """Milliseconds of CPU per job, by part, between two `Peer.cpu()` readings."""
    return {k: 1e3 * (after[k] - before[k]) / n for k in before}
