"""The process side of a worker: start jobs, watch them, end them, and leave nothing behind.

No sockets and nothing that blocks: the daemon calls `start`, `poll`, `cancel`, `progress` and
`usage` from its single-threaded loop, passing `now`.

A job's processes are found three ways, because each alone can be escaped:

- its session and process group (the leader is started with setsid, so its pid names both);
- its descendant tree, from one pass over /proc;
- the `BANYAN_MARKER` variable in its environment, which survives setsid and double forks.

The worker is a child subreaper, so a job's orphans are reparented to it and stay findable and
reapable. A leader that has exited is kept as a zombie until its job is over, so its pid, which
names the job's group and session, cannot be handed to another process while we still signal it.

The Runner owns this process's children that live outside the worker's own session: it may
reap their zombies. Children started in the worker's session are never touched.

A job runs as the account its Launch names (accounts.py decides which): where that is not this
process's own, the launcher starts it as that account. It starts with default signal
dispositions, an empty signal mask, stdin from /dev/null and umask 022 (unless the job asks),
in its owner's login environment plus what the submitter exported (banyan/export.py), and
never with the worker's own variables. Its spool files are its owner's alone: they sit in the
account's own directory in the spool (0700, the account's), so no other account's job can even
tell which outputs exist. The owner may put anything at a path in that directory, so the
worker creates its files there afresh (never truncating what is there), changes the owner of
nothing it did not just make, and opens an owner's files only after checking that they are
still the owner's: a job cannot make a root worker read or write a file it could not.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shlex
import signal
import stat
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import psutil

from banyan import defaults, export
from banyan.errors import BadRequest, NotFound
from banyan.outputs import account_spool, job_dir, output_paths
from banyan.worker import accounts, cgroups, procs, spawn
from banyan.worker.accounts import Account
from banyan.worker.cgroups import Cgroups, move_time
from banyan.worker.launcher import ChildFailed, Launcher
from banyan.worker.procs import MARKER_VAR
from banyan.worker.progress import ProgressReport, ProgressWatch

Outcome = Literal["exited", "cancelled", "timeout"]
Key = tuple[int, int]  # (job, token)

SPAWN_FAILED = 127  # the shell's "command not found": the job never ran
# Seconds a move into a cgroup may take before the launcher is worth its round trip (~1 ms):
# moves cost 0.2-0.8 ms with `favordynmods` (or a kernel that behaves so), 10-40 ms without.
SLOW_MOVE = 0.003
# A move is slow only after a quiet moment: the kernel's switch for cgroup moves waits for an
# RCU grace period when it was idle, and stays on a little while after a move (a clone into a
# cgroup does not keep it on). Measured here (2 vCPUs, Linux 6.18, no favordynmods; median of
# 15 moves after each gap): 0.08-0.10 ms with 1-10 ms since the last move, 9.5-12 ms with
# 20-50 ms. So where the launcher is used, a job started within WARM_MOVES of the last move
# moves itself instead: under a stream of short jobs the launcher's round trip costs more than
# the move. A stream is STREAM_STARTS starts within STREAM_SPAN; its first move may be slow,
# and keeps the next ones cheap. Jobs that start less often (a 50 ms job on each of two slots)
# never move, and never wait for a grace period.
WARM_MOVES = 0.008
STREAM_STARTS, STREAM_SPAN = 4, 0.010
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
# After a TERM, how soon to look again for survivors: quick for the usual prompt exit, then
# backing off, since each look is a pass over /proc.
_FIRST_LOOK, _LAST_LOOK = 0.01, 0.5
# How long a released pid may still be waited for by number. Reusing it needs a wrap of the
# whole pid space (at least 32768 forks), which cannot happen this fast.
_REAP_WINDOW = 1.0


@dataclass(frozen=True)
class Launch:
    job: int
    token: int
    attempt: int
    command: str
    cwd: str | None
    env: dict[str, str]
    gpu_ids: list[int]
    time_limit: float | None
    cancel_grace: float
    output: str | None
    account: Account | None = None  # whom it runs as; None: this process's own account
    environment: dict[str, str] | None = None  # what the submitter exported
    umask: int | None = None  # None: defaults.UMASK
    cpus: float = 1.0  # what the job reserved: its BANYAN_CPUS
    memory: int = 0  # MiB; 0: no reservation


@dataclass(frozen=True)
class RunningJob:
    job: int
    token: int
    attempt: int
    pid: int | None  # None when the job could not be started
    started: float
    stdout_path: str
    stderr_path: str
    progress_path: str
    marker: str  # the value of BANYAN_MARKER in the job's environment
    uid: int = -1  # whose its output files must be for the worker to read or append to them


@dataclass(frozen=True)
class Finished:
    job: int
    token: int
    outcome: Outcome
    exit_code: int | None
    signal: int | None
    stdout_tail: bytes
    stderr_tail: bytes
    started: float
    ended: float


def _open_owned(path: str, flags: int, uid: int) -> int:
    """Open an existing output file of a job run by `uid`, refusing anything else that may
    have taken its path since (a link to another user's file, a FIFO, a device): a root
    worker must not read or write what the job's owner could not."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    st = os.fstat(fd)
    if path != os.devnull and (not stat.S_ISREG(st.st_mode) or (uid >= 0 and st.st_uid != uid)):
        os.close(fd)
        raise PermissionError(f"{path} is no longer the job's own output file")
    return fd


def _read_tail(path: str, size: int, uid: int = -1) -> bytes:
    try:
        st = os.lstat(path)
    except OSError:
        return b""
    if st.st_size == 0 and stat.S_ISREG(st.st_mode):
        return b""  # the usual stderr, and often stdout: nothing to open
    try:
        fd = _open_owned(path, os.O_RDONLY, uid)
    except OSError:
        return b""
    try:
        end = os.fstat(fd).st_size
        return os.pread(fd, size, max(0, end - size))
    except OSError:
        return b""
    finally:
        os.close(fd)


def _append(path: str, text: str, uid: int = -1) -> None:
    """Add a line of the worker's to a job's stderr; made if missing only where the job runs
    as the worker itself."""
    create = os.O_CREAT if uid in (-1, os.geteuid()) else 0
    with contextlib.suppress(OSError):
        fd = _open_owned(path, os.O_WRONLY | os.O_APPEND | create, uid)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)


def _owned_file(path: str, account: Account) -> int:
    """Create a spool file for a job of another account, its owner's alone (0600). Its
    directory is the owner's: whatever is at the path now (a link to a file of root's) is
    removed, never opened, and the file made anew (O_EXCL)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, _WRITE | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, account.uid, account.gid)
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def _first_exited() -> int | None:
    """A child that has exited and is not reaped yet (the first the kernel lists), if any:
    one syscall."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return None if info is None else info.si_pid


def _open_output(path: str, mode: int) -> int:
    """Open an output file the worker itself may write. Non-blocking while opening, so a FIFO
    without a reader fails at once instead of stopping the worker."""
    fd = os.open(path, _WRITE | os.O_NONBLOCK, mode)
    os.set_blocking(fd, True)
    return fd


@dataclass(eq=False)
class _Prep:
    """What a start takes before its process: made at the start, or ahead (Runner.stage)."""

    home: str  # its account's directory in the spool
    stem: str  # the job's own directory, and the stem of its progress file
    cwd: str
    out: str
    err: str
    marker: str
    env: dict[str, str] = field(default_factory=dict)
    cgroup: str | None = None
    fds: tuple[int, int] | None = None  # its output files, opened when staged


@dataclass(eq=False)
class _Attempt:
    info: RunningJob
    launch: Launch
    failure: str | None = None  # why it never started
    # (exit code, signal) once the leader has exited. Its zombie is reaped only when the attempt
    # is over: until then its pid, which is also the group and session id, cannot be reused.
    exit: tuple[int | None, int | None] | None = None
    pidfd: int | None = None
    outcome: Outcome = "exited"
    reason: str = ""
    kill_at: float | None = None  # SIGKILL deadline, once termination has begun
    killed: bool = False
    tracked: dict[int, int] = field(default_factory=dict)  # pid -> start, outside the group
    next_look: float = -math.inf  # when to look again for processes outliving a TERM
    look_delay: float = _FIRST_LOOK
    usage_procs: dict[tuple[int, int], psutil.Process] = field(default_factory=dict)
    watch: ProgressWatch | None = None
    cgroup: str | None = None  # its own cgroup, when the worker has them

    @property
    def key(self) -> Key:
        return self.info.job, self.info.token

    @property
    def pgid(self) -> int:
        assert self.info.pid is not None
        return self.info.pid

    @property
    def deadline(self) -> float | None:
        limit = self.launch.time_limit
        return None if limit is None else self.info.started + limit


class Runner:
    """Every running job of one worker."""

    def __init__(
        self, spool_dir: str | os.PathLike[str], visible_gpus: list[str], cgroups: bool = False
    ) -> None:
        self.spool = os.path.abspath(spool_dir)
        self.me = accounts.own()
        # The worker's alone, but where it starts jobs as other accounts they must reach their
        # own directories in it: searchable, not listable.
        make_spool(self.spool, 0o711 if self.me.uid == 0 else 0o700)
        self.visible_gpus = list(visible_gpus)
        spawn.close_inherited()
        self.subreaper = procs.become_subreaper()
        self._nonce = f"{os.getpid()}-{secrets.token_hex(4)}"
        # A cgroup per job where the kernel allows: the one hiding place the others miss
        # (setsid, a double fork and a cleared environment together).
        self.cgroups = Cgroups.make(self._nonce) if cgroups else None
        self._empty_cgroups: set[str] = set()  # of ended attempts, removed once empty
        # Where moving a process into a cgroup is slow, jobs are cloned straight into theirs;
        # where it is cheap the shell's own move costs less than asking the launcher.
        self.move_time = move_time(self.cgroups.base) if self.cgroups else None
        self.clone_into_cgroups = self.move_time is not None and self.move_time > SLOW_MOVE
        # The launcher also starts every job of another account, which only root can.
        self.launcher = Launcher(enabled=self.clone_into_cgroups or self.me.uid == 0)
        self._me = os.getpid()
        self._my_sid = os.getsid(0)
        self._jobs: dict[Key, _Attempt] = {}
        self._staged: dict[Key, tuple[Launch, _Prep]] = {}  # jobs held ahead, made ready
        self._homes: set[str] = set()  # accounts' spool directories, checked
        # The environment a job starts from, before its own variables, for the last account
        # and exported environment (_environment).
        self._last_base: tuple[tuple[Account, str] | None, dict[str, str] | None, dict[str, str]]
        self._last_base = (None, None, {})
        self._by_marker: dict[str, _Attempt] = {}
        # Groups and pids released by ended attempts, still waited for until the given time
        # (None: from the next poll) so that what we killed does not linger as zombies.
        self._reap_groups: dict[int, float | None] = {}
        self._reap_pids: dict[int, float | None] = {}
        self._logs: OrderedDict[Key, tuple[str, str, int]] = OrderedDict()
        self._sweep_at: float | None = None
        self._last_sweep = -math.inf
        self._last_move = -math.inf  # when a job last moved itself into its cgroup
        self._starts: deque[float] = deque(maxlen=STREAM_STARTS)  # when the last ones started
        self.warm_moves, self.stream_span = WARM_MOVES, STREAM_SPAN
        self.warm_starts = 0  # jobs that moved themselves for it, for the curious

    @property
    def nonce(self) -> str:
        """Every BANYAN_MARKER this runner hands out starts with `nonce:` (see watchdog.py)."""
        return self._nonce

    # --- starting -------------------------------------------------------------------------

    def stage(self, launch: Launch) -> None:
        """Make ready what starting a job held ahead takes (its directories, output files,
        environment and cgroup) while a slot is busy, so that when the slot frees only its
        process is left to start. Only a job of the worker's own account writing to the spool
        is staged: nothing of a job that may never run here may touch a file it names.
        `unstage` undoes it."""
        key = (launch.job, launch.token)
        account = launch.account or self.me
        if key in self._staged or key in self._jobs:
            return
        if account.uid != self.me.uid or launch.output is not None:
            return
        prep = self._paths(launch, account)
        try:
            self._make(launch, account, prep)
        except (OSError, ValueError):
            self._undo(launch, prep)
            return  # its start tries again, and says what went wrong
        try:
            mode = 0o600  # spool files: the owner's alone
            out_fd = _open_output(prep.out, mode)
            try:
                err_fd = os.dup(out_fd) if prep.err == prep.out else _open_output(prep.err, mode)
            except OSError:
                os.close(out_fd)
                raise
        except OSError:
            self._undo(launch, prep)
            return
        prep.fds = (out_fd, err_fd)
        self._staged[key] = (launch, prep)

    def staged(self) -> list[Key]:
        return list(self._staged)

    def longest_running(self, now: float) -> float:
        """Seconds the longest-running job has run (0 when none runs)."""
        return max(
            (now - a.info.started for a in self._jobs.values() if a.exit is None), default=0.0
        )

    def unstage(self, key: Key) -> None:
        """Undo `stage` for a job that will not start here (asked back, cancelled, dropped)."""
        launch, prep = self._staged.pop(key)
        if prep.fds is not None:
            for fd in prep.fds:
                os.close(fd)
        for path in {prep.out, prep.err}:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._undo(launch, prep)

    def _undo(self, launch: Launch, prep: _Prep) -> None:
        if not launch.cwd:
            with contextlib.suppress(OSError):
                os.rmdir(prep.stem)
        if prep.cgroup:
            cgroups.remove(prep.cgroup)

    def _paths(self, launch: Launch, account: Account) -> _Prep:
        home = account_spool(self.spool, account.name)
        stem = job_dir(home, launch.job, launch.attempt)
        cwd = os.path.abspath(launch.cwd) if launch.cwd else stem
        out, err = output_paths(launch.output, home, cwd, launch.job, launch.attempt)
        return _Prep(home, stem, cwd, out, err, f"{self._nonce}:{launch.job}:{launch.token}")

    def _make(self, launch: Launch, account: Account, prep: _Prep) -> None:
        """Make the job's directories, environment and cgroup."""
        home, stem, cwd = prep.home, prep.stem, prep.cwd
        if home not in self._homes:  # checked once; made anew if spool cleaning removed it
            self._account_dir(home, account)
            self._homes.add(home)
        elif not os.path.isdir(home):
            self._homes.discard(home)
            self._account_dir(home, account)
            self._homes.add(home)
        if not launch.cwd:
            # The job gets a directory of its own, its owner's alone. It is left in place
            # like the output files (rmdir costs up to a ms on some filesystems); spool
            # retention removes it.
            with contextlib.suppress(FileExistsError):
                os.mkdir(stem, 0o700)
                if account.uid != self.me.uid:
                    # Not through a link the owner may have put in its place meanwhile.
                    os.chown(stem, account.uid, account.gid, follow_symlinks=False)
        elif account.uid == self.me.uid and not os.path.isdir(cwd):
            raise NotADirectoryError(f"working directory {cwd!r} does not exist")
        prep.env = self._environment(launch, account, stem + ".progress", prep.marker)
        prep.cgroup = self.cgroups.create(launch.job, launch.token) if self.cgroups else None

    def start(self, launch: Launch, now: float) -> RunningJob:
        key = (launch.job, launch.token)
        if key in self._jobs:
            return self._jobs[key].info
        account = launch.account or self.me
        staged = self._staged.pop(key, None)
        launch, prep = staged if staged is not None else (launch, self._paths(launch, account))
        pid: int | None = None
        failure: str | None = None
        try:
            if staged is None:
                self._make(launch, account, prep)
            self._starts.append(now)
            warm = now - self._last_move < self.warm_moves or (
                len(self._starts) == STREAM_STARTS and now - self._starts[0] < self.stream_span
            )
            moved = self.warm_starts
            pid = self._spawn(launch, account, prep, warm)
            if self.warm_starts != moved:
                self._last_move = now
        except ChildFailed as e:
            if e.pid > 0:
                self._reap_pids[e.pid] = None
            failure = f"banyan: job {launch.job} attempt {launch.attempt} could not start: {e}\n"
            _append(prep.err, failure, account.uid)
        except (OSError, ValueError) as e:
            failure = f"banyan: job {launch.job} attempt {launch.attempt} could not start: {e}\n"
            _append(prep.err, failure, account.uid)
        finally:
            for fd in prep.fds or ():
                os.close(fd)
            prep.fds = None
        info = RunningJob(
            job=launch.job,
            token=launch.token,
            attempt=launch.attempt,
            pid=pid,
            started=now,
            stdout_path=prep.out,
            stderr_path=prep.err,
            progress_path=prep.stem + ".progress",
            marker=prep.marker,
            uid=account.uid,
        )
        a = _Attempt(info, launch, failure=failure, cgroup=prep.cgroup)
        if pid is not None:
            a.watch = ProgressWatch(info.progress_path, now, account.uid)
            with contextlib.suppress(OSError, AttributeError):
                a.pidfd = os.pidfd_open(pid)
        self._jobs[key] = a
        self._by_marker[prep.marker] = a
        return info

    def _account_dir(self, path: str, account: Account) -> None:
        """Make the account's directory in the spool at its first job here: its own, 0700.
        The spool is the worker's, so nothing can take its place between mkdir and chown."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != account.uid:
                raise PermissionError(
                    f"{path} in the spool is not {account.name}'s own directory"
                ) from None
            return
        if account.uid != self.me.uid:
            os.chown(path, account.uid, account.gid)

    def _environment(
        self, launch: Launch, account: Account, progress: str, marker: str
    ) -> dict[str, str]:
        """The account's login environment, what the submitter exported (never the daemons'
        variables), the account's own HOME, USER, LOGNAME and SHELL, the job's --env, and
        the worker's variables for the job (banyan/export.py)."""
        # A stream of jobs comes from one submitter: the same account, login PATH (login.defs
        # is read again when it changes) and environment.
        login = (account, accounts.login_path(account.uid))
        last_login, last_environment, base = self._last_base
        if login != last_login or launch.environment != last_environment:
            base = account.login_environment()
            if launch.environment:
                base.update(export.exported(launch.environment))
                base.update(account.variables())
            self._last_base = (login, launch.environment, base)
        env = dict(base)
        env.update(launch.env)
        env["BANYAN_JOB_ID"] = str(launch.job)
        env["BANYAN_ATTEMPT"] = str(launch.attempt)
        env["BANYAN_PROGRESS_FILE"] = progress
        # What it reserved, so it can size its threads and buffers to match.
        env["BANYAN_CPUS"] = f"{launch.cpus:g}"
        env["BANYAN_MEMORY_MB"] = str(launch.memory)
        env["BANYAN_GPUS"] = str(len(launch.gpu_ids))
        # Always set, even to "": a job must not see GPUs it was not given.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self._gpu_name(i) for i in launch.gpu_ids)
        env[MARKER_VAR] = marker
        return env

    def _spawn(self, launch: Launch, account: Account, prep: _Prep, warm: bool = False) -> int:
        cwd, env, outputs, cgroup = prep.cwd, prep.env, (prep.out, prep.err), prep.cgroup
        # Neither start has a chdir action, so the shell changes directory itself (as the
        # job's owner); on the same line as the command, so the user's line numbers in error
        # messages stay right. The cd leaves the directory it left (the worker's) in OLDPWD:
        # the job gets the one it was given, if any, as a shell started there would.
        umask = defaults.UMASK if launch.umask is None else launch.umask
        oldpwd = f"OLDPWD={shlex.quote(env['OLDPWD'])}" if "OLDPWD" in env else "unset OLDPWD"
        script = (
            f"umask {umask:04o}; cd -- {shlex.quote(cwd)} || exit {SPAWN_FAILED}; {oldpwd}; "
            f"{launch.command}"
        )
        if account.uid != self.me.uid:
            return self._spawn_as(account, script, env, outputs, cgroup, umask, launch.output)
        out, err = outputs
        # Spool files are the owner's alone; a file the job names takes the usual mode.
        mode = 0o600 if launch.output is None else 0o666
        with contextlib.ExitStack() as fds:
            if prep.fds is not None:  # staged: opened already, closed by the caller
                out_fd, err_fd = prep.fds
            else:
                out_fd = _open_output(out, mode)
                fds.callback(os.close, out_fd)
                err_fd = os.dup(out_fd) if err == out else _open_output(err, mode)
                fds.callback(os.close, err_fd)
            if warm and cgroup and self.clone_into_cgroups:
                self.warm_starts += 1
            elif cgroup and self.clone_into_cgroups and not self.launcher.broken:
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                fds.callback(os.close, null)
                argv = ["/bin/sh", "-c", script]
                pid = self.launcher.spawn(argv, env, (null, out_fd, err_fd), cgroup, umask=umask)
                if pid is not None:
                    return pid
                # The launcher failed mid-request: whatever it may have started for this
                # attempt before it died is in this fresh cgroup. None of it may run twice.
                cgroups.kill(cgroup)
            if cgroup:  # no launcher here: the shell moves itself in first
                script = cgroups.join_script(cgroup) + script
            return spawn.spawn(["/bin/sh", "-c", script], env, out_fd, err_fd)

    def _spawn_as(
        self,
        account: Account,
        script: str,
        env: dict[str, str],
        outputs: tuple[str, str],
        cgroup: str | None,
        umask: int,
        template: str | None,
    ) -> int:
        """Start a job as another account, through the launcher (only root gets here). Its
        spool files are made here for it; files it names, it opens itself as its owner."""
        argv = ["/bin/sh", "-c", script]
        with contextlib.ExitStack() as fds:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            fds.callback(os.close, null)
            stdio: tuple[int, ...] = (null,)
            if template is None:
                out, err = outputs
                out_fd = _owned_file(out, account)
                fds.callback(os.close, out_fd)
                err_fd = _owned_file(err, account)
                fds.callback(os.close, err_fd)
                stdio = (null, out_fd, err_fd)
            # Its progress file too: the spool is the worker's, so the job could not make it.
            os.close(_owned_file(env["BANYAN_PROGRESS_FILE"], account))
            paths = outputs if template is not None else None
            pid = self.launcher.spawn(argv, env, stdio, cgroup, account.identity(), paths, umask)
        if pid is None:
            if cgroup:
                cgroups.kill(cgroup)  # none of what it may have started may run twice
            raise OSError("this worker cannot start jobs as other accounts: its launcher failed")
        return pid

    def _gpu_name(self, index: int) -> str:
        return self.visible_gpus[index] if 0 <= index < len(self.visible_gpus) else str(index)

    # --- watching -------------------------------------------------------------------------

    def running(self) -> list[Key]:
        return list(self._jobs)

    def wakeup_fds(self) -> list[int]:
        """Descriptors that become readable when a job's leader exits: poll them with zmq."""
        return [a.pidfd for a in self._jobs.values() if a.pidfd is not None and a.exit is None]

    def next_deadline(self) -> float | None:
        """The earliest `now` at which `poll` has timed work to do, if any."""
        times = [self._sweep_at] if self._sweep_at is not None else []
        for a in self._jobs.values():
            if a.kill_at is not None:
                times.append(min(a.kill_at, a.next_look) if a.exit else a.kill_at)
            elif a.deadline is not None:
                times.append(a.deadline)
        return min(times, default=None)

    def exited(self, now: float) -> list[Key]:
        """Attempts whose leader has exited by itself: their room is free for another job
        now, before `poll` finishes them (kills what they left, reads their output tails)."""
        self._reap(now)
        return [
            key
            for key, a in self._jobs.items()
            if a.info.pid is not None and a.exit is not None and a.kill_at is None
        ]

    def poll(self, now: float) -> list[Finished]:
        self._reap(now)
        live = list(self._jobs.values())
        timeouts = [a for a in live if self._timed_out(a, now)]
        if timeouts:
            self._terminate(timeouts, now, "timeout", None)
        overdue = [a for a in live if a.kill_at is not None and not a.killed and now >= a.kill_at]
        if overdue:
            self._kill(overdue)
        done: list[Finished] = []
        lingering: list[_Attempt] = []
        for a in live:
            if a.info.pid is None:
                done.append(self._finish(a, now))
            elif a.exit is None:
                continue
            elif a.kill_at is None:
                # Ended by itself: nothing it started may outlive it.
                procs.signal_group(a.pgid, signal.SIGKILL)
                # Most jobs leave nothing behind: their cgroup goes at once. A kill costs the
                # kernel work that slowed the next start by ~1 ms even on an empty cgroup, so
                # only one that is not empty gets it (and is removed by the sweep).
                if a.cgroup and cgroups.remove(a.cgroup):
                    a.cgroup = None
                elif a.cgroup:
                    cgroups.kill(a.cgroup)
                self._schedule_sweep()
                done.append(self._finish(a, now))
            elif a.killed:
                done.append(self._finish(a, now))
            elif now >= a.next_look:
                lingering.append(a)
        if lingering:
            # The leader is gone after a TERM; the job is over once nothing of it is left.
            table = procs.ProcTable()
            members = self._members(table, lingering, everywhere=True)
            for a in lingering:
                survivors = members[a.key] | {p for p, s in a.tracked.items() if procs.alive(p, s)}
                if not survivors:
                    self._schedule_sweep()
                    done.append(self._finish(a, now))
                    continue
                a.tracked.update((p, table.procs[p].start) for p in members[a.key])
                a.next_look, a.look_delay = now + a.look_delay, min(2 * a.look_delay, _LAST_LOOK)
        if self._sweep_at is not None and now >= self._sweep_at:
            self._sweep(now)
        return done

    def _timed_out(self, a: _Attempt, now: float) -> bool:
        deadline = a.deadline
        ok = a.info.pid is not None and a.exit is None and a.kill_at is None
        return ok and deadline is not None and now >= deadline

    def _reap(self, now: float) -> None:
        for pending in (self._reap_groups, self._reap_pids):
            for key, until in list(pending.items()):
                if until is None:
                    pending[key] = now + _REAP_WINDOW
                elif now > until:
                    del pending[key]
        first = _first_exited()
        if first is None:
            return  # the common case: one syscall, nothing has ended
        for a in self._jobs.values():
            if a.info.pid is not None and a.exit is None:
                a.exit = procs.peek_exit(a.info.pid)
        for number, pending in ((-1, self._reap_groups), (1, self._reap_pids)):
            for key in list(pending):
                if not procs.reap_some(number * key):
                    del pending[key]
        self._reap_orphans(first)

    def _reap_orphans(self, first: int | None = None) -> None:
        """Reap every exited process that came to us as a subreaper (a job's orphans: a fork
        loop makes thousands, each holding a pid and counting against its account's process
        limit), but the leaders of running attempts, held on purpose, and the children of
        the worker's own session.

        `first`, the child the kernel shows first among those exited: the leader of an
        attempt that ended by itself (the usual case, a job that left nothing) needs no look
        at the others now. Its end reaps it, and whatever exited behind it is the first the
        next poll sees."""
        if first is not None:
            a = next((a for a in self._jobs.values() if a.info.pid == first), None)
            if a is not None and a.exit is not None and a.kill_at is None:
                return
        exited = procs.exited_children(self._me)
        if exited is None:  # no child lists here: the sweep's pass over /proc reaps them
            self._schedule_sweep()
            return
        leaders = {a.info.pid for a in self._jobs.values()}
        for pid, sid in exited:
            if pid not in leaders and sid != self._my_sid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _members(
        self, table: procs.ProcTable, attempts: list[_Attempt], everywhere: bool
    ) -> dict[Key, set[int]]:
        """Living processes of each attempt: its session, marked processes, their descendants.

        Environments are read for our orphans only when that is enough (a subreaper collects
        every escapee) and a miss is cheap (usage); for every process when ending a job.
        """
        wanted = {a.key for a in attempts}
        by_sid = {a.pgid: a.key for a in attempts if a.info.pid is not None}
        roots: dict[Key, set[int]] = {key: set() for key in wanted}
        for pid, st in table.procs.items():
            if st.sid in by_sid:
                roots[by_sid[st.sid]].add(pid)
        for a in attempts:
            if a.cgroup:
                roots[a.key].update(cgroups.members(a.cgroup))
        if everywhere or not self.subreaper:
            candidates: Iterable[int] = table.procs
        else:
            candidates = table.children.get(self._me, ())
        for pid in candidates:
            st = table.procs[pid]
            if st.zombie or st.sid in by_sid or pid == self._me:
                continue
            marker = procs.marker_of(pid)
            owner = self._by_marker.get(marker) if marker else None
            if owner is not None and owner.key in wanted:
                roots[owner.key].add(pid)
        return {key: table.subtree(pids) - {self._me} for key, pids in roots.items()}

    # --- ending ---------------------------------------------------------------------------

    def cancel(self, job: int, token: int, now: float, reason: str) -> None:
        a = self._jobs.get((job, token))
        if a is not None:
            self._cancel([a], now, reason)

    def shutdown_all(self, now: float) -> None:
        self._cancel(list(self._jobs.values()), now, "the worker is shutting down")

    def _cancel(self, attempts: list[_Attempt], now: float, reason: str) -> None:
        pending = []
        for a in attempts:
            if a.info.pid is None or a.kill_at is not None or a.exit is not None:
                continue
            a.exit = procs.peek_exit(a.info.pid)  # an exit that already happened keeps its outcome
            if a.exit is None:
                pending.append(a)
        if pending:
            self._terminate(pending, now, "cancelled", reason)

    def kill_stale(self, job: int, token: int) -> None:
        """SIGKILL an attempt that is no longer ours and forget it: it reports nothing."""
        a = self._jobs.get((job, token))
        if a is None:
            return
        if a.info.pid is not None:
            self._kill([a])
            self._reap_pids[a.info.pid] = None
        self._forget(a)

    def _terminate(
        self, attempts: list[_Attempt], now: float, outcome: Outcome, reason: str | None
    ) -> None:
        table = procs.ProcTable()
        members = self._members(table, attempts, everywhere=True)
        for a in attempts:
            a.outcome, a.kill_at = outcome, now + max(0.0, a.launch.cancel_grace)
            a.reason = reason or f"time limit of {a.launch.time_limit or 0:g}s reached"
            procs.signal_group(a.pgid, signal.SIGTERM)
            for pid in members[a.key]:
                st = table.procs[pid]
                if st.pgid != a.pgid:  # the group already got its one SIGTERM
                    procs.signal(pid, signal.SIGTERM)
                    a.tracked[pid] = st.start

    def _kill(self, attempts: list[_Attempt]) -> None:
        table = procs.ProcTable()
        members = self._members(table, attempts, everywhere=True)
        for a in attempts:
            procs.signal_group(a.pgid, signal.SIGKILL)
            if a.cgroup:
                cgroups.kill(a.cgroup)
            doomed = set(members[a.key])
            doomed.update(p for p, s in a.tracked.items() if procs.alive(p, s))
            for pid in doomed:
                procs.signal(pid, signal.SIGKILL)
            a.killed = True
            self._reap_pids.update(
                (p, None) for p in doomed if table.procs.get(p, procs.NOBODY).ppid == self._me
            )
        self._schedule_sweep()

    def _finish(self, a: _Attempt, now: float) -> Finished:
        info = self._forget(a)
        self._logs[a.key] = (info.stdout_path, info.stderr_path, info.uid)
        while len(self._logs) > defaults.FINISHED_LOGS_KEPT:
            self._logs.popitem(last=False)
        if a.outcome == "cancelled":
            _append(info.stderr_path, f"banyan: job {info.job} cancelled: {a.reason}\n", info.uid)
        elif a.outcome == "timeout":
            _append(info.stderr_path, f"banyan: job {info.job} killed: {a.reason}\n", info.uid)
        exit_code, sig = a.exit or (None, None)
        stderr_tail = _read_tail(info.stderr_path, defaults.OUTPUT_TAIL_BYTES, info.uid)
        if a.failure is not None:
            exit_code = SPAWN_FAILED
            stderr_tail = stderr_tail or a.failure.encode()[-defaults.OUTPUT_TAIL_BYTES :]
        return Finished(
            job=info.job,
            token=info.token,
            outcome=a.outcome,
            exit_code=exit_code,
            signal=sig,
            stdout_tail=_read_tail(info.stdout_path, defaults.OUTPUT_TAIL_BYTES, info.uid),
            stderr_tail=stderr_tail,
            started=info.started,
            ended=now,
        )

    def _forget(self, a: _Attempt) -> RunningJob:
        self._jobs.pop(a.key, None)
        self._by_marker.pop(a.info.marker, None)
        if a.pidfd is not None:
            os.close(a.pidfd)
        if a.info.pid is not None:
            if a.exit is not None:
                procs.reap_some(a.info.pid)  # the leader's zombie, held until now
            self._reap_groups[a.pgid] = None  # members reparented to us die into zombies
        with contextlib.suppress(OSError):
            os.unlink(a.info.progress_path)
        if a.cgroup:
            self._empty_cgroups.add(a.cgroup)
            self._schedule_sweep()
        return a.info

    def _schedule_sweep(self) -> None:
        if self._sweep_at is None:
            self._sweep_at = self._last_sweep + defaults.ORPHAN_SWEEP_INTERVAL

    def _sweep(self, now: float) -> None:
        """Kill escapees of ended attempts and reap orphan zombies. One /proc pass costs a few
        ms, so it runs at most once per ORPHAN_SWEEP_INTERVAL rather than at every job end."""
        self._sweep_at, self._last_sweep = None, now
        for path in list(self._empty_cgroups):
            if cgroups.remove(path):
                self._empty_cgroups.discard(path)
            else:  # something of an ended job is still in there
                cgroups.kill(path)
                self._schedule_sweep()
        table = procs.ProcTable()
        leaders = {a.info.pid for a in self._jobs.values()}
        doomed: list[int] = []
        for pid in table.procs if not self.subreaper else table.children.get(self._me, ()):
            st = table.procs[pid]
            if pid in leaders or pid == self._me:
                continue
            if st.zombie:
                if st.ppid == self._me and st.sid != self._my_sid:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                continue
            marker = procs.marker_of(pid)
            mine = marker is not None and marker.startswith(self._nonce + ":")
            if mine and marker not in self._by_marker:
                doomed.append(pid)
        victims = table.subtree(doomed)
        for pid in victims:
            procs.signal(pid, signal.SIGKILL)
        self._reap_pids.update((p, None) for p in victims if table.procs[p].ppid == self._me)
        if victims:
            self._schedule_sweep()  # to reap what just died

    # --- reporting ------------------------------------------------------------------------

    def progress(self, now: float) -> list[ProgressReport]:
        reports = []
        for a in self._jobs.values():
            value = a.watch.check(now) if a.watch is not None else None
            if value is not None:
                reports.append(ProgressReport(a.info.job, a.info.token, value[0], value[1]))
        return reports

    def usage(self, now: float) -> dict[Key, tuple[float, int]]:
        """(cpu percent, rss bytes) of each job's whole process tree.

        psutil.Process objects are kept between calls: cpu_percent measures since the last call.
        """
        attempts = [a for a in self._jobs.values() if a.info.pid is not None]
        if not attempts:
            return {}
        table = procs.ProcTable()
        members = self._members(table, attempts, everywhere=False)
        result: dict[Key, tuple[float, int]] = {}
        for a in attempts:
            seen: dict[tuple[int, int], psutil.Process] = {}
            cpu, rss = 0.0, 0
            for pid in members[a.key]:
                ident = (pid, table.procs[pid].start)
                try:
                    proc = a.usage_procs.get(ident) or psutil.Process(pid)
                    with proc.oneshot():
                        cpu += proc.cpu_percent(interval=None)
                        rss += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue  # ZombieProcess is a NoSuchProcess
                seen[ident] = proc
            a.usage_procs = seen
            result[a.key] = (cpu, rss)
        return result

    def tail(self, job: int, token: int, stream: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Bytes [offset, offset+limit) of a job's stdout or stderr, and the file's size now.

        A negative offset counts from the end. Works while the job runs and, for the last
        FINISHED_LOGS_KEPT attempts, after it ended.
        """
        if stream not in ("stdout", "stderr"):
            raise BadRequest(f"stream must be stdout or stderr, not {stream!r}")
        a = self._jobs.get((job, token))
        known = (a.info.stdout_path, a.info.stderr_path, a.info.uid) if a else None
        known = known or self._logs.get((job, token))
        if known is None:
            raise NotFound(f"this worker has no output of job {job} (token {token})")
        path = known[0] if stream == "stdout" else known[1]
        try:
            fd = _open_owned(path, os.O_RDONLY, known[2])
        except OSError as e:
            raise NotFound(f"{stream} of job {job} is gone: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            start = max(0, size + offset) if offset < 0 else offset
            limit = max(0, min(limit, defaults.LOG_CHUNK_MAX))
            return (os.pread(fd, limit, start) if start < size and limit else b""), size
        finally:
            os.close(fd)


class SpoolUnusable(OSError):
    """The spool directory cannot be made, or what is there is no directory."""


def make_spool(path: str, mode: int) -> None:
    """Make the spool directory with `mode`; one that exists is left as the operator made it
    (a spool may be a shared mount), but jobs' files in it are their owners' alone anyway."""
    try:
        os.makedirs(path, mode)
    except FileExistsError:
        if os.path.isdir(path):
            return
        raise SpoolUnusable(f"{path}: cannot make or use it: it is no directory") from None
    except OSError as e:
        raise SpoolUnusable(f"{path}: cannot make or use it: {e.strerror}") from None
    os.chmod(path, mode)  # makedirs applies the process's umask too
