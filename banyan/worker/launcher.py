"""Start jobs directly inside their cgroups, from a small helper process.

Moving a running process into a cgroup (a write to `cgroup.procs`) takes the kernel's
cgroup_threadgroup_rwsem for writing; every fork on the machine waits while it is held, and
unless cgroup2 is mounted with `favordynmods` the write also waits for an RCU grace period
(10-40 ms after an idle moment), during which the job has not started yet. A process cloned
straight into its cgroup (clone3 with CLONE_INTO_CGROUP, Linux 5.7+) never moves: nothing to
wait for, and no moment outside the cgroup either. Each start costs a round trip to this
helper (0.6-0.9 ms), so the runner uses it only where it measured a move to be slow.

Python has no clone3, and a raw clone of the worker itself would copy its page tables and
could not run Python safely beside libzmq's threads. So the worker starts this module once as
a small single-threaded process and sends it each start: argv, environment, cgroup, and the
descriptors for stdin, stdout and stderr (SCM_RIGHTS). It clones with CLONE_PARENT too, so the
job is the worker's own child, reaped and watched exactly like one from posix_spawn, and
answers with the pid.

Where clone3 or CLONE_INTO_CGROUP is refused (old kernels, seccomp profiles) or the helper
fails in any way, `spawn` says None for good and the runner falls back to posix_spawn.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import struct
import subprocess
import sys

import msgpack

_SYS_CLONE3 = 435  # one number on every architecture (the generic syscall table)
_CLONE_PARENT = 0x00008000
_CLONE_INTO_CGROUP = 0x200000000
_REPLY = struct.Struct("<q")  # the pid, or -errno
_ANSWER_WITHIN = 5.0  # seconds; a helper slower than this is broken, not busy


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

    def spawn(
        self, argv: list[str], env: dict[str, str], fds: tuple[int, int, int], cgroup: str
    ) -> int | None:
        """Start argv[0] (a path) in a new session inside `cgroup`, with `fds` as 0, 1 and 2;
        the pid, or None if this machine cannot (then `broken` is set and stays set)."""
        if self.broken:
            return None
        request = msgpack.packb([argv, [f"{k}={v}" for k, v in env.items()]], use_bin_type=True)
        try:
            sock = self._sock or self._start()
            group = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                socket.send_fds(sock, [request], [*fds, group])
            finally:
                os.close(group)
            reply = sock.recv(_REPLY.size)
        except OSError as e:
            self._give_up(f"the launcher failed ({e})")
            return None
        if len(reply) != _REPLY.size:
            self._give_up("the launcher exited")
            return None
        (pid,) = _REPLY.unpack(reply)
        if pid > 0:
            return int(pid)
        if -pid in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG, errno.EOPNOTSUPP):
            self._give_up(f"clone3 into a cgroup is refused here ({os.strerror(-pid)})")
            return None
        raise OSError(-pid, f"clone3: {os.strerror(-pid)}")

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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

    def _give_up(self, why: str) -> None:
        import logging  # only on this rare path

        logging.getLogger("banyan.worker").info("%s; jobs join their cgroups themselves", why)
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


def _serve(sock: socket.socket) -> None:
    """The helper's loop: one request, one clone, one answer, until the worker hangs up."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 24, 4)
        except OSError:
            return
        if not data:
            return
        try:
            argv, env = msgpack.unpackb(data, raw=False)
            stdin, stdout, stderr, group = fds
        except (ValueError, TypeError):  # not a request the worker wrote
            answer = -errno.EINVAL
        else:
            # With CLONE_PARENT the child signals its parent as this process would (SIGCHLD):
            # the kernel takes no exit_signal of its own.
            args = _CloneArgs(flags=_CLONE_PARENT | _CLONE_INTO_CGROUP, cgroup=group)
            pid = syscall(_SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
            if pid == 0:
                _child(argv, env, stdin, stdout, stderr)
            answer = pid if pid > 0 else -ctypes.get_errno()
        for fd in fds:
            os.close(fd)
        sock.send(_REPLY.pack(answer))


def _child(argv: list[str], env: list[str], stdin: int, stdout: int, stderr: int) -> None:
    """In the new process (this helper is single-threaded, so plain Python is safe here)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # ignored by the helper, not by jobs
        os.setsid()
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        os.execve(argv[0], argv, dict(pair.split("=", 1) for pair in env))
    finally:
        os._exit(127)


if __name__ == "__main__":
    # Ctrl-C in the worker's terminal reaches this process too; the worker decides when it
    # ends, by closing the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(socket.socket(fileno=int(sys.argv[1])))
