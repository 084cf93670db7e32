"""Jobs started straight into their cgroups by the launcher helper, and the fallback when it
cannot (the shell then moves itself in). Needs a writable cgroup2 hierarchy: skipped without,
failed without under CI."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from banyan.worker import cgroups, launcher
from banyan.worker.launcher import Launcher
from banyan.worker.runner import SLOW_MOVE, STREAM_STARTS, Finished, Launch, Runner
from tests.cluster import need_cgroups, wait_for


@pytest.fixture(autouse=True)
def _cgroups() -> None:
    need_cgroups()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path / "spool", [], cgroups=True)
    r.launcher = Launcher()  # whether or not moves are slow on this machine
    r.clone_into_cgroups = True
    r.warm_moves = r.stream_span = 0.0  # every job through the launcher, however soon
    yield r
    r.shutdown_all(time.monotonic())
    wait_for(lambda: not r.poll(time.monotonic()) and not r.running(), 15)
    r.launcher.close()
    assert r.cgroups is not None
    r.cgroups.close()


def finished(r: Runner) -> Finished:
    done: list[Finished] = []

    def ended() -> bool:
        done.extend(r.poll(time.monotonic()))
        return bool(done)

    wait_for(ended, 10)
    return done[0]


def run(r: Runner, job: int, command: str) -> Finished:
    r.start(
        Launch(job, job, 1, command, None, {"GREETING": "hello"}, [], None, 1.0, None),
        time.monotonic(),
    )
    return finished(r)


WHO = (
    'grep "^0::" /proc/$$/cgroup; '
    'echo "ppid=$PPID sid=$(ps -o sid= -p $$ | tr -d " ") pid=$$ $GREETING"'
)


def check_born_in_cgroup(r: Runner, job: int) -> None:
    done = run(r, job, WHO)
    assert done.exit_code == 0, done.stderr_tail
    cgroup_line, who = done.stdout_tail.decode().splitlines()
    assert cgroup_line.endswith(f"/job-{job}-{job}")
    fields = dict(kv.split("=") for kv in who.split()[:3])
    assert int(fields["ppid"]) == os.getpid()  # our own child: reaped and watched like any
    assert int(fields["sid"]) == int(fields["pid"])  # a session of its own
    assert who.endswith(" hello")


def test_jobs_are_born_in_their_cgroup(runner: Runner) -> None:
    check_born_in_cgroup(runner, 1)
    assert not runner.launcher.broken
    helper = runner.launcher._proc
    assert helper is not None and psutil.pid_exists(helper.pid)


def test_a_stream_of_starts_moves_itself_and_a_lone_start_is_cloned(runner: Runner) -> None:
    """Under a stream of short jobs a move is cheap (runner.WARM_MOVES): once STREAM_STARTS
    jobs have started within `stream_span`, a job moves itself into its cgroup, and so does
    each one started within `warm_moves` of that move; otherwise the launcher clones it."""
    runner.warm_moves = runner.stream_span = 3600.0  # every start counts as soon
    for job in range(1, STREAM_STARTS):
        check_born_in_cgroup(runner, job)  # not a stream yet: through the launcher
    assert runner.warm_starts == 0
    check_born_in_cgroup(runner, STREAM_STARTS)  # its shell moved itself in before anything
    assert runner.warm_starts == 1
    runner.stream_span = 0.0
    check_born_in_cgroup(runner, 10)  # soon after that move
    assert runner.warm_starts == 2
    runner.warm_moves = 0.0
    check_born_in_cgroup(runner, 11)  # neither a stream nor soon after a move
    assert runner.warm_starts == 2 and not runner.launcher.broken


def test_a_dead_launcher_falls_back_to_joining_then_gets_a_new_one(runner: Runner) -> None:
    check_born_in_cgroup(runner, 1)
    helper = runner.launcher._proc
    assert helper is not None
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait(timeout=10)
    check_born_in_cgroup(runner, 2)  # the shell moved itself in before running anything
    assert not runner.launcher.broken and runner.launcher._proc is None
    runner._last_move = -math.inf  # a lone start again, for the launcher
    check_born_in_cgroup(runner, 3)
    again = runner.launcher._proc
    assert again is not None and again.pid != helper.pid and again.poll() is None


def test_a_launcher_that_keeps_failing_is_given_up(runner: Runner) -> None:
    for job in range(1, launcher.RESTARTS + 2):  # each helper dies before it answers
        runner.launcher._start()
        helper = runner.launcher._proc
        assert helper is not None and not runner.launcher.broken
        os.kill(helper.pid, signal.SIGKILL)
        helper.wait(timeout=10)
        runner._last_move = -math.inf
        check_born_in_cgroup(runner, job)  # the shell moved itself in
    assert runner.launcher.broken


def test_a_hangup_does_not_end_the_launcher(runner: Runner) -> None:
    """The worker's terminal closing signals its whole process group, the helper included."""
    check_born_in_cgroup(runner, 1)
    helper = runner.launcher._proc
    assert helper is not None
    os.kill(helper.pid, signal.SIGHUP)
    check_born_in_cgroup(runner, 2)
    assert not runner.launcher.broken and helper.poll() is None


def test_a_stuck_launcher_is_given_up_and_the_job_runs_once(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner.launcher.close()
    monkeypatch.setattr(launcher, "_ANSWER_WITHIN", 0.5)
    runner.launcher = Launcher()
    check_born_in_cgroup(runner, 1)  # the helper is up
    helper = runner.launcher._proc
    assert helper is not None
    os.kill(helper.pid, signal.SIGSTOP)  # it will not answer
    runs = tmp_path / "runs"
    done = run(runner, 2, f"echo ran >> {runs}")
    assert done.exit_code == 0 and runs.read_text() == "ran\n"
    assert helper.poll() is not None  # killed, not left stopped
    assert not runner.launcher.broken  # the next lone start asks a new one


def test_cancel_kills_everything_in_the_cgroup(runner: Runner) -> None:
    info = runner.start(
        Launch(3, 3, 1, "sleep 1000 & sleep 1000 & wait", None, {}, [], None, 0.2, None),
        time.monotonic(),
    )
    assert runner.cgroups is not None
    path = os.path.join(runner.cgroups.base, "job-3-3")
    wait_for(lambda: len(cgroups.members(path)) >= 3, 10)
    runner.cancel(3, 3, time.monotonic(), "test")
    assert finished(runner).outcome == "cancelled"
    assert info.pid is not None and cgroups.members(path) == []


def test_the_runner_measures_moves_to_choose(tmp_path: Path) -> None:
    r = Runner(tmp_path / "spool", [], cgroups=True)
    try:
        assert r.move_time is not None and 0 < r.move_time < 10
        assert r.clone_into_cgroups == (r.move_time > SLOW_MOVE)
        assert r.cgroups is not None
        assert not os.path.exists(os.path.join(r.cgroups.base, "probe"))
    finally:
        assert r.cgroups is not None
        r.cgroups.close()


def test_what_outlives_its_leader_is_killed_through_the_cgroup(
    runner: Runner, tmp_path: Path
) -> None:
    runner.launcher.close()
    runner.launcher.broken = True  # the shell's own move, as where moves are cheap
    # Its own session and no marker: only the cgroup still knows whose it is. The leader
    # waits until the escapee is in place, then ends.
    assert runner.cgroups is not None
    path = os.path.join(runner.cgroups.base, "job-5-5")
    flag = tmp_path / "hidden"
    # The pid lands in the flag whole (rename), and `exec` keeps it as the sleep's.
    escape = (
        f"setsid env -i /bin/sh -c 'echo $$ > {flag}.tmp; mv {flag}.tmp {flag}; exec sleep 1000' &"
    )
    done = run(runner, 5, f"{escape} until [ -e {flag} ]; do sleep 0.01; done")
    assert done.exit_code == 0
    escapee = int(flag.read_text())

    def gone() -> bool:
        runner.poll(time.monotonic())  # reaps what the kill left as zombies
        try:
            dead = psutil.Process(escapee).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            dead = True
        # The sweep removes the cgroup once it is empty (rmdir refuses a populated one).
        empty = not os.path.exists(path) or not cgroups.populated(path)
        return dead and empty

    wait_for(gone, 10, what="the background sleep to die")


def test_populated(runner: Runner, tmp_path: Path) -> None:
    assert runner.cgroups is not None
    path = runner.cgroups.create(6, 6)
    assert path is not None and not cgroups.populated(path)
    assert cgroups.populated(str(tmp_path / "no-such-cgroup"))  # unknown: assume the worst


def test_close_ends_the_helper(runner: Runner) -> None:
    run(runner, 4, "true")
    helper = runner.launcher._proc
    assert helper is not None
    runner.launcher.close()
    assert helper.returncode == 0
    assert runner.launcher._proc is None
