"""The worker's process runner, with real processes.

Every wait is bounded and scales with BANYAN_TIME_FACTOR. Every test ends by checking that no
process carrying one of its jobs' markers is still alive.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from banyan import defaults
from banyan.errors import BadRequest, NotFound
from banyan.outputs import output_paths
from banyan.worker import accounts
from banyan.worker.procs import MARKER_VAR
from banyan.worker.progress import parse_progress
from banyan.worker.runner import Finished, Launch, Runner, RunningJob
from tests.cluster import need_cgroups


def time_factor() -> float:
    return float(os.environ.get("BANYAN_TIME_FACTOR", "1"))


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout * time_factor()
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def launch(job: int, command: str, **overrides: object) -> Launch:
    fields: dict[str, object] = {
        "job": job,
        "token": 1000 + job,
        "attempt": 1,
        "command": command,
        "cwd": None,
        "env": {},
        "gpu_ids": [],
        "time_limit": None,
        "cancel_grace": 5.0,
        "output": None,
    }
    fields.update(overrides)
    return Launch(**fields)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def marked(marker: str) -> list[int]:
    """Living processes whose environment carries this job marker."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARKER_VAR) == marker:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class Harness:
    def __init__(self, spool: Path, gpus: list[str], cgroups: bool) -> None:
        self.runner = Runner(spool, gpus, cgroups=cgroups)
        self.spool = spool / accounts.own().name  # where its jobs' files go: its account's
        self.markers: list[str] = []
        self.finished: dict[int, Finished] = {}

    def start(self, job: int, command: str, **overrides: object) -> RunningJob:
        info = self.runner.start(launch(job, command, **overrides), time.monotonic())
        self.markers.append(info.marker)
        return info

    def poll(self) -> list[Finished]:
        done = self.runner.poll(time.monotonic())
        self.finished.update((f.job, f) for f in done)
        return done

    def polling_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        def step() -> bool:
            self.poll()
            return condition()

        wait_for(step, timeout)

    def result(self, job: int, timeout: float = 5.0) -> Finished:
        self.polling_until(lambda: job in self.finished, timeout)
        return self.finished[job]

    def run(self, job: int, command: str, **overrides: object) -> Finished:
        self.start(job, command, **overrides)
        return self.result(job)


def living_children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True) if alive(c.pid)}


# Every test runs twice: plain, and as the worker daemon runs jobs (a cgroup per job, and the
# launcher where moves into cgroups are slow).
@pytest.fixture(params=[False, True], ids=["plain", "daemon"])
def h(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param:
        need_cgroups()
    before = living_children()
    harness = Harness(tmp_path / "spool", ["2", "3"], cgroups=request.param)
    try:
        yield harness
        _finish(harness, before)
    finally:
        harness.runner.launcher.close()
        if harness.runner.cgroups is not None:
            harness.runner.cgroups.close()


def _finish(harness: Harness, before: set[int]) -> None:
    harness.runner.shutdown_all(time.monotonic())
    harness.polling_until(lambda: not harness.runner.running(), timeout=15)
    harness.runner.launcher.close()  # the helper is the runner's own child, not a job's
    leftovers: set[int] = set()
    with contextlib.suppress(AssertionError):
        harness.polling_until(lambda: not any(marked(m) for m in harness.markers), timeout=3)
    for marker in harness.markers:
        leftovers.update(marked(marker))
    leftovers |= living_children() - before
    for pid in leftovers:  # so that one failure does not spill into the next test
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert leftovers == set(), "processes outlived their jobs"
    harness.polling_until(lambda: zombie_children() == set(), timeout=5)


def zombie_children() -> set[int]:
    zombies = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.add(child.pid)
    return zombies


def ready(path: Path) -> Callable[[], bool]:
    return lambda: path.exists() and path.read_text().strip() != ""


# --- exits, output, environment ---------------------------------------------------------------


def test_exit_codes_and_tails(h: Harness) -> None:
    ok = h.run(1, "echo out; echo err >&2")
    assert (ok.outcome, ok.exit_code, ok.signal) == ("exited", 0, None)
    assert (ok.stdout_tail, ok.stderr_tail) == (b"out\n", b"err\n")
    bad = h.run(2, "echo partial; exit 3")
    assert (bad.outcome, bad.exit_code, bad.stdout_tail) == ("exited", 3, b"partial\n")
    assert bad.started <= bad.ended


def test_tails_are_the_last_4096_bytes(h: Harness) -> None:
    done = h.run(1, "head -c 10000 /dev/zero | tr '\\0' a; echo END; seq 1 5000 >&2")
    assert len(done.stdout_tail) == defaults.OUTPUT_TAIL_BYTES
    assert done.stdout_tail.endswith(b"aaaEND\n")
    assert len(done.stderr_tail) == defaults.OUTPUT_TAIL_BYTES
    assert done.stderr_tail.endswith(b"4999\n5000\n")


def test_environment(h: Harness) -> None:
    command = "echo $BANYAN_JOB_ID $BANYAN_ATTEMPT $BANYAN_PROGRESS_FILE [$CUDA_VISIBLE_DEVICES] $X"
    done = h.run(7, command, attempt=2, gpu_ids=[1], env={"X": "y z"})
    job_id, attempt, progress, gpus, x = done.stdout_tail.decode().split(" ", 4)
    assert (job_id, attempt, gpus, x) == ("7", "2", "[3]", "y z\n")
    assert Path(progress).parent == h.spool
    none = h.run(8, "echo [$CUDA_VISIBLE_DEVICES]", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert none.stdout_tail == b"[]\n"  # no GPUs asked for: none visible, whatever env says
    both = h.run(9, "echo $CUDA_VISIBLE_DEVICES", gpu_ids=[1, 0])
    assert both.stdout_tail == b"3,2\n"


def test_working_directory(h: Harness, tmp_path: Path) -> None:
    own = h.run(1, "pwd; echo data > left.txt")
    scratch = Path(own.stdout_tail.decode().strip())
    assert scratch.parent == h.spool and (scratch / "left.txt").exists()
    (tmp_path / "a dir").mkdir()
    given = h.run(2, "pwd", cwd=str(tmp_path / "a dir"))
    assert given.stdout_tail.decode().strip() == str(tmp_path / "a dir")


def test_bad_working_directory_fails_the_job_without_raising(h: Harness, tmp_path: Path) -> None:
    info = h.start(1, "echo never", cwd=str(tmp_path / "missing"))
    assert info.pid is None
    done = h.result(1)
    assert (done.outcome, done.exit_code, done.stdout_tail) == ("exited", 127, b"")
    assert b"missing" in done.stderr_tail and b"could not start" in done.stderr_tail
    nowhere = h.run(2, "echo never", output=str(tmp_path / "no" / "such" / "dir" / "%j.out"))
    assert nowhere.exit_code == 127 and b"No such file" in nowhere.stderr_tail


def test_output_template(h: Harness, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    h.run(4, "echo o; echo e >&2", attempt=2, output=str(logs / "%j-{attempt}.log"))
    assert (logs / "4-2.log").read_bytes() == b"o\n"
    assert (logs / "4-2.log.err").read_bytes() == b"e\n"
    h.run(5, "echo o; echo e >&2", output=str(logs / "{job}.{stream}"))
    assert (logs / "5.out").read_bytes() == b"o\n" and (logs / "5.err").read_bytes() == b"e\n"
    h.run(6, "echo o", cwd=str(tmp_path), output="logs/rel-{job}-100%%")
    assert (logs / "rel-6-100%").read_bytes() == b"o\n"
    assert output_paths("/dev/null", "/spool", "/", 1, 1) == ("/dev/null", "/dev/null")


def test_tail_serves_logs_while_running_and_after(h: Harness) -> None:
    info = h.start(1, "echo 0123456789; touch go; sleep 1000", cwd=str(h.spool))
    wait_for(ready(Path(info.stdout_path)))
    assert h.runner.tail(1, info.token, "stdout", 2, 3) == (b"234", 11)
    assert h.runner.tail(1, info.token, "stdout", -4, 100) == (b"789\n", 11)
    assert h.runner.tail(1, info.token, "stdout", 50, 10) == (b"", 11)
    h.runner.cancel(1, info.token, time.monotonic(), "test")
    h.result(1)
    assert h.runner.tail(1, info.token, "stdout", 0, 4) == (b"0123", 11)
    with pytest.raises(NotFound):
        h.runner.tail(1, info.token + 1, "stdout", 0, 4)
    with pytest.raises(BadRequest):
        h.runner.tail(1, info.token, "stdin", 0, 4)


# --- progress and usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"42.5 epoch 3/10\n", (42.5, "epoch 3/10")),
        (b"10 first\n20 second\n", (20.0, "second")),
        (b"10 whole\n20 being writ", (10.0, "whole")),
        (b"loading data\n", (None, "loading data")),
        (b"77%  nearly\n", (77.0, "nearly")),
        (b"100\n", (100.0, "")),
        (b"250 too much\n", (100.0, "too much")),
        (b"-3 too little\n", (0.0, "too little")),
        (b"nan inf\n", (None, "nan inf")),
        (b"5 a\n\n  \n", (5.0, "a")),
        (b"\xff\xfe\x00bin\x07ary\n", (None, "\ufffd\ufffd bin ary")),
        (b"", None),
        (b"no newline yet", None),
        (b"\n\n", None),
    ],
)
def test_parse_progress(data: bytes, expected: tuple[float | None, str] | None) -> None:
    assert parse_progress(data) == expected


def test_parse_progress_truncates_the_message() -> None:
    value = parse_progress(b"1 " + b"x" * 5000 + b"\n")
    assert value is not None and len(value[1]) == defaults.PROGRESS_MESSAGE_MAX


def test_progress_is_read_on_change_and_rate_limited(h: Harness) -> None:
    info = h.start(1, "sleep 1000")
    progress = Path(info.progress_path)
    t0 = time.monotonic()
    assert h.runner.progress(t0) == []
    progress.write_text("42.5 epoch 3/10\n")
    [report] = h.runner.progress(t0 + 1)
    assert (report.job, report.token, report.percent, report.message) == (
        1,
        info.token,
        42.5,
        "epoch 3/10",
    )
    progress.write_text("50 epoch 4/10\n")
    assert h.runner.progress(t0 + 1 + defaults.PROGRESS_INTERVAL / 2) == []  # too soon
    [report] = h.runner.progress(t0 + 1 + defaults.PROGRESS_INTERVAL)
    assert (report.percent, report.message) == (50.0, "epoch 4/10")
    progress.write_text("50 epoch 4/10\n\n")  # changed file, same value: nothing to say
    assert h.runner.progress(t0 + 3) == []
    with progress.open("a") as f:
        f.write("writing this line is not fini")
    assert h.runner.progress(t0 + 4) == []
    progress.write_text("\xff garbage \x00\n")
    [report] = h.runner.progress(t0 + 5)
    assert report.percent is None and "garbage" in report.message


def test_a_progress_file_that_is_not_the_jobs_own_is_not_read(h: Harness, tmp_path: Path) -> None:
    # The file is in its owner's directory: a job may put a link there, or (without
    # protected_hardlinks) a hard link to a file only root may read.
    info = h.start(1, "sleep 1000")
    progress = Path(info.progress_path)
    secret = tmp_path / "not-the-jobs"
    secret.write_text("99 a secret of another account\n")
    t0 = time.monotonic()
    progress.unlink(missing_ok=True)  # only a job of another account finds one made for it
    progress.symlink_to(secret)
    assert h.runner.progress(t0) == []
    if os.geteuid() == 0:  # only root can make a file of another account's
        os.chown(secret, 4321, 4321)
        progress.unlink()
        os.link(secret, progress)
        assert h.runner.progress(t0 + 1) == []
    progress.unlink()
    progress.write_text("7 mine\n")
    [report] = h.runner.progress(t0 + 2)
    assert (report.percent, report.message) == (7.0, "mine")


def test_progress_written_by_the_job_itself(h: Harness) -> None:
    h.start(1, 'echo "12 from the job" > "$BANYAN_PROGRESS_FILE"; touch done; sleep 1000')
    reports: list[tuple[float | None, str]] = []

    def reported() -> bool:
        reports.extend((r.percent, r.message) for r in h.runner.progress(time.monotonic()))
        return bool(reports)

    wait_for(reported)
    assert reports == [(12.0, "from the job")]


def test_usage_covers_the_process_tree(h: Harness) -> None:
    info = h.start(1, "sleep 1000 & sleep 1000 & echo started; wait")
    wait_for(ready(Path(info.stdout_path)))
    assert info.pid is not None
    wait_for(lambda: len(psutil.Process(info.pid).children()) == 2)
    first = h.runner.usage(time.monotonic())
    cpu, rss = first[(1, info.token)]
    one = psutil.Process(info.pid).memory_info().rss
    assert rss > one > 0  # the shell and both sleeps
    assert cpu >= 0.0
    assert h.runner.usage(time.monotonic())[(1, info.token)][1] > 0


# --- ending jobs ------------------------------------------------------------------------------


def test_cancel_sends_sigterm_the_job_can_handle(h: Harness) -> None:
    info = h.start(1, "trap 'echo bye > marker; exit 0' TERM; echo up > ready; sleep 1000 & wait")
    spool = h.spool / "1.1"
    wait_for(ready(spool / "ready"))
    h.runner.cancel(1, info.token, time.monotonic(), "user alice")
    done = h.result(1)
    assert (done.outcome, done.exit_code, done.signal) == ("cancelled", 0, None)
    assert (spool / "marker").read_text() == "bye\n"
    assert b"cancelled: user alice" in done.stderr_tail


def test_job_ignoring_sigterm_is_killed_after_the_grace(h: Harness) -> None:
    grace = 0.5 * time_factor()
    info = h.start(1, "trap '' TERM; echo up; sleep 1000", cancel_grace=grace)
    wait_for(ready(Path(info.stdout_path)))
    cancelled_at = time.monotonic()
    h.runner.cancel(1, info.token, cancelled_at, "test")
    done = h.result(1)
    assert (done.outcome, done.signal) == ("cancelled", 9)
    assert grace <= done.ended - cancelled_at < grace + 1.0 * time_factor()


def test_leader_exiting_on_sigterm_does_not_save_a_stubborn_grandchild(h: Harness) -> None:
    grace = 0.5 * time_factor()
    command = "sh -c 'trap \"\" TERM; echo $$ > kid; exec sleep 1000' & sleep 1000"
    info = h.start(1, command, cancel_grace=grace)
    kid = h.spool / "1.1" / "kid"
    wait_for(ready(kid))
    cancelled_at = time.monotonic()
    h.runner.cancel(1, info.token, cancelled_at, "test")
    assert info.pid is not None
    h.polling_until(lambda: info.pid not in living_children())
    for _ in range(3):
        h.poll()
    # The leader is held as a zombie: its pid, which names the job's group and session,
    # cannot be given to a new process while the job may still be signalled through it.
    assert 1 not in h.finished and info.pid in zombie_children()
    done = h.result(1)
    assert done.outcome == "cancelled" and done.ended - cancelled_at >= grace
    h.polling_until(lambda: not alive(int(kid.read_text())))


def test_orphans_are_reaped_while_their_job_runs(h: Harness) -> None:
    # Each subshell exits at once, so its child comes to the runner (a subreaper) and exits:
    # a fork loop makes thousands of these, and each zombie holds a pid of its account's.
    orphans = "(sh -c 'echo $$ >> orphans' &); (setsid sh -c 'echo $$ >> orphans' &); "
    info = h.start(1, f"for i in $(seq 20); do {orphans}done; echo started > gate; sleep 1000")
    orphans_file, gate = h.spool / "1.1" / "orphans", h.spool / "1.1" / "gate"
    wait_for(ready(gate))

    def reaped() -> bool:
        pids = [int(p) for p in orphans_file.read_text().split()]
        return len(pids) == 40 and not zombie_children() - {info.pid} and not any(map(alive, pids))

    h.polling_until(reaped)
    assert h.runner.running() == [(1, info.token)]  # while the job runs on
    h.runner.cancel(1, info.token, time.monotonic(), "test")
    assert h.result(1).outcome == "cancelled"


def test_background_children_die_with_a_cancel(h: Harness) -> None:
    info = h.start(1, "sleep 1000 & echo $!; wait")
    wait_for(ready(Path(info.stdout_path)))
    child = int(Path(info.stdout_path).read_text())
    h.runner.cancel(1, info.token, time.monotonic(), "test")
    assert h.result(1).outcome == "cancelled"
    h.polling_until(lambda: not alive(child))


def test_background_children_die_when_the_leader_exits(h: Harness) -> None:
    done = h.run(1, "sleep 1000 & echo $!; exit 4")
    assert (done.outcome, done.exit_code) == ("exited", 4)
    h.polling_until(lambda: not alive(int(done.stdout_tail)))


def test_group_is_killed_when_the_leader_exits_even_without_markers(h: Harness) -> None:
    # env -i drops the marker: only the process group can still find this child.
    done = h.run(1, "env -i sleep 1000 & echo $!")
    assert done.exit_code == 0
    h.polling_until(lambda: not alive(int(done.stdout_tail)))


def test_escape_during_the_grace_period_is_still_killed(h: Harness, tmp_path: Path) -> None:
    (tmp_path / "late.sh").write_text("trap '' TERM\necho $$ > late\nexec sleep 1000\n")
    grace = 0.5 * time_factor()
    command = "trap 'setsid sh late.sh & exit 0' TERM; echo up; sleep 1000 & wait"
    info = h.start(1, command, cwd=str(tmp_path), cancel_grace=grace)
    wait_for(ready(Path(info.stdout_path)))
    cancelled_at = time.monotonic()
    h.runner.cancel(1, info.token, cancelled_at, "test")
    done = h.result(1)
    # The leader exited at once, but the job is not over while its late escapee lives.
    assert done.ended - cancelled_at >= grace
    assert (done.outcome, done.exit_code) == ("cancelled", 0)
    h.polling_until(lambda: not alive(int((tmp_path / "late").read_text())))


HOSTILE = (
    "(setsid sh -c 'trap \"\" TERM; echo $$ > escapee; exec sleep 1000' &); "
    "trap '' TERM; echo up; sleep 1000"
)


def test_double_forked_setsid_escapee_is_killed_on_cancel(h: Harness) -> None:
    info = h.start(1, HOSTILE, cancel_grace=0.3 * time_factor())
    escapee_file = h.spool / "1.1" / "escapee"
    wait_for(ready(escapee_file))
    escapee = int(escapee_file.read_text())
    assert escapee in marked(info.marker)
    assert os.getsid(escapee) != info.pid  # it really left the job's session
    h.runner.cancel(1, info.token, time.monotonic(), "test")
    assert h.result(1).outcome == "cancelled"
    h.polling_until(lambda: not marked(info.marker))


def test_double_forked_escapee_is_killed_after_a_normal_exit(h: Harness) -> None:
    command = (
        "(setsid sh -c 'echo $$ > escapee; exec sleep 1000' &); until test -s escapee; do :; done"
    )
    info = h.start(1, command)
    assert h.result(1).exit_code == 0
    escapee = int((h.spool / "1.1" / "escapee").read_text())
    h.polling_until(lambda: not alive(escapee), timeout=defaults.ORPHAN_SWEEP_INTERVAL + 5)
    assert not marked(info.marker)


def test_what_a_job_leaves_in_its_cgroup_dies_with_it(tmp_path: Path) -> None:
    """A job's end kills what it left in its cgroup at once, not at the next sweep."""
    need_cgroups()
    h = Harness(tmp_path / "spool", [], cgroups=True)
    try:
        command = (
            "(setsid sh -c 'echo $$ > escapee; exec sleep 1000' &); "
            "until test -s escapee; do :; done"
        )
        h.run(9, "true")  # its end sweeps (the first sweep is due at once): the next is 1 s on
        h.start(1, command)
        assert h.result(1).exit_code == 0
        escapee = int((h.spool / "1.1" / "escapee").read_text())
        # No poll from here on, so no sweep: only the end's own kill can have stopped it.
        wait_for(lambda: not alive(escapee), timeout=5)
        h.polling_until(lambda: not h.runner.running())
    finally:
        h.runner.launcher.close()
        assert h.runner.cgroups is not None
        h.runner.cgroups.close()


def test_time_limit(h: Harness) -> None:
    info = h.start(1, "sleep 1000", time_limit=0.2)
    done = h.result(1)
    assert (done.outcome, done.signal) == ("timeout", 15)
    assert done.ended - info.started >= 0.2
    assert b"time limit of 0.2s" in done.stderr_tail


def test_cancel_after_the_job_ended_keeps_its_own_outcome(h: Harness) -> None:
    info = h.start(1, "exit 5")
    assert info.pid is not None
    wait_for(lambda: not alive(info.pid))  # type: ignore[arg-type]
    h.runner.cancel(1, info.token, time.monotonic(), "too late")
    done = h.result(1)
    assert (done.outcome, done.exit_code) == ("exited", 5)


def test_cancel_of_unknown_or_finished_jobs_is_a_no_op(h: Harness) -> None:
    h.runner.cancel(99, 1, time.monotonic(), "nothing there")
    info = h.start(1, "true")
    h.result(1)
    h.runner.cancel(1, info.token, time.monotonic(), "after the end")
    assert h.poll() == []


def test_kill_stale_kills_at_once_and_reports_nothing(h: Harness) -> None:
    info = h.start(1, "sleep 1000 & echo $!; sleep 1000")
    wait_for(ready(Path(info.stdout_path)))
    pids = [info.pid, int(Path(info.stdout_path).read_text())]
    h.runner.kill_stale(1, info.token)
    assert h.runner.running() == []
    h.polling_until(lambda: not any(alive(p) for p in pids if p is not None))
    assert h.finished == {}


def test_shutdown_all_cancels_everything(h: Harness) -> None:
    first, second = h.start(1, "sleep 1000"), h.start(2, "sleep 1000")
    assert sorted(h.runner.running()) == [(1, first.token), (2, second.token)]
    h.runner.shutdown_all(time.monotonic())
    assert h.result(1).outcome == h.result(2).outcome == "cancelled"
    assert h.runner.running() == []


def test_start_is_idempotent_per_attempt(h: Harness) -> None:
    first = h.start(1, "sleep 1000")
    assert h.start(1, "sleep 1000") is first
    assert len(h.runner.running()) == 1


def test_wakeup_fds_signal_an_exit(h: Harness) -> None:
    import select

    h.start(1, "exit 0")
    fds = h.runner.wakeup_fds()
    assert len(fds) == 1
    readable, _, _ = select.select(fds, [], [], 5 * time_factor())
    assert readable == fds
    assert h.result(1).exit_code == 0
    assert h.runner.wakeup_fds() == []
