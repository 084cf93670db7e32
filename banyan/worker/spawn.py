"""posix_spawn of a job's shell, with every signal at its default and none blocked.

A job must start as it would from a terminal. Python ignores SIGPIPE and SIGXFSZ, and a child
inherits what its parent ignores: with them ignored, `while :; do echo x; done | head -n1`
never ends. posix_spawn's POSIX_SPAWN_SETSIGDEF resets the signals of a set, but the set is
built with the C library's sigaddset, and glibc's refuses its two internal signals (32 and
33), which its posix_spawn then leaves ignored in the child (SigIgn 0000000180000000). So the
set is filled here byte by byte and handed to glibc's own posix_spawn through ctypes. Where
that C library interface is missing, `os.posix_spawn` resets every signal it can.

Nor may a job inherit a descriptor of the worker's: whatever the worker's own parent left open
without close-on-exec is marked so once (`close_inherited`), and the child closes every
descriptor past stderr where the C library can (glibc 2.34's closefrom file action).
"""

from __future__ import annotations

import ctypes
import os
import signal

# glibc's flags (and musl's); POSIX_SPAWN_SETSID is a GNU extension, from glibc 2.26.
_SETSIGDEF, _SETSIGMASK, _SETSID = 0x04, 0x08, 0x80
_SIGSET_BYTES = 128  # sizeof(sigset_t) in glibc: 1024 bits
# posix_spawnattr_t and posix_spawn_file_actions_t are 336 and 80 bytes in glibc on 64-bit
# machines; twice that leaves room for any C library.
_ATTR_BYTES, _ACTIONS_BYTES = 1024, 512


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.spawn = libc.posix_spawn
        self.spawn.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        self.attr_init = libc.posix_spawnattr_init
        self.attr_destroy = libc.posix_spawnattr_destroy
        self.set_flags = libc.posix_spawnattr_setflags
        self.set_flags.argtypes = [ctypes.c_void_p, ctypes.c_short]
        self.set_default = libc.posix_spawnattr_setsigdefault
        self.set_mask = libc.posix_spawnattr_setsigmask
        self.actions_init = libc.posix_spawn_file_actions_init
        self.actions_destroy = libc.posix_spawn_file_actions_destroy
        self.add_open = libc.posix_spawn_file_actions_addopen
        self.add_open.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint,
        ]
        self.add_dup2 = libc.posix_spawn_file_actions_adddup2
        self.add_dup2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.add_closefrom = getattr(libc, "posix_spawn_file_actions_addclosefrom_np", None)
        self.every_signal = (ctypes.c_ubyte * _SIGSET_BYTES)(*([0xFF] * _SIGSET_BYTES))
        self.no_signal = (ctypes.c_ubyte * _SIGSET_BYTES)()


def _load() -> _Libc | None:
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


_LIBC = _load()
_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def spawn(argv: list[str], env: dict[str, str], stdout: int, stderr: int) -> int:
    """Start argv[0] (a path) in a new session with stdin from /dev/null, `stdout` and
    `stderr` as 1 and 2, default signal dispositions and an empty signal mask; its pid."""
    libc = _LIBC
    if libc is None:
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
            ],
            setsid=True,
            setsigmask=(),
            setsigdef=_SIGNALS,
        )
    attr = ctypes.create_string_buffer(_ATTR_BYTES)
    actions = ctypes.create_string_buffer(_ACTIONS_BYTES)
    args = [a.encode() for a in argv]
    envp = [f"{k}={v}".encode() for k, v in env.items()]
    c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
    pid = ctypes.c_int(0)
    libc.attr_init(attr)
    libc.actions_init(actions)
    try:
        libc.set_flags(attr, _SETSIGDEF | _SETSIGMASK | _SETSID)
        libc.set_default(attr, libc.every_signal)
        libc.set_mask(attr, libc.no_signal)
        libc.add_open(actions, 0, os.devnull.encode(), os.O_RDONLY, 0)
        libc.add_dup2(actions, stdout, 1)
        libc.add_dup2(actions, stderr, 2)
        if libc.add_closefrom is not None:
            libc.add_closefrom(actions, 3)
        error = libc.spawn(ctypes.byref(pid), args[0], actions, attr, c_argv, c_envp)
    finally:
        libc.actions_destroy(actions)
        libc.attr_destroy(attr)
    if error:
        raise OSError(error, f"{argv[0]}: {os.strerror(error)}")
    return pid.value


def close_inherited() -> None:
    """Mark every descriptor past stderr close-on-exec: those this process inherited open (a
    log pipe of whatever started the worker) would otherwise reach every job."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                continue  # the listing's own descriptor, closed by now
