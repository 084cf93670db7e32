"""A job's world is a terminal's (SPEC §6): signals, stdin, umask, environment and files, for
jobs that keep the worker's identity (the posix_spawn path). The same for jobs started as
another account is in test_owners.py."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banyan.errors import NotFound
from banyan.worker import accounts
from tests.cluster import need_cgroups, scaled
from tests.test_runner import Harness


@pytest.fixture(params=[False, True], ids=["plain", "daemon"])
def r(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Harness]:
    """A runner as unit tests make it, and as the daemon does (cgroups on)."""
    if request.param:
        need_cgroups()
    # What a worker's own environment holds must never reach a job.
    monkeypatch.setenv("BANYAN_HOME", "/the/workers/home")
    monkeypatch.setenv("WORKER_ONLY", "secret")
    # Nor what its parent left open without close-on-exec.
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    harness = Harness(tmp_path / "spool", [], cgroups=request.param)
    yield harness
    harness.runner.shutdown_all(time.monotonic())
    harness.polling_until(lambda: not harness.runner.running(), timeout=15)
    harness.runner.launcher.close()
    if harness.runner.cgroups is not None:
        harness.runner.cgroups.close()
    os.close(inherited)


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


def env_of(r: Harness, job: int, **overrides: object) -> dict[str, str]:
    done = r.run(job, "env", **overrides)
    assert done.exit_code == 0, done.stderr_tail
    return dict(line.split("=", 1) for line in lines(done.stdout_tail) if "=" in line)


def test_signals_start_at_their_defaults_with_nothing_blocked(r: Harness) -> None:
    script = "readlink /proc/self/fd/0; echo $(ls /proc/self/fd); "
    done = r.run(1, script + "exec grep -E '^Sig(Ign|Blk)' /proc/self/status")
    assert lines(done.stdout_tail) == [
        "/dev/null",
        "0 1 2 3",  # ls's own directory is 3: none of the worker's descriptors
        "SigBlk:\t0000000000000000",
        "SigIgn:\t0000000000000000",
    ]


def test_a_shell_loop_piped_into_head_ends_at_once(r: Harness) -> None:
    # With SIGPIPE ignored, the loop's echo fails quietly for ever once head has gone.
    started = time.monotonic()
    done = r.run(2, "while :; do echo x; done | head -n1", time_limit=scaled(10))
    assert (done.outcome, done.exit_code, done.stdout_tail) == ("exited", 0, b"x\n")
    assert time.monotonic() - started < scaled(1.0)


def test_umask_is_022_unless_the_job_asks(r: Harness, tmp_path: Path) -> None:
    assert lines(r.run(4, "umask").stdout_tail) == ["0022"]
    assert lines(r.run(5, "umask", umask=0o077).stdout_tail) == ["0077"]
    made = tmp_path / "made"
    r.run(6, f"touch {made}")
    assert stat.S_IMODE(made.stat().st_mode) == 0o644


def test_the_workers_environment_never_reaches_a_job(r: Harness) -> None:
    env = env_of(r, 7)
    me = accounts.own()
    assert "BANYAN_HOME" not in env and "WORKER_ONLY" not in env
    assert (env["HOME"], env["USER"], env["LOGNAME"]) == (me.home, me.name, me.name)
    assert env["PATH"] == accounts.login_path(me.uid)
    assert env["BANYAN_JOB_ID"] == "7"


def test_the_workers_directory_never_reaches_a_job(
    r: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = tmp_path / "the-workers-own-directory"
    workers.mkdir()
    monkeypatch.chdir(workers)
    env = env_of(r, 12)  # in its own directory in the spool
    assert "OLDPWD" not in env and env["PWD"].endswith("/12.1")
    assert not any("the-workers-own-directory" in v for v in env.values())
    (tmp_path / "there").mkdir()
    env = env_of(r, 13, cwd=str(tmp_path / "there"), environment={"OLDPWD": "/submitters/last"})
    assert (env["PWD"], env["OLDPWD"]) == (str(tmp_path / "there"), "/submitters/last")


def test_the_submitters_environment_under_the_accounts_own(r: Harness) -> None:
    exported = {
        "FOO": "bar",
        "PATH": "/opt/tools/bin:/usr/bin:/bin",
        "HOME": "/home/elsewhere",
        "BANYAN_HOME": "/submitters/keys/are/here",
        "BANYAN_BROKER": "broker.example.org",
    }
    env = env_of(r, 8, environment=exported, env={"LOGNAME": "explicit"})
    assert env["FOO"] == "bar" and env["PATH"] == "/opt/tools/bin:/usr/bin:/bin"
    assert env["HOME"] == accounts.own().home  # the account's, not the submitter's machine's
    assert env["LOGNAME"] == "explicit"  # the job's own --env still wins
    assert "BANYAN_HOME" not in env and env["BANYAN_BROKER"] == "broker.example.org"


def test_spool_files_are_the_owners_alone(r: Harness) -> None:
    r.run(9, "echo out; echo err >&2")
    spool = r.spool  # the account's own directory in the spool
    assert stat.S_IMODE(spool.parent.stat().st_mode) == (0o711 if os.geteuid() == 0 else 0o700)
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert stat.S_IMODE((spool / "9.1").stat().st_mode) == 0o700
    for name in ("9.1.out", "9.1.err"):
        assert stat.S_IMODE((spool / name).stat().st_mode) == 0o600


def test_an_output_fifo_fails_the_job_instead_of_stopping_the_worker(
    r: Harness, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    starter = threading.Thread(target=r.start, args=(10, "echo hi"), kwargs={"output": str(fifo)})
    starter.start()
    starter.join(scaled(5))
    if starter.is_alive():  # stuck opening the FIFO: free it, then fail
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        starter.join(scaled(5))
        pytest.fail("starting a job whose output is a FIFO blocked the runner")
    done = r.result(10)
    assert done.exit_code == 127 and b"could not start" in done.stderr_tail


def test_an_output_file_replaced_by_a_link_is_not_read(r: Harness, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    done = r.run(11, "echo mine", output=str(out))
    assert done.stdout_tail == b"mine\n"
    secret = tmp_path / "not-the-jobs"
    secret.write_text("secret\n")
    out.unlink()
    out.symlink_to(secret)  # what a job could do to its own output path once it ended
    with pytest.raises(NotFound):
        r.runner.tail(11, 1011, "stdout", 0, 1000)
