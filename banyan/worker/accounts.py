"""Whose jobs this worker runs, and as whom: the owner's Unix account, looked up here (SPEC §6).

A worker started as root runs each job as its owner's account: uid, primary gid, the groups
`initgroups` would give it, HOME, USER, LOGNAME and SHELL, and the resource limits
`/etc/security/limits.conf` sets for it. It never runs a job as root (uid 0), nor as the
broker's own account (which the broker names at registration: a job of it could read the
broker's keys and store), unless it was started with `--allow-root-jobs`. A worker not
started as root cannot change identity: it runs only its own account's jobs, or, with
`--run-any-owner`, everyone's as itself.

A job whose account this worker cannot run is handed back unstarted, and the account is listed
among those the worker refuses when it registers, so the broker assigns it no more of them.
A missing account is looked up again every ACCOUNT_CACHE seconds; once it exists the worker
registers again and takes those jobs.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import resource
from dataclasses import dataclass

from banyan import defaults
from banyan.worker.launcher import Identity

ROOT_REFUSED = "worker {name} does not run jobs as root (start it with --allow-root-jobs)"
BROKER_REFUSED = (
    "worker {name} does not run jobs as the broker's account {account} "
    "(start it with --allow-root-jobs)"
)
LOGIN_DEFS = "/etc/login.defs"
LIMITS = ("/etc/security/limits.conf", "/etc/security/limits.d/*.conf")
_PATH = "/usr/local/bin:/usr/bin:/bin"  # login(1)'s default without ENV_PATH
_SUPATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# limits.conf item -> (RLIMIT_*, how a value converts to the kernel's unit)
_ITEMS = {
    "core": (resource.RLIMIT_CORE, 1024),
    "data": (resource.RLIMIT_DATA, 1024),
    "fsize": (resource.RLIMIT_FSIZE, 1024),
    "memlock": (resource.RLIMIT_MEMLOCK, 1024),
    "nofile": (resource.RLIMIT_NOFILE, 1),
    "rss": (resource.RLIMIT_RSS, 1024),
    "stack": (resource.RLIMIT_STACK, 1024),
    "cpu": (resource.RLIMIT_CPU, 60),  # minutes
    "nproc": (resource.RLIMIT_NPROC, 1),
    "as": (resource.RLIMIT_AS, 1024),
    "sigpending": (resource.RLIMIT_SIGPENDING, 1),
    "msgqueue": (resource.RLIMIT_MSGQUEUE, 1),
    "rtprio": (resource.RLIMIT_RTPRIO, 1),
}
# Where a limits.conf line's domain ranks: a user's own line beats a group's, which beats `*`.
_USER, _GROUP, _ALL = 0, 1, 2


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str
    limits: tuple[tuple[int, int, int], ...] = ()

    def identity(self) -> Identity:
        return Identity(self.uid, self.gid, self.groups, self.limits)

    def variables(self) -> dict[str, str]:
        """What the account itself says in a job's environment, whatever was exported."""
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell or "/bin/sh",
        }

    def login_environment(self) -> dict[str, str]:
        """A clean login's environment, as `login` sets it (no shell startup files run)."""
        return {**self.variables(), "PATH": login_path(self.uid)}


def lookup(name: str) -> Account | None:
    """The account `name` on this machine (passwd, groups, limits), or None if it has none."""
    try:
        pw = pwd.getpwnam(name)
    except (KeyError, UnicodeEncodeError):
        return None
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    limits = login_limits(pw.pw_name, pw.pw_uid, groups)
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell, limits)


def own() -> Account:
    """The account this process runs as: the identity jobs keep when it cannot change."""
    uid = os.geteuid()
    try:
        pw = pwd.getpwuid(uid)
        name, home, shell = pw.pw_name, pw.pw_dir, pw.pw_shell
    except KeyError:
        name, home, shell = str(uid), "/", "/bin/sh"
    return Account(name, uid, os.getegid(), tuple(os.getgroups()), home, shell)


# login.defs as last read, by path: (its mtime, size and inode; ENV_SUPATH, ENV_PATH). Every
# job's start needs it, and parsing the file each time cost about 0.1 ms of a start.
_DEFS_READ: dict[str, tuple[tuple[int, int, int], str | None, str | None]] = {}


def login_path(uid: int, defs: str = LOGIN_DEFS) -> str:
    """PATH for a login of `uid`: ENV_SUPATH (root) or ENV_PATH from login.defs, as login(1).
    The file is read again whenever it changes."""
    try:
        st = os.stat(defs)
    except OSError:
        return _SUPATH if uid == 0 else _PATH
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    known = _DEFS_READ.get(defs)
    if known is None or known[0] != stamp:
        paths: dict[str, str] = {}
        try:
            with open(defs) as f:
                for line in f:
                    words = line.split()
                    if len(words) == 2 and words[0] in ("ENV_SUPATH", "ENV_PATH"):
                        paths.setdefault(words[0], words[1].removeprefix("PATH="))
        except OSError:
            pass
        known = (stamp, paths.get("ENV_SUPATH"), paths.get("ENV_PATH"))
        _DEFS_READ[defs] = known
    found = known[1] if uid == 0 else known[2]
    return found if found is not None else (_SUPATH if uid == 0 else _PATH)


def login_limits(
    name: str, uid: int, groups: tuple[int, ...], files: tuple[str, ...] = LIMITS
) -> tuple[tuple[int, int, int], ...]:
    """The resource limits pam_limits would set at a login of this account: (RLIMIT_*, soft,
    hard), only for what limits.conf (and limits.d) configure. Later lines of the same rank
    win; a user's own line beats a group's, and a group's beats `*`."""
    group_names = set()
    for gid in groups:
        try:
            group_names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    chosen: dict[tuple[int, str], tuple[int, int]] = {}  # (RLIMIT_*, soft|hard) -> rank, value
    paths = [path for pattern in files for path in sorted(glob.glob(pattern))]
    for path in paths:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if len(words) != 4 or words[2] not in _ITEMS:
                continue
            rank = _rank(words[0], name, uid, group_names)
            value = _value(words[3], _ITEMS[words[2]][1])
            if rank is None or value is None:
                continue
            limit = _ITEMS[words[2]][0]
            for kind in ("soft", "hard") if words[1] == "-" else (words[1],):
                held = chosen.get((limit, kind))
                if held is None or rank <= held[0]:
                    chosen[(limit, kind)] = (rank, value)
    out = []
    for limit in sorted({limit for limit, _ in chosen}):
        soft, hard = resource.getrlimit(limit)
        hard = chosen[(limit, "hard")][1] if (limit, "hard") in chosen else hard
        soft = chosen[(limit, "soft")][1] if (limit, "soft") in chosen else soft
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            soft = hard
        out.append((limit, soft, hard))
    return tuple(out)


def _rank(domain: str, name: str, uid: int, groups: set[str]) -> int | None:
    if domain == name:
        return _USER
    if domain.startswith("@") and domain[1:] in groups:
        return _GROUP
    if domain == "*":
        return _ALL
    low, sep, high = domain.partition(":")  # a uid range: 1000:, :999, 10:20
    if not sep or not (low or high) or not (low + high).isdigit():
        return None
    inside = (not low or uid >= int(low)) and (not high or uid <= int(high))
    return _USER if inside else None


def _value(text: str, unit: int) -> int | None:
    if text in ("unlimited", "infinity", "-1"):
        return resource.RLIM_INFINITY
    try:
        value = int(text)
    except ValueError:
        return None
    return value * unit if value >= 0 else None


class Policy:
    """Which accounts this worker runs jobs as: decided once from how it was started, with
    the lookups cached for ACCOUNT_CACHE seconds."""

    def __init__(self, worker: str, run_any_owner: bool = False, allow_root: bool = False) -> None:
        self.worker = worker
        self.me = own()
        self.root = self.me.uid == 0
        self.run_any_owner = run_any_owner
        self.allow_root = allow_root
        self._cache: dict[str, tuple[float, Account | None]] = {}
        # Accounts it said it cannot run (account -> why): sent at every registration.
        self.refused: dict[str, str] = {}
        if self.root and not allow_root:
            self.refused["root"] = ROOT_REFUSED.format(name=worker)
        self._next_recheck = 0.0
        self.broker_account: str | None = None
        self._broker_uid: int | None = None

    def learn_broker_account(self, name: str | None, now: float) -> bool:
        """The broker said which account it runs as. True if this worker must refuse that
        account's jobs and did not know it yet: it then registers again, saying so."""
        if name == self.broker_account:
            return False
        self.broker_account = name
        found = self._lookup(name, now) if name else None
        self._broker_uid = found.uid if found else None
        if not name or not self.root or self.allow_root or name in self.refused:
            return False
        self.refused[name] = BROKER_REFUSED.format(name=self.worker, account=name)
        return True

    @property
    def only_account(self) -> str | None:
        """The one account whose jobs it runs, when it cannot change identity."""
        return None if self.root or self.run_any_owner else self.me.name

    def resolve(self, name: str, now: float) -> Account | str:
        """The account to run `name`'s job as here, or why it will not run here."""
        if not self.root:
            if self.run_any_owner or name == self.me.name:
                return self.me
            return (
                f"worker {self.worker} runs only {self.me.name}'s jobs (it is not root, and "
                "was not started with --run-any-owner)"
            )
        account = self._lookup(name, now)
        why = self._refusal(name, account)
        if why is None and account is not None:
            return account
        why = why or f"account {name} does not exist on worker {self.worker}"
        if name in self.refused or len(self.refused) < defaults.MAX_REFUSED_ACCOUNTS:
            self.refused[name] = why
        if account is None and not self._next_recheck:
            self._next_recheck = now + defaults.ACCOUNT_CACHE
        return why

    def _lookup(self, name: str, now: float) -> Account | None:
        cached = self._cache.get(name)
        if cached is not None and now < cached[0]:
            return cached[1]
        if len(self._cache) >= 4096:  # names come from the broker: keep the cache small
            self._cache.clear()
        account = lookup(name)
        self._cache[name] = (now + defaults.ACCOUNT_CACHE, account)
        return account

    def recheck(self, now: float) -> bool:
        """Look again at the accounts it refused for being missing; True if one exists now
        (the worker then registers again, so the broker offers it their jobs)."""
        if not self._next_recheck or now < self._next_recheck:
            return False
        self._next_recheck = 0.0
        found = False
        for name in list(self.refused):
            account = self._lookup(name, now)
            if account is not None and self._refusal(name, account) is None:
                del self.refused[name]
                found = True
            elif account is None:
                self._next_recheck = now + defaults.ACCOUNT_CACHE
        return found

    def _refusal(self, name: str, account: Account | None) -> str | None:
        """Why a root worker does not run `name`'s jobs here, or None if it does."""
        if account is None:
            return f"account {name} does not exist on worker {self.worker}"
        if self.allow_root:
            return None
        if account.uid == 0:
            return ROOT_REFUSED.format(name=self.worker)
        if name == self.broker_account or account.uid == self._broker_uid:
            return BROKER_REFUSED.format(name=self.worker, account=self.broker_account)
        return None
