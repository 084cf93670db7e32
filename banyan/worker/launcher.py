"""Start jobs from a small helper process: straight into their cgroups, and as their owners.

Moving a running process into a cgroup (a write to `cgroup.procs`) takes the kernel's
cgroup_threadgroup_rwsem for writing; every fork on the machine waits while it is held, and
unless cgroup2 is mounted with `favordynmods` the write also waits for an RCU grace period
(10-40 ms after an idle moment), during which the job has not started yet. A process cloned
straight into its cgroup (clone3 with CLONE_INTO_CGROUP, Linux 5.7+) never moves: nothing to
wait for, and no moment outside the cgroup either.

A worker started as root runs each job as its owner's Unix account (SPEC §6), and
`posix_spawn` cannot change a process's identity. The helper's child does, in this order:
a new session; the account's resource limits; its groups, then its gid, then its uid (after
which nothing can win root back); the job's umask; then, as the owner, it opens the job's
output files (so a path the owner may not write is refused as it would be in a shell);
default dispositions for every signal and an empty signal mask; and exec.

Python has no clone3, and a raw clone of the worker itself would copy its page tables and
could not run Python safely beside libzmq's threads. So the worker starts this module once as
a small single-threaded process and sends it each start: argv, environment, identity, and the
descriptors (SCM_RIGHTS). It clones with CLONE_PARENT too, so the job is the worker's own
child, reaped and watched exactly like one from posix_spawn. It answers with the pid once the
child has exec'd, or with what went wrong before (a close-on-exec pipe tells which).

Where clone3 or CLONE_INTO_CGROUP is refused (old kernels, seccomp profiles), the helper uses
the classic clone and the child joins its cgroup itself. If the helper fails in any way,
`spawn` says None for good and the runner falls back to posix_spawn for jobs that keep the
worker's identity.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import msgpack

_SYS_CLONE3 = 435  # one number on every architecture (the generic syscall table)
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "ppc64le": 120, "s390x": 120}
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "riscv64": 134, "ppc64le": 173, "s390x": 174}
_CLONE_PARENT = 0x00008000
_CLONE_INTO_CGROUP = 0x200000000
_REFUSED = (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG, errno.EOPNOTSUPP)
_ANSWER_WITHIN = 5.0  # seconds; a helper slower than this is broken, not busy
# Helpers that failed to answer in a row before the worker stops asking for one (Launcher._failed).
RESTARTS = 3
# A request is one datagram, and an exported environment may be 512 KiB (MAX_ENVIRONMENT_BYTES):
# the socket buffers must hold it. Root may pass the system's limit (SO_SNDBUFFORCE and
# SO_RCVBUFFORCE, which Python does not name); anyone else gets what net.core.*mem_max allows.
_BUFFER = 4 * 1024 * 1024
_FORCE = {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}
_OUTPUT = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_FAILED = 127  # the child's exit status when it could not exec
# How long the helper waits to hear that a child exec'd before answering with its pid anyway
# (a child stuck opening an output on a hung filesystem must not stall every start after it).
_EXEC_WITHIN = 1.0


@dataclass(frozen=True)
class Identity:
    """Who a job's processes are: what the child becomes before it execs."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    limits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard)


class ChildFailed(OSError):
    """The child could not become the job (e.g. its owner may not write an output path): it
    has exited with status 127, and `pid` is the worker's child to reap. Or no child was made,
    for a reason of this job's alone (pid 0)."""

    def __init__(self, pid: int, message: str) -> None:
        super().__init__(errno.EPERM, message)
        self.pid = pid  # 0: no child was made

    def __str__(self) -> str:
        return str(self.strerror)


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


class Launcher:
    """The worker's side: one helper process, started on first use."""

    def __init__(self, enabled: bool = True) -> None:
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.broken = not enabled or sys.platform != "linux"
        self._failures = 0  # requests in a row the helper did not answer

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        stdio: tuple[int, ...],
        cgroup: str | None,
        identity: Identity | None = None,
        outputs: tuple[str, str] | None = None,
        umask: int = 0o022,
    ) -> int | None:
        """Start argv[0] (a path) in a new session, inside `cgroup` if given, as `identity` if
        given; the pid, or None if this machine cannot (then `broken` is set and stays set).

        `stdio` is stdin, stdout and stderr; or stdin alone with `outputs`, the paths the child
        opens for stdout and stderr once it is the job's owner (one path twice: one file).
        Raises ChildFailed if the child got that far and failed."""
        if self.broken:
            return None
        ident = None if identity is None else [identity.uid, identity.gid, list(identity.groups)]
        limits = [] if identity is None else [list(x) for x in identity.limits]
        request = [argv, env, ident, limits, list(outputs) if outputs else None, umask]
        data = msgpack.packb([*request, cgroup is not None], use_bin_type=True)
        try:
            sock = self._sock or self._start()
            fds = list(stdio)
            if cgroup is not None:
                fds.append(os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            try:
                socket.send_fds(sock, [data], fds)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                # Nothing was sent: this job alone is too big to start, the helper is fine.
                too_big = f"its environment and command are too big ({len(data)} bytes)"
                raise ChildFailed(0, too_big) from None
            finally:
                if cgroup is not None:
                    os.close(fds[-1])
            reply = sock.recv(1 << 16)
        except ChildFailed:
            raise
        except OSError as e:
            self._failed(f"the launcher failed ({e})")
            return None
        try:
            pid, message = msgpack.unpackb(reply, raw=False)
        except (ValueError, TypeError):
            self._failed("the launcher exited")
            return None
        self._failures = 0
        if pid > 0 and message:
            raise ChildFailed(int(pid), str(message))
        if pid > 0:
            return int(pid)
        if -pid in _REFUSED:
            self._give_up(f"the launcher cannot start processes here ({os.strerror(-pid)})")
            return None
        raise OSError(-pid, f"clone: {os.strerror(-pid)}")

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock, option in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, _FORCE[option], _BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, option, _BUFFER)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "banyan.worker.launcher", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        ours.settimeout(_ANSWER_WITHIN)
        self._sock = ours
        return ours

    def _failed(self, why: str) -> None:
        """The helper did not answer this request (it died, or this process was stopped past
        the answer's deadline): it is stopped, and the next request starts a new one; after
        RESTARTS failures in a row this machine is taken not to allow it."""
        self._failures += 1
        if self._failures > RESTARTS:
            self._give_up(why)
            return
        import logging  # only on this rare path

        logging.getLogger("banyan.worker").warning("%s; starting a new one", why)
        # At once: a helper that missed its answer must not start that job after all.
        self.close(wait=0.0)

    def _give_up(self, why: str) -> None:
        import logging  # only on this rare path

        logging.getLogger("banyan.worker").info(
            "%s; jobs that keep the worker's identity join their cgroups themselves", why
        )
        self.broken = True
        # At once: a helper that missed its answer must not start that job after all.
        self.close(wait=0.0)

    def close(self, wait: float = _ANSWER_WITHIN) -> None:
        if self._sock is not None:
            self._sock.close()  # the helper reads EOF and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class _Cloner:
    """clone3 (into the cgroup where asked), or the classic clone where clone3 is refused."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = libc.syscall
        self.syscall.restype = ctypes.c_long
        self.classic = False

    def clone(self, group: int | None) -> tuple[int, bool]:
        """(pid in the parent, 0 in the child, or -errno; whether the child must join `group`
        itself). With CLONE_PARENT the child signals its parent as this process would
        (SIGCHLD): the kernel takes no exit signal of ours."""
        if not self.classic:
            flags = _CLONE_PARENT | (_CLONE_INTO_CGROUP if group is not None else 0)
            args = _CloneArgs(flags=flags, cgroup=group if group is not None else 0)
            size = ctypes.c_size_t(ctypes.sizeof(args))
            pid = self.syscall(_SYS_CLONE3, ctypes.byref(args), size)
            if pid >= 0 or ctypes.get_errno() not in _REFUSED:
                return (pid if pid >= 0 else -ctypes.get_errno()), False
            self.classic = True
        number = _SYS_CLONE.get(platform.machine())
        if number is None:
            return -errno.ENOSYS, False
        # Every argument but the flags is 0, so their order (which differs by architecture)
        # does not matter: the child runs on a copy of this stack, like a fork.
        zero = ctypes.c_ulong(0)
        pid = self.syscall(number, ctypes.c_ulong(_CLONE_PARENT), zero, zero, zero, zero)
        return (pid if pid >= 0 else -ctypes.get_errno()), group is not None


def _serve(sock: socket.socket) -> None:
    """The helper's loop: one request, one clone, one answer, until the worker hangs up."""
    cloner = _Cloner()
    defaults = _Defaults(cloner.syscall)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 24, 4)
        except OSError:
            return
        for fd in fds:
            # Received descriptors are inheritable: none may reach the job past its exec.
            os.set_inheritable(fd, False)
        if not data:
            return
        try:
            argv, env, ident, limits, outputs, umask, in_cgroup = msgpack.unpackb(data, raw=False)
            group = fds[-1] if in_cgroup else None
            stdio = fds[: len(fds) - bool(in_cgroup)]
            if len(stdio) != (1 if outputs else 3):
                raise ValueError("descriptors do not match the request")
        except (ValueError, TypeError):  # not a request the worker wrote
            answer: list[object] = [-errno.EINVAL, ""]
        else:
            # Only a child that opens its owner's files may fail in a way the worker must hear
            # of before it goes on (a missing directory, a path the owner may not write): the
            # helper waits for its exec then. Otherwise it answers at once, and a child that
            # fails says why on its stderr, the job's own file.
            wait = outputs is not None
            status_r, status_w = os.pipe() if wait else (-1, stdio[2])
            pid, join = cloner.clone(group)
            if pid == 0:
                if wait:
                    os.close(status_r)
                _child(
                    argv,
                    env,
                    (ident, limits),
                    outputs,
                    umask,
                    stdio,
                    (group, join),
                    status_w,
                    defaults,
                )
            answer = [pid, ""]
            if wait:
                os.close(status_w)
                answer[1] = _exec_failure(status_r) if pid > 0 else ""
                os.close(status_r)
        for fd in fds:
            os.close(fd)
        sock.send(msgpack.packb(answer, use_bin_type=True))


def _exec_failure(fd: int) -> str:
    """What the child wrote before it gave up, or "" once its exec closed the pipe (or it has
    not said anything within _EXEC_WITHIN)."""
    if not select.select([fd], [], [], _EXEC_WITHIN)[0]:
        return ""
    return os.read(fd, 4096).decode("utf-8", "replace")


def _child(
    argv: list[str],
    env: dict[str, str],
    who: tuple[list[Any] | None, list[list[int]]],
    outputs: list[str] | None,
    umask: int,
    stdio: list[int],
    cgroup: tuple[int | None, bool],
    status: int,
    defaults: _Defaults,
) -> None:
    """In the new process (this helper is single-threaded, so plain Python is safe here).
    Anything that fails is written to `status` and the child exits 127."""
    ident, limits = who
    group, join = cgroup
    step = "start"
    try:
        os.setsid()
        if join and group is not None:
            step = "join its cgroup"
            fd = os.open("cgroup.procs", os.O_WRONLY, dir_fd=group)
            os.write(fd, b"0")
            os.close(fd)
        if ident is not None:
            uid, gid, groups = ident
            step = "set its resource limits"
            for limit, soft, hard in limits:
                resource.setrlimit(limit, (soft, hard))
            step = f"become uid {uid}"
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
        os.umask(umask)
        if outputs is not None:
            out_path, err_path = outputs
            step = f"open {out_path}"
            out = _open_output(out_path)
            step = f"open {err_path}"
            err = out if err_path == out_path else _open_output(err_path)
            stdio = [stdio[0], out, err]
        for fd, target in zip(stdio, (0, 1, 2), strict=True):
            os.dup2(fd, target)
        step = "reset its signals"
        defaults.apply()
        step = f"run {argv[0]}"
        os.execve(argv[0], argv, env)
    except BaseException as e:
        text = f"could not {step}: {e.strerror if isinstance(e, OSError) else e}"
        if outputs is None:  # to the job's stderr file
            text = f"banyan: {text}\n"
        try:
            os.write(status, text.encode("utf-8", "replace")[:4096])
        finally:
            os._exit(_FAILED)
    finally:
        os._exit(_FAILED)


class _Defaults:
    """Default dispositions for every signal, and none blocked, in a child about to exec.

    An exec resets the signals this helper catches by itself, but keeps the ones it ignores
    (SIGINT here, SIGPIPE and SIGXFSZ as in every Python), so those are reset, found once from
    /proc. With the kernel's own call where this machine's number for it is known: the C
    library refuses to touch its internal signals (32, 33). Made before any clone, so a child
    allocates nothing for it (each page it touches would be copied)."""

    def __init__(self, syscall: Any) -> None:
        self.syscall = syscall
        self.number = _SYS_RT_SIGACTION.get(platform.machine())
        # SIG_DFL is 0, and so is every other field: the layout of `struct sigaction`, which
        # differs by architecture, does not matter as long as the buffer covers it.
        self.action = ctypes.create_string_buffer(64)
        self.size = ctypes.c_size_t(8)
        self.ignored = _ignored()

    def apply(self) -> None:
        for signum in self.ignored:
            if self.number is not None:
                self.syscall(self.number, signum, self.action, None, self.size)
            else:
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _ignored() -> tuple[int, ...]:
    """The signals this process ignores (every one, if /proc cannot say)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("SigIgn:"))
        mask = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return tuple(range(1, signal.NSIG))
    return tuple(n for n in range(1, signal.NSIG) if mask >> (n - 1) & 1)


def _open_output(path: str) -> int:
    """Open (create or truncate) an output file. Non-blocking while opening, so a FIFO with
    no reader fails at once instead of hanging the start."""
    fd = os.open(path, _OUTPUT | os.O_NONBLOCK, 0o666)
    os.set_blocking(fd, True)
    return fd


if __name__ == "__main__":
    # Ctrl-C in the worker's terminal, or the terminal's hangup, reaches this process too;
    # the worker decides when it ends, by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Inherited on purpose from the worker, but never to be inherited by a job: with it, a
    # job could ask this helper (root, where the worker is) to start anything as anyone.
    os.set_inheritable(int(sys.argv[1]), False)
    _serve(socket.socket(fileno=int(sys.argv[1])))
