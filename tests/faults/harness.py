"""What every fault scenario shares: the job log, the audit of the invariants, the summary row.

Every job of a scenario appends `job_id attempt worker start end` to one append-only log: a line
with end `-` when it starts, and the full line when it ends, so a run that is killed still shows
its start. The audit checks the invariants from that log and from the broker's final state:

- every acknowledged job reaches a terminal state, and the broker holds no job nobody was told of;
- no job is recorded as succeeded twice;
- no two runs of one job overlap in time;
- no process started by a job survives its job;
- the broker's counters match a recount from its records and its event log.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from banyan.client import BrokerUnavailable, Client
from tests.cluster import scaled, wait_for

FULL = os.environ.get("BANYAN_FAULTS_FULL", "") not in ("", "0")
CHUNK = 500  # jobs per status request while auditing


def size(full: float, reduced: float) -> float:
    """The scenario's size: full under `make faults`, reduced under `make test`."""
    return full if FULL else reduced


@dataclass(frozen=True)
class Run:
    job: int
    attempt: int
    worker: str
    start: float
    end: float | None  # None: the run never reached its end (killed)


@dataclass
class Row:
    """One line of the summary table."""

    scenario: str
    runs: int = 0
    jobs: int = 0
    acknowledged: int = 0
    completed: int = 0
    lost: int = 0
    concurrent: int = 0
    succeeded_twice: int = 0
    orphans: int = 0
    seconds: float = 0.0
    note: str = ""

    HEADER = (
        "scenario",
        "runs",
        "jobs",
        "acknowledged",
        "completed",
        "lost",
        "run-twice-concurrently",
        "succeeded-twice",
        "orphans",
        "seconds",
        "notes",
    )

    def cells(self) -> list[str]:
        return [
            self.scenario,
            str(self.runs),
            str(self.jobs),
            str(self.acknowledged),
            str(self.completed),
            str(self.lost),
            str(self.concurrent),
            str(self.succeeded_twice),
            str(self.orphans),
            f"{self.seconds:.1f}",
            self.note,
        ]


def table(rows: Sequence[Row]) -> list[str]:
    """The rows as a Markdown table, columns padded so it also reads well in a terminal."""
    grid = [list(Row.HEADER), *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(Row.HEADER))]
    out = []
    for n, line in enumerate(grid):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return out


class JobLog:
    """The append-only log every job of a scenario writes to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def command(self, body: str = "true") -> str:
        """A job that logs its start, runs `body` and logs its end (only if `body` succeeds).

        The worker's name is the spool's directory in the progress file's path
        (SPOOL/WORKER/ACCOUNT/FILE); one `echo` is one write(2) under O_APPEND, so concurrent
        jobs never interleave lines.
        """
        log = shlex.quote(str(self.path))
        who = "W=${BANYAN_PROGRESS_FILE%/*/*}; W=${W##*/}; S=$(date +%s.%N)"
        begin = f'echo "$BANYAN_JOB_ID $BANYAN_ATTEMPT $W $S -" >> {log}'
        end = f'echo "$BANYAN_JOB_ID $BANYAN_ATTEMPT $W $S $(date +%s.%N)" >> {log}'
        return f"{who}; {begin}; {body} && {end}"

    def runs(self) -> list[Run]:
        """One Run per started attempt; a damaged line (none expected) raises."""
        found: dict[tuple[int, int, str, float], float | None] = {}
        for line in self.path.read_text().splitlines():
            job, attempt, worker, start, end = line.split()
            key = (int(job), int(attempt), worker, float(start))
            if end != "-" or key not in found:
                found[key] = None if end == "-" else float(end)
        return [Run(*key, end) for key, end in sorted(found.items())]


def overlapping(runs: Iterable[Run], ends: dict[tuple[int, int], float] | None = None) -> set[int]:
    """Jobs with two runs that overlap in time.

    A run without an end was killed; `ends` may give the time its processes were seen gone
    (job, attempt); otherwise it counts as running until the end of the scenario.
    """
    by_job: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        end = r.end if r.end is not None else (ends or {}).get((r.job, r.attempt), float("inf"))
        by_job[r.job].append((r.start, end))
    bad = set()
    for job, spans in by_job.items():
        spans.sort()
        latest_end = spans[0][1]
        for start, end in spans[1:]:
            if start < latest_end:
                bad.add(job)
            latest_end = max(latest_end, end)
    return bad


# ---- processes ----------------------------------------------------------------------------------


def job_processes(root: Path) -> list[psutil.Process]:
    """Living processes started by the jobs of the scenario under `root`.

    A job's processes carry the scenario's directory in their command line (the log path) or
    in the progress-file variable every job inherits; the broker and workers carry neither.
    """
    mark = str(root)
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            argv = p.info["cmdline"] or []
            if argv[:2] == [sys.executable, "-m"]:
                continue  # the broker and workers themselves (their arguments name the root)
            line = " ".join(argv)
            if mark in line or p.environ().get("BANYAN_PROGRESS_FILE", "").startswith(mark):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def orphans(root: Path, grace: float = 3.0) -> list[str]:
    """Job processes still alive once `grace` seconds have passed, described; then killed.

    The grace covers a worker's bounded clean-up (its next sweep); anything alive after it is
    an orphan, counted and killed so that it cannot disturb the next scenario.
    """
    deadline = time.monotonic() + scaled(grace)
    left = job_processes(root)
    for _ in range(int(scaled(grace) / 0.05) + 1):
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        left = job_processes(root)
    described = []
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            env = p.environ()
            job = env.get("BANYAN_JOB_ID"), env.get("BANYAN_ATTEMPT")
            described.append(f"pid {p.pid} (parent {p.ppid()}, job/attempt {job}): {p.cmdline()}")
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
    return described


def runs_of(log: JobLog, worker: str, count: int) -> list[Run]:
    """The unfinished runs on `worker`, once there are `count` of them (for wait_for)."""
    runs = [r for r in log.runs() if r.worker == worker and r.end is None]
    return runs if len(runs) >= count else []


def gone_at(root: Path, worker: str, timeout: float) -> float:
    """Wall-clock time at which no process of `worker`'s jobs is left (bounded wait)."""

    def on_worker() -> list[int]:
        spool = str(root / "spool" / worker) + "/"
        procs = []
        for p in job_processes(root):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if p.environ().get("BANYAN_PROGRESS_FILE", "").startswith(spool):
                    procs.append(p.pid)
        return procs

    wait_for(lambda: not on_worker(), timeout, interval=0.01, what=f"{worker}'s jobs to die")
    return time.time()


# ---- the audit --------------------------------------------------------------------------------


@dataclass
class Audit:
    row: Row
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> detailed JobInfo
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)  # success, failed, ..., cancelled

    def check(self, *, allow_concurrent: bool = False) -> None:
        """Fail with every broken invariant at once."""
        problems = list(self.problems)
        if self.row.concurrent and not allow_concurrent:
            problems.append(f"{self.row.concurrent} jobs ran twice at the same time")
        assert not problems, "\n".join(problems)


def retrying(fn: Any, what: str, timeout: float = 60.0) -> Any:
    """Call fn until the broker answers (it may be restarting); bounded in time and count."""
    deadline = time.monotonic() + scaled(timeout)
    for _ in range(10_000):
        try:
            return fn()
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise AssertionError(f"the broker did not answer {what} in time") from None
    raise AssertionError(f"gave up on {what}")


def wait_terminal(c: Client, ids: list[int], timeout: float) -> None:
    """Wait (with broker-side `wait`, no polling) until every job ends or `timeout` passes.

    In pieces of CHUNK * 10 jobs: one wait on 100k jobs is one long turn for the broker, and
    the audit must not be what disturbs the scenario's heartbeats."""
    deadline = time.monotonic() + scaled(timeout)
    pending = list(ids)
    for _ in range(10_000):
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            return
        try:
            w = c.wait(pending[: CHUNK * 10], timeout=left)
        except BrokerUnavailable:
            continue  # restarted meanwhile: ask again
        done = {j.id for j in w.jobs if j.terminal}
        pending = [j for j in pending if j not in done]


def audit(
    c: Client,
    scenario: str,
    log: JobLog,
    acked: list[int],
    jobs: int,
    root: Path,
    timeout: float = 60.0,
    ends: dict[tuple[int, int], float] | None = None,
) -> Audit:
    """Wait for every acknowledged job, then recount everything (see the module docstring)."""
    wait_terminal(c, acked, timeout)
    a = Audit(Row(scenario, jobs=jobs, acknowledged=len(acked)))
    for i in range(0, len(acked), CHUNK):
        chunk = acked[i : i + CHUNK]
        status = retrying(lambda ch=chunk: c.status(ch, detail=True, limit=len(ch)), "status")
        a.jobs.update((j.id, j.raw) for j in status.jobs)
    a.runs = log.runs()
    _check_jobs(a, acked)
    _check_events(a, c)
    _check_counters(a, c)
    _check_log(a, ends)
    left = orphans(root)
    a.row.orphans = len(left)
    if left:
        a.problems.append(f"{len(left)} job processes outlived their jobs: {left[:5]}")
    return a


def _check_jobs(a: Audit, acked: list[int]) -> None:
    if len(set(acked)) != len(acked):
        a.problems.append("one job id was acknowledged to two submissions")
    for job_id in acked:
        info = a.jobs.get(job_id)
        if info is None or info["state"] not in ("terminated", "cancelled"):
            a.row.lost += 1
            continue
        a.row.completed += 1
        a.outcomes[info["outcome"] or info["state"]] += 1
        wins = [h for h in info["history"] if h["outcome"] == "success"]
        if len(wins) > 1:
            a.row.succeeded_twice += 1
    if a.row.lost:
        a.problems.append(f"{a.row.lost} acknowledged jobs did not reach a terminal state")
    if a.row.succeeded_twice:
        a.problems.append(f"{a.row.succeeded_twice} jobs have two successful attempts")


def _check_events(a: Audit, c: Client) -> None:
    """Replay the event log: each job's chain of transitions is unbroken, ends where its
    record is, and reaches a terminal state once."""
    last: dict[int, str] = {}
    ended: Counter[int] = Counter()
    since = 1
    for _ in range(100_000):
        events, nxt = retrying(lambda s=since: c.events(s, 10_000), "events")
        for _seq, _time, job, frm, to, _reason in events:
            if last.get(job) != frm:
                a.problems.append(f"job {job}: event {frm}->{to} after {last.get(job)}")
            last[job] = to
            ended[job] += to in ("terminated", "cancelled")
        if not events:
            break
        since = nxt
    twice = [j for j, n in ended.items() if n > 1]
    if twice:
        a.row.succeeded_twice = max(a.row.succeeded_twice, len(twice))
        a.problems.append(f"jobs ended twice in the event log: {twice[:10]}")
    for job_id, info in a.jobs.items():
        if last.get(job_id) != info["state"]:
            a.problems.append(
                f"job {job_id}: events end in {last.get(job_id)}, record says {info['state']}"
            )
    extra = set(last) - set(a.jobs)
    if extra:
        a.problems.append(f"the broker holds {len(extra)} jobs nobody was told of (duplicates)")


def _check_counters(a: Audit, c: Client) -> None:
    """Per-state counts and per-worker completion counters against a recount."""
    counts = {k: v for k, v in retrying(c.stats, "stats")["counts"].items() if v}
    recount = Counter(info["state"] for info in a.jobs.values())
    if counts != dict(recount):
        a.problems.append(f"state counts {counts} but the records say {dict(recount)}")
    completed = Counter(
        h["worker"]
        for info in a.jobs.values()
        for h in info["history"]
        # "returned": a claim given back unstarted (held ahead, or an account it cannot run)
        if h["ended"] is not None and h["outcome"] not in (None, "lost", "returned")
    )
    holding: dict[str, list[int]] = {}
    for job_id, info in a.jobs.items():
        if info["state"] in ("running", "pending_cancellation"):
            holding.setdefault(info["worker"], []).append(job_id)
    for w in retrying(c.workers, "workers"):
        if w.completed != completed.get(w.name, 0):
            a.problems.append(
                f"worker {w.name} counts {w.completed} completed, the attempts say "
                f"{completed.get(w.name, 0)}"
            )
        held = sorted(holding.get(w.name, []))
        cpus = sum(a.jobs[j]["cpus"] for j in held)
        if w.state != "lost" and (w.running != held or abs(w.used_cpus - cpus) > 1e-6):
            a.problems.append(
                f"worker {w.name} holds {w.running} using {w.used_cpus:g} cpus; the jobs say "
                f"{held} using {cpus:g}"
            )


def _check_log(a: Audit, ends: dict[tuple[int, int], float] | None) -> None:
    a.row.runs = len(a.runs)
    strangers = {r.job for r in a.runs} - set(a.jobs)
    if strangers:
        a.problems.append(f"runs of jobs never acknowledged: {sorted(strangers)[:10]}")
    finished = {r.job for r in a.runs if r.end is not None}
    for job_id, info in a.jobs.items():
        if info["outcome"] == "success" and job_id not in finished:
            a.problems.append(f"job {job_id} succeeded but never logged its end")
    a.row.concurrent = len(overlapping(a.runs, ends))
