"""Many users on one cluster (SPEC §6): jobs run as their owners, in a clean world, and the
daemons' secrets stay with the daemons. Real Unix accounts (made with useradd for this module
and removed after, whatever happens), a real broker and real workers.

These tests need root, as CI has: without it they are skipped, and under CI they fail.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

import banyan
from banyan import keys
from banyan.cli import status as status_cli
from banyan.cli import submit as submit_cli
from banyan.client import Client, JobInfo
from banyan.errors import Forbidden
from banyan.worker import accounts
from tests.cluster import Cluster, cannot_run, scaled, wait_for

REPO = Path(banyan.__file__).resolve().parents[1]


def need_root() -> None:
    if os.geteuid() != 0:
        cannot_run("these tests make Unix accounts and need root (CI runs as root)")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class Users:
    alice: User
    bob: User
    group: str  # a supplementary group of alice's
    missing: str  # an account name no machine here has
    nofile: int  # alice's soft limit on open files, from limits.d


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _kill_processes_of(uid: int) -> None:
    """Whatever a test's jobs left running as this (test-made) account, by pid."""
    for p in psutil.process_iter(["pid", "uids"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and p.info["uids"].real == uid:
                p.kill()


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    need_root()
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    group, names = f"bnyg{tag}", (f"bnya{tag}", f"bnyb{tag}")
    made: list[str] = []
    grouped = False
    limits = Path(accounts.LIMITS[1]).parent / f"90-banyan-test-{tag}.conf"
    try:
        _run("groupadd", group)
        grouped = True
        _run("useradd", "-m", "-s", "/bin/sh", "-G", group, names[0])
        made.append(names[0])
        _run("useradd", "-m", "-s", "/bin/sh", names[1])
        made.append(names[1])
        a, b = (pwd.getpwnam(n) for n in names)
        limits.parent.mkdir(parents=True, exist_ok=True)
        limits.write_text(f"{a.pw_name} soft nofile 777\n")
        yield Users(
            User(a.pw_name, a.pw_uid, a.pw_gid, a.pw_dir),
            User(b.pw_name, b.pw_uid, b.pw_gid, b.pw_dir),
            group,
            f"bnyz{tag}",
            777,
        )
    finally:
        limits.unlink(missing_ok=True)
        for name in made:
            with contextlib.suppress(KeyError):
                _kill_processes_of(pwd.getpwnam(name).pw_uid)
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=60)
        if grouped:
            subprocess.run(["groupdel", group], capture_output=True, timeout=60)


@pytest.fixture
def cluster(users: Users, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A cluster whose files every account may reach by path (0711), unlike pytest's own
    temporary directories: whatever keeps a job out is then the file's own mode."""
    root = Path(tempfile.mkdtemp(prefix="banyan-owners-"))
    os.chmod(root, 0o711)
    c = Cluster(root)
    monkeypatch.setenv("BANYAN_HOME", str(c.home))
    try:
        c.start_broker()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def client_for(cluster: Cluster, name: str, account: str | None = None) -> Client:
    """A client with a user key made as `banyan-keygen user NAME [--unix-user ACCOUNT]`."""
    _, secret, _ = keys.issue(cluster.home, "user", name, account)
    home = cluster.root / f"client-{name}"
    (home / "keys").mkdir(parents=True)
    shutil.copyfile(secret, home / "keys" / "client.key_secret")
    os.chmod(home / "keys" / "client.key_secret", 0o600)
    shutil.copyfile(cluster.home / "keys" / "broker.key", home / "keys" / "broker.key")
    c = Client(f"127.0.0.1:{cluster.client_port}", home, timeout=scaled(5))
    cluster.clients.append(c)
    return c


def finished(cluster: Cluster, job: int, timeout: float = 30) -> JobInfo:
    admin = cluster.client()
    waited = admin.wait([job], timeout=scaled(timeout))
    assert not waited.timed_out, f"job {job} still {waited.jobs[0].state}"
    return admin.job(job)


def output(info: JobInfo) -> list[str]:
    return str(info.raw["output_tail"]["stdout"]).splitlines()


def mode(path: Path) -> tuple[str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)


def test_a_job_runs_as_its_owner_in_a_terminals_world(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1")
    alice = users.alice
    c = client_for(cluster, alice.name)
    script = (
        "id -un; id -gn; id -Gn; echo \"$HOME|$USER|$LOGNAME|$SHELL\"; pwd; stat -c '%U %a' .; "
        "umask; echo made > made.txt; stat -c '%U %a' made.txt; readlink /proc/self/fd/0; "
        "ulimit -Sn; echo $(ls /proc/self/fd); "
        "exec grep -E '^Sig(Ign|Blk)' /proc/self/status"
    )
    (j,) = c.submit(script, export="NONE").jobs
    info = finished(cluster, j)
    assert info.outcome == "success", info.raw["output_tail"]
    spool = cluster.root / "spool" / "w1" / alice.name  # the account's own, in the worker's
    assert output(info) == [
        alice.name,
        grp.getgrgid(alice.gid).gr_name,
        f"{grp.getgrgid(alice.gid).gr_name} {users.group}",
        f"{alice.home}|{alice.name}|{alice.name}|/bin/sh",
        str(spool / f"{j}.1"),
        f"{alice.name} 700",
        "0022",
        f"{alice.name} 644",
        "/dev/null",
        str(users.nofile),  # from limits.d, as a login would set it
        "0 1 2 3",  # ls's own directory is 3: none of the worker's or its helper's
        "SigBlk:\t0000000000000000",
        "SigIgn:\t0000000000000000",
    ]
    assert c.job(j).raw["account"] == alice.name
    assert mode(spool / f"{j}.1.out") == (alice.name, 0o600)
    assert mode(spool / f"{j}.1.err") == (alice.name, 0o600)
    assert mode(spool) == (alice.name, 0o700) and mode(spool.parent) == ("root", 0o711)


def test_output_files_are_opened_as_the_owner(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1")
    alice = users.alice
    c = client_for(cluster, alice.name)
    mine = Path(alice.home) / "out-%j.txt"
    (ok,) = c.submit("echo to my file", output=str(mine), umask=0o027).jobs
    forbidden = cluster.root / "not-alices.txt"  # the cluster's root: root's, 0711
    (refused,) = c.submit("echo nope", output=str(forbidden)).jobs
    assert finished(cluster, ok).outcome == "success"
    made = Path(alice.home) / f"out-{ok}.txt"
    assert made.read_text() == "to my file\n"
    assert mode(made) == (alice.name, 0o640)
    info = finished(cluster, refused)
    assert info.outcome == "failed" and info.exit_code == 127
    assert "could not start" in info.raw["output_tail"]["stderr"]
    assert "Permission denied" in info.raw["output_tail"]["stderr"]
    assert not forbidden.exists()


def test_a_link_planted_where_output_will_go_is_replaced_not_followed(
    cluster: Cluster, users: Users
) -> None:
    cluster.start_worker("w1")
    alice = users.alice
    c = client_for(cluster, alice.name)
    (first,) = c.submit("true").jobs
    assert finished(cluster, first).outcome == "success"
    mine = cluster.root / "spool" / "w1" / alice.name  # alice's: her jobs may write in it
    victim = cluster.root / "roots-file"
    victim.write_text("root's\n")
    (job,) = c.submit("echo fresh; echo oops >&2", hold=True).jobs
    for suffix in (".1.out", ".1.err", ".1.progress"):  # what alice's job could have put there
        (mine / f"{job}{suffix}").symlink_to(victim)
    c.release(job)
    info = finished(cluster, job)
    assert info.outcome == "success" and output(info) == ["fresh"]
    assert victim.read_text() == "root's\n" and mode(victim)[0] == "root"
    assert mode(mine / f"{job}.1.out") == (alice.name, 0o600)


def test_a_shell_loop_piped_into_head_ends_within_a_second(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1")
    c = client_for(cluster, users.alice.name)
    loop = (
        "s=$(date +%s%N); while :; do echo x; done | head -n1; "
        "echo $(( ($(date +%s%N) - s) / 1000000 ))"
    )
    (j,) = c.submit(loop, time_limit=scaled(10)).jobs
    info = finished(cluster, j)
    assert info.outcome == "success", info.raw["output_tail"]
    first, elapsed_ms = output(info)
    assert first == "x" and int(elapsed_ms) < scaled(1000)


def test_jobs_cannot_read_the_keys_or_the_state(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1")
    home, state = cluster.home, cluster.state_dir
    secrets_ = [home / "keys" / f"{k}.key_secret" for k in ("broker", "client", "worker")]
    probes = [f"cat {s} >/dev/null 2>&1 && echo READ {s.name}" for s in secrets_]
    probes += [
        f"ls {home} >/dev/null 2>&1 && echo LISTED home",
        f"ls {state} >/dev/null 2>&1 && echo LISTED state",
        f"cat {state}/data.mdb >/dev/null 2>&1 && echo READ state",
        f"ls {home}/keys/authorized/admin >/dev/null 2>&1 && echo LISTED admins",
    ]
    c = client_for(cluster, users.alice.name)
    (j,) = c.submit("; ".join(probes) + "; echo refused all; env | grep ^BANYAN_HOME").jobs
    info = finished(cluster, j)
    assert output(info) == ["refused all"]  # and no BANYAN_HOME in its environment
    assert mode(home) == ("root", 0o700) and mode(home / "keys") == ("root", 0o700)
    assert mode(state) == ("root", 0o700)
    assert {mode(s)[1] for s in secrets_} == {0o600}


def test_users_cannot_touch_each_others_jobs_or_output(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1", cpus=2)
    alice, bob = client_for(cluster, users.alice.name), client_for(cluster, users.bob.name)
    (victim,) = bob.submit("echo $$; echo bobs-secret; exec sleep 600").jobs
    admin = cluster.client()

    def pid() -> int | None:
        lines = admin.logs(victim).data.decode().splitlines()
        return int(lines[0]) if len(lines) >= 2 else None

    victim_pid = wait_for(pid, 20, what="bob's job to start")
    spool = cluster.root / "spool" / "w1"
    # Wherever bob's files are, alice's job cannot even tell that they exist, or how big.
    bobs = [p for p in spool.rglob(f"{victim}.1*") if p.name != f"{victim}.1"]
    assert {p.name[len(str(victim)) :] for p in bobs} == {".1.out", ".1.err", ".1.progress"}
    attack = (
        f"kill -TERM {victim_pid}; echo kill=$?; "
        + "".join(f"stat {p} >/dev/null 2>&1; echo stat=$?; " for p in bobs)
        + f"cat {bobs[0]} >/dev/null 2>&1; echo read=$?; "
        f"ls {spool} >/dev/null 2>&1; echo list=$?"
    )
    (j,) = alice.submit(attack).jobs
    info = finished(cluster, j)
    assert output(info) == ["kill=1", "stat=1", "stat=1", "stat=1", "read=1", "list=2"]
    assert "Operation not permitted" in info.raw["output_tail"]["stderr"]
    assert admin.job(victim).state == "running" and psutil.pid_exists(victim_pid)
    with pytest.raises(Forbidden, match="only they or an admin may read its output"):
        alice.logs(victim)
    seen = alice.job(victim).raw
    assert seen["output_tail"] == {"stdout": "", "stderr": ""} and seen["output_hidden"]
    assert b"bobs-secret" in bob.logs(victim).data  # its owner reads it
    assert bob.cancel([victim]).pending == [victim]
    assert finished(cluster, victim).state == "cancelled"


def test_the_submitters_environment_is_exported_as_asked(
    cluster: Cluster,
    users: Users,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster.start_worker("w1")
    alice = users.alice
    c = client_for(cluster, alice.name)
    monkeypatch.setenv("MARKER", "from-the-submitter")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("HOME", "/root")  # the submitter's machine, not alice's account here

    def env_of(**fields: object) -> dict[str, str]:
        (j,) = c.submit("env", **fields).jobs  # type: ignore[arg-type]
        info = finished(cluster, j)
        return dict(line.split("=", 1) for line in output(info) if "=" in line)

    everything = env_of()
    assert everything["MARKER"] == "from-the-submitter" and everything["LANG"] == "C.UTF-8"
    assert (everything["HOME"], everything["USER"]) == (alice.home, alice.name)
    assert not any(k in everything for k in ("BANYAN_HOME", "BANYAN_TIME_FACTOR"))

    clean = env_of(export="NONE")
    login = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "PWD", "SHLVL"}  # no worker's OLDPWD
    job_vars = {"BANYAN_JOB_ID", "BANYAN_ATTEMPT", "BANYAN_PROGRESS_FILE", "BANYAN_MARKER"}
    job_vars |= {"BANYAN_CPUS", "BANYAN_MEMORY_MB", "BANYAN_GPUS"}
    assert set(clean) <= login | job_vars | {"CUDA_VISIBLE_DEVICES", "_"}
    assert clean["HOME"] == alice.home and "MARKER" not in clean

    chosen = env_of(export="MARKER,FOO=bar")
    assert (chosen["MARKER"], chosen["FOO"]) == ("from-the-submitter", "bar")
    assert "LANG" not in chosen

    monkeypatch.setenv("BANYAN_HOME", str(cluster.root / f"client-{alice.name}"))
    port = f"127.0.0.1:{cluster.client_port}"
    argv = ["--broker", port, "--export", "FOO=from-cli", "--wait", "--", "env"]
    assert submit_cli.main(argv) == 0
    (job_id,) = [int(line) for line in capsys.readouterr().out.split()]
    cli_env = dict(line.split("=", 1) for line in output(finished(cluster, job_id)) if "=" in line)
    assert cli_env["FOO"] == "from-cli" and "MARKER" not in cli_env
    assert submit_cli.main(["--broker", port, "--export", "NOT_SET_HERE", "--", "true"]) == 2


def test_a_big_exported_environment_reaches_a_job_of_another_account(
    cluster: Cluster, users: Users, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.start_worker("w1")
    c = client_for(cluster, users.alice.name)
    for i in range(5):  # 300 KB in all: past a Unix socket's default buffer
        monkeypatch.setenv(f"BIG{i}", "x" * 60_000)
    (j,) = c.submit('echo "${#BIG0}${BIG4:+ and 4} $(id -un)"').jobs
    assert output(finished(cluster, j)) == [f"60000 and 4 {users.alice.name}"]


def test_a_job_for_an_account_missing_on_the_worker_is_explained_not_run(
    cluster: Cluster, users: Users, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.start_worker("w1")
    ghost = client_for(cluster, "ghost-key", users.missing)
    ran = cluster.root / "ran"
    (j,) = ghost.submit(f"touch {ran}").jobs
    why = f"account {users.missing} does not exist on worker w1"
    wait_for(lambda: ghost.job(j).reason == why, 20, what="the reason")
    info = cluster.client().job(j)
    assert (info.state, info.attempts, info.raw["account"]) == ("available", 0, users.missing)
    assert [a["outcome"] for a in info.raw["history"]] == ["returned"]
    (w1,) = cluster.client().workers()
    assert w1.state == "idle"
    assert not ran.exists()
    argv = ["--broker", f"127.0.0.1:{cluster.client_port}", "--json"]
    assert status_cli.main(argv) == 0  # banyan-status's REASON, as scripts read it
    (row,) = json.loads(capsys.readouterr().out)["jobs"]
    assert (row["id"], row["reason"]) == (j, why)


def test_root_jobs_wait_for_a_worker_allowed_to_run_them(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1", extra=())  # root, without --allow-root-jobs
    admin = cluster.client()  # the cluster's own admin key: bound to root, who runs the tests
    ran = cluster.root / "ran"
    (j,) = admin.submit(f"touch {ran}").jobs
    why = "worker w1 does not run jobs as root (start it with --allow-root-jobs)"
    wait_for(lambda: admin.job(j).reason == why, 20, what="the reason")
    assert admin.job(j).raw["history"] == []  # never even offered
    cluster.start_worker("w2")  # allowed
    assert finished(cluster, j).outcome == "success" and ran.exists()
    assert admin.job(j).worker == "w2"


def python_for(user: User) -> tuple[str, dict[str, str]]:
    """An interpreter `user` may run, and the PYTHONPATH that finds Banyan and its packages
    (the test's own may live where only root can reach, such as /root/.pyenv)."""
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), *site.getsitepackages()])}
    for exe in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if not exe:
            continue
        probe = [exe, "-c", "import banyan.cli.worker"]
        try:
            done = subprocess.run(probe, user=user.uid, env=env, capture_output=True, timeout=60)
        except OSError:  # not even executable by this user
            continue
        if done.returncode == 0:
            return exe, env
    pytest.fail(f"no Python here that {user.name} may run with Banyan's packages")


def start_worker_as(cluster: Cluster, user: User, name: str, *extra: str) -> None:
    """A worker running as `user` (not root), with a copy of the cluster's worker key."""
    exe, env = python_for(user)
    home = cluster.root / f"worker-home-{name}"
    (home / "keys").mkdir(parents=True)
    for f in ("worker.key_secret", "broker.key"):
        shutil.copyfile(cluster.home / "keys" / f, home / "keys" / f)
    os.chmod(home / "keys" / "worker.key_secret", 0o600)
    spool = cluster.root / f"spool-{name}"
    spool.mkdir()
    for path in (home, home / "keys", *(home / "keys").iterdir(), spool):
        os.chown(path, user.uid, user.gid)
    args = ["-m", "banyan.cli.worker", "--broker", f"127.0.0.1:{cluster.worker_port}"]
    args += ["--name", name, "--cpus", "2", "--memory", "1000", "--gpus", "0"]
    args += ["--spool", str(spool), "--log-level", "debug", *extra]
    log = open(cluster.root / f"{name}.log", "ab")  # noqa: SIM115 - the process's
    proc = subprocess.Popen(
        [exe, *args],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        env={**cluster.env, **env, "BANYAN_HOME": str(home), "HOME": user.home},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    cluster.procs[name] = proc
    cluster.wait_worker(name)


def test_a_worker_not_root_runs_only_its_own_accounts_jobs(cluster: Cluster, users: Users) -> None:
    start_worker_as(cluster, users.alice, "wa")
    alice, bob = client_for(cluster, users.alice.name), client_for(cluster, users.bob.name)
    (theirs,) = bob.submit("id -un").jobs
    (mine,) = alice.submit("id -un").jobs
    assert output(finished(cluster, mine)) == [users.alice.name]
    why = (
        f"worker wa runs only {users.alice.name}'s jobs (it is not root, and was not started "
        "with --run-any-owner)"
    )
    wait_for(lambda: bob.job(theirs).reason == why, 20, what="the reason")
    assert cluster.client().job(theirs).raw["history"] == []  # never assigned there

    start_worker_as(cluster, users.alice, "wany", "--run-any-owner")
    info = finished(cluster, theirs)
    assert info.worker == "wany" and output(info) == [users.alice.name]  # as the worker's


@pytest.fixture
def bobs_broker(users: Users) -> Iterator[Cluster]:
    """A broker run by bob (its keys, store and local admin key are bob's), as an operator
    runs one under an account of its own; root's workers have a root-owned copy of its
    worker key."""
    bob = users.bob
    root = Path(tempfile.mkdtemp(prefix="banyan-bobs-broker-"))
    os.chmod(root, 0o711)
    c = Cluster(root)
    c.home = root / "bob-home"
    c.state_dir = c.home / "state"
    c.home.mkdir()
    os.chown(c.home, bob.uid, bob.gid)
    exe, env = python_for(bob)
    args = ["-m", "banyan.cli.broker", "--client-port", str(c.client_port)]
    args += ["--worker-port", str(c.worker_port), "--heartbeat", "0.2", "--log-level", "debug"]
    log = open(root / "broker.log", "ab")  # noqa: SIM115 - the process's
    login = {"HOME": bob.home, "USER": bob.name, "LOGNAME": bob.name}
    c.procs["broker"] = subprocess.Popen(
        [exe, *args],
        user=bob.uid,
        group=bob.gid,
        extra_groups=[],
        env={**c.env, **env, **login, "BANYAN_HOME": str(c.home)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_for(c._pings, 20, what="bob's broker to answer")
        workers_home = root / "root-worker-home"
        (workers_home / "keys").mkdir(parents=True)
        for f in ("worker.key_secret", "broker.key"):
            shutil.copyfile(c.home / "keys" / f, workers_home / "keys" / f)
        os.chmod(workers_home / "keys" / "worker.key_secret", 0o600)
        c.env["BANYAN_HOME"] = str(workers_home)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_root_workers_run_no_job_as_the_brokers_account(bobs_broker: Cluster, users: Users) -> None:
    cluster, bob = bobs_broker, users.bob
    cluster.start_worker("w1", extra=())  # root, without --allow-root-jobs
    admin = cluster.client()  # the broker's local admin key: bound to bob, who runs it
    secret = cluster.home / "keys" / "broker.key_secret"
    (j,) = admin.submit(f"id -un; head -c 10 {secret} >/dev/null && echo READ").jobs
    why = (
        f"worker w1 does not run jobs as the broker's account {bob.name} "
        "(start it with --allow-root-jobs)"
    )
    wait_for(lambda: admin.job(j).reason == why, 20, what="the reason")
    assert admin.job(j).raw["account"] == bob.name
    assert admin.job(j).raw["history"] == []  # never even offered
    (w1,) = admin.request("workers", {})["workers"]
    assert w1["state"] == "idle" and w1["refused_accounts"][bob.name] == why

    # bob's own worker (the one-account setup, as `make demo` as a user) runs bob's jobs.
    start_worker_as(cluster, bob, "wb")
    info = finished(cluster, j)
    assert info.worker == "wb" and output(info) == [bob.name, "READ"]

    cluster.start_worker("w2", extra=("--allow-root-jobs",))  # told to: it runs them too
    cluster.kill("wb", signal.SIGTERM)
    (k,) = admin.submit("id -un").jobs
    info = finished(cluster, k)
    assert info.worker == "w2" and output(info) == [bob.name]


def _home_with_worker_key(cluster: Cluster, name: str) -> Path:
    """A home holding a copy of the cluster's worker key (and its broker's public key)."""
    home = cluster.root / name
    (home / "keys").mkdir(parents=True)
    for f in ("worker.key_secret", "broker.key"):
        shutil.copyfile(cluster.home / "keys" / f, home / "keys" / f)
    return home


def _start_worker(cluster: Cluster, home: Path, name: str) -> subprocess.CompletedProcess[str]:
    """A worker started with `home`'s key, run until it exits."""
    argv = [sys.executable, "-m", "banyan.cli.worker", "--name", name]
    argv += ["--broker", f"127.0.0.1:{cluster.worker_port}"]
    env = {**cluster.env, "BANYAN_HOME": str(home)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=scaled(30))


def test_a_worker_refuses_a_secret_key_others_can_read(cluster: Cluster) -> None:
    home = _home_with_worker_key(cluster, "careless")
    secret = home / "keys" / "worker.key_secret"
    os.chmod(secret, 0o644)
    done = _start_worker(cluster, home, "careless")
    assert done.returncode == 2
    assert f"chmod 600 {secret}" in done.stderr
    assert cluster.client().workers() == []


def test_a_root_worker_refuses_a_secret_key_another_account_owns(
    cluster: Cluster, users: Users
) -> None:
    home = _home_with_worker_key(cluster, "alices-key")
    secret = home / "keys" / "worker.key_secret"
    os.chmod(secret, 0o600)
    os.chown(secret, users.alice.uid, users.alice.gid)  # alice can read it: act as the worker
    done = _start_worker(cluster, home, "borrowed")
    assert done.returncode == 2, done.stderr
    assert f"belongs to {users.alice.name}, not to root" in done.stderr
    assert f"chown root {secret}" in done.stderr
    assert cluster.client().workers() == []


def test_progress_helper_reports_from_a_python_job(cluster: Cluster, users: Users) -> None:
    cluster.start_worker("w1")
    c = client_for(cluster, users.alice.name)
    exe, env = python_for(users.alice)
    gate = cluster.root / "gate"
    code = (
        "import banyan, os, time; banyan.progress(42.5, 'epoch 3/10'); "
        f"[time.sleep(0.02) for _ in range(3000) if not os.path.exists({str(gate)!r})]"
    )
    (j,) = c.submit(f'{exe} -c "{code}"', env=env).jobs

    def reported() -> bool:
        info = c.job(j)
        return (info.progress, info.progress_message) == (42.5, "epoch 3/10")

    wait_for(reported, 20, what="the job's progress")
    gate.touch()
    assert finished(cluster, j).outcome == "success"


def test_a_forged_log_chunk_from_another_worker_is_dropped(cluster: Cluster) -> None:
    from tests.test_security import RawWorker

    honest, rogue = RawWorker(cluster, "honest"), RawWorker(cluster, "rogue")
    try:
        admin = cluster.client()
        (job,) = admin.submit("true").jobs
        honest.send("claim", {"max": 1})
        (a,) = honest.expect("assign")["jobs"]
        got: dict[str, bytes] = {}
        reader = threading.Thread(target=lambda: got.update(data=admin.logs(job).data))
        reader.start()
        ask = honest.expect("fetch_log")
        chunk = {"request": ask["request"], "offset": 0, "size": 6, "eof": False, "error": None}
        rogue.send("log_chunk", {**chunk, "data": b"forged"})
        honest.send("log_chunk", {**chunk, "data": b"honest"})
        reader.join(scaled(10))
        assert got == {"data": b"honest"}
        assert a["job"] == job
    finally:
        honest.close()
        rogue.close()
