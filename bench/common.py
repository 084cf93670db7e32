"""What every benchmark shares: real processes on loopback, repeated timing, tables and JSON.

Each benchmark measures its figure and a reference in the same run, three times over, and
reports medians and their ratio: a busy machine slows both alike, so the ratio survives.
Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import psutil

from banyan.client import Client

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).parent / "results"
REPEAT = 3
T = TypeVar("T")


# ---- command line and report ------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes: proves it works, in seconds")
    p.add_argument("--repeat", type=int, default=REPEAT, help="runs per measurement (median)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON report")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the broker (and workers) into DIR"
    )
    return p


@dataclass
class Figure:
    """One line of the report: a measured value, its same-run reference, and the target."""

    name: str
    value: float
    unit: str
    reference: str = ""  # what the value is compared with, measured in the same run
    reference_value: float | None = None
    ratio: float | None = None  # value / reference_value, or as the figure says
    target: str = ""
    met: bool | None = None  # None: no target, or the target does not apply at this size


@dataclass
class Report:
    bench: str
    quick: bool
    repeat: int
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # every repetition, raw
    notes: list[str] = field(default_factory=list)

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def finish(self, out_dir: Path) -> Path:
        """Print the table and write `<out_dir>/<bench>.json`."""
        probes = [r["probe"] for r in self.runs if isinstance(r.get("probe"), dict)]
        loads = [r["loadavg"] for r in self.runs if isinstance(r.get("loadavg"), dict)]
        if loads:
            each = ", ".join(f"{x['before'][0]:.2f}-{x['after'][0]:.2f}" for x in loads)
            self.notes.append(f"load average (1 min) before-after each run: {each}")
        if probes:
            p50 = median([p["commit_p50_ms"] for p in probes])
            p90 = median([p["commit_p90_ms"] for p in probes])
            self.notes.append(
                f"bare durable LMDB commit before each run: p50 {p50:.2f} ms, p90 {p90:.2f} ms"
            )
        print(table(self.figures))
        for note in self.notes:
            print(f"  note: {note}")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.bench}.json"
        doc = {**asdict(self), "machine": machine(), "command": " ".join(sys.argv)}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
        return path


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": loadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3f}"


def table(figures: Sequence[Figure]) -> str:
    head = ("figure", "value", "unit", "reference", "ref value", "ratio", "target", "met")
    rows = [head] + [
        (
            f.name,
            fmt(f.value),
            f.unit,
            f.reference,
            fmt(f.reference_value),
            fmt(f.ratio),
            f.target,
            {True: "yes", False: "NO", None: "-"}[f.met],
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def repeated(n: int, fn: Callable[[int], T]) -> list[T]:
    """fn(i) for i in range(n), with a line of progress on stderr. A run that returns a dict
    gets the disk probe taken just before it under "probe", and the machine's load average
    (1, 5, 15 min) before and after it under "loadavg": the machine is shared."""
    out = []
    for i in range(n):
        probe = commit_probe()
        load = loadavg()
        started = time.perf_counter()
        result = fn(i)
        if isinstance(result, dict):
            result["probe"] = probe
            result["loadavg"] = {"before": load, "after": loadavg()}
        out.append(result)
        took = time.perf_counter() - started
        print(f"  run {i + 1}/{n}: {took:.1f} s, load average {load[0]:.2f}", file=sys.stderr)
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def commit_probe(commits: int = 50) -> dict[str, float]:
    """How long a bare durable LMDB commit takes right now, next to the brokers' stores.

    No reference cancels the disk out of a figure that fsyncs, and other work on the machine
    can make fsync ten times slower; the probe says which runs paid that.
    """
    with tempfile.TemporaryDirectory(prefix="banyan-probe-") as d:
        env = lmdb.open(d, map_size=1 << 24, sync=True, metasync=True)
        times = []
        for i in range(commits):
            started = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"%d" % i, b"x" * 100)
            times.append(time.perf_counter() - started)
        env.close()
    return {"commit_p50_ms": median(times) * 1e3, "commit_p90_ms": percentile(times, 90) * 1e3}


# ---- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, step: float = 0.01) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class Cluster:
    """A broker and workers as real subprocesses (`python -m banyan.cli.*`) on loopback.

    Unlike tests/cluster.py it logs at `warning`, keeps the default 1 s heartbeat, and can
    wrap the broker in a profiler. `stop()` ends every process it started, by PID.
    """

    def __init__(self, root: Path, state_dir: Path | None = None, insecure: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.home = root / "home"  # keys: the broker makes them on its first start
        self.state_dir = state_dir or root / "state"
        self.insecure = insecure  # --insecure: no CurveZMQ
        self.client_port = free_port()
        self.worker_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "BANYAN_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def spawn(self, key: str, argv: list[str]) -> subprocess.Popen[bytes]:
        # In the scratch directory: `python -m` puts the working directory first on sys.path,
        # and a checkout there would shadow the tree this bench runs from (PYTHONPATH).
        with open(self.root / f"{key}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root
            )
        self.procs[key] = proc
        return proc

    def start_broker(
        self,
        wrap: Sequence[str] = (),
        heartbeat: float = 1.0,
        wait: bool = True,
        args: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """`wrap` is put in front of the module, e.g. `-m cProfile -o FILE`; `args` after it."""
        argv = [sys.executable, *wrap, "-m", "banyan.cli.broker"]
        argv += ["--client-port", str(self.client_port), "--worker-port", str(self.worker_port)]
        argv += ["--state-dir", str(self.state_dir), "--heartbeat", str(heartbeat)]
        argv += ["--log-level", "warning"] + (["--insecure"] if self.insecure else [])
        # Variants without editing a script: e.g. BANYAN_BENCH_BROKER_ARGS="--prefetch 0".
        argv += [*args, *shlex.split(os.environ.get("BANYAN_BENCH_BROKER_ARGS", ""))]
        proc = self.spawn("broker", argv)
        if wait:
            self.wait_broker()
        return proc

    def wait_broker(self, timeout: float = 60.0) -> None:
        wait_for(self.pings, timeout, "the broker to answer")

    def pings(self) -> bool:
        if self.procs["broker"].poll() is not None:
            raise RuntimeError(f"the broker exited; see {self.root / 'broker.log'}")
        try:
            with Client(self.address, self.home, timeout=0.5) as c:
                c.ping()
            return True
        except Exception:
            return False

    def start_worker(
        self, name: str, cpus: float = 2, wrap: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        argv = [sys.executable, *wrap, "-m", "banyan.cli.worker"]
        argv += ["--broker", f"127.0.0.1:{self.worker_port}", "--name", name]
        argv += ["--cpus", str(cpus), "--memory", "4096", "--gpus", "0"]
        argv += ["--spool", str(self.root / "spool" / name), "--log-level", "warning"]
        if os.geteuid() == 0:  # the bench's jobs are its own account's: root's, here
            argv.append("--allow-root-jobs")
        proc = self.spawn(name, argv)
        with self.client() as c:
            wait_for(lambda: any(w.name == name for w in c.workers()), 30, f"worker {name}")
        return proc

    def profile(self, key: str, out: Path, rate: int = 200) -> None:
        """Sample `key` with py-spy (if installed) until stop(); writes collapsed stacks to
        `out`, idle waits included, for bench/hotspots.py or any flame graph tool."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [spy, "record", "--pid", str(self.procs[key].pid), "--format", "raw"]
        argv += ["--output", str(out), "--rate", str(rate), "--idle", "--nonblocking"]
        with open(self.root / f"py-spy-{key}.log", "ab") as log:
            self.profilers.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(0.3)  # let it attach before the measured part begins

    def stop_profilers(self) -> None:
        for proc in self.profilers:
            _signal(proc, signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self.profilers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.profilers.clear()

    def client(self, timeout: float = 60.0) -> Client:
        return Client(self.address, self.home, timeout=timeout)

    def stop(self, key: str | None = None, timeout: float = 20.0) -> None:
        """SIGTERM (twice for a worker: warm, then cold), wait, and SIGKILL what is left."""
        self.stop_profilers()
        keys = [key] if key else list(self.procs)
        for k in keys:
            _signal(self.procs[k], signal.SIGTERM)
        for k in keys:
            proc = self.procs.pop(k)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _kill_tree(proc.pid)
                    proc.wait(timeout=5)

    def cpu_seconds(self, key: str) -> float:
        t = psutil.Process(self.procs[key].pid).cpu_times()
        return float(t.user + t.system)

    def rss(self, key: str) -> int:
        return int(psutil.Process(self.procs[key].pid).memory_info().rss)


@contextlib.contextmanager
def cluster(root: Path, state_dir: Path | None = None, insecure: bool = False) -> Iterator[Cluster]:
    c = Cluster(root, state_dir, insecure)
    try:
        yield c
    finally:
        c.stop()


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def workdir(keep: bool, name: str) -> Iterator[Path]:
    """A scratch directory under /tmp (kept with --keep, and its path printed)."""
    path = Path(tempfile.mkdtemp(prefix=f"banyan-bench-{name}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
