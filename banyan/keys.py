"""CurveZMQ keys: where they live under `$BANYAN_HOME/keys`, and who each one is.

    keys/broker.key, broker.key_secret       the broker's key pair (made on its first start)
    keys/client.key_secret, client.key       this machine's identity for users' tools
    keys/worker.key_secret, worker.key       this machine's identity for its worker daemon
    keys/authorized/{user,admin,worker}/NAME.key
                                             public keys the broker admits, by role; the file
                                             name is the identity. Delete one to revoke it.
    keys/issued/NAME.key, NAME.key_secret    keys `banyan-keygen` made for other people/machines

On one machine nothing needs setting up: the broker's first start makes its own pair, an admin
key for the local user (as `client`) and a worker key (as `worker`), and authorizes both.

A user or admin key is bound to the Unix account its jobs run as: `unix_user = NAME` in the
certificate's `metadata` section, which the authorized copy carries. A key without one (made
before keys were bound) is bound to the account named like the key.

`$BANYAN_HOME` and `keys/` are made 0700 and every secret 0600: a job or a user that can read
a secret key can act as its owner.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import pwd
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

ROLES = ("user", "admin", "worker")
LOCAL_WORKER = "local-worker"
ACCOUNT_FIELD = "unix_user"
# What `useradd` and directory services accept, without the characters that would break the
# certificate line or the broker's `role:account:name` user id (`:`), paths or shells.
_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,255}\$?")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}")


class KeyExposed(Exception):
    """A secret key that other accounts can read: a daemon refuses to start with it."""


def check_name(name: str, what: str) -> None:
    """A key's or a worker's name: one word of letters, digits and `. _ @ -` (not first),
    at most 128, so that it is a file name, a column in a table and a word in a log line."""
    if _NAME.fullmatch(name) is None:
        raise ValueError(
            f"{name!r} is not usable as {what}: one word of letters, digits and . _ @ - "
            "(starting with a letter, digit or _), at most 128 characters"
        )


def valid_account(name: str) -> bool:
    return _ACCOUNT.fullmatch(name) is not None


def own_account() -> str:
    """The Unix account this process runs as (by its uid, not by $USER)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


@dataclass(frozen=True)
class Curve:
    """What a connecting socket needs: its own pair and the broker's public key (z85)."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def keys_dir(home: Path) -> Path:
    return home / "keys"


def private_dir(path: Path, tighten: bool = False) -> Path:
    """Make `path`, and each missing parent, a directory only its owner may enter (0700).
    With `tighten`, an existing one is made so too (for Banyan's own `keys/` and state, never
    for a directory someone chose, such as $BANYAN_HOME)."""
    missing = [d for d in (path, *path.parents) if not d.exists()]
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)  # mkdir's mode passes through the umask
    if tighten and not missing and os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def check_private(path: Path) -> None:
    """Raise KeyExposed if the secret key at `path` is readable by anyone but its owner, or
    if its owner is another account than this process's (which can read it, mode 600 or not,
    and act with it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_mode & 0o077:
        raise KeyExposed(
            f"{path} is readable by other users (mode {st.st_mode & 0o777:o}); anyone who can "
            f"read it can act with this key. Fix it with: chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = f"uid {st.st_uid}"
        me = own_account()
        raise KeyExposed(
            f"{path} belongs to {owner}, not to {me}, who runs this daemon; {owner} can read it "
            f"and act with this key. Fix it with: chown {me} {path}"
        )


def _make_pair(directory: Path, name: str, account: str | None = None) -> tuple[Path, Path]:
    private_dir(directory, tighten=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    if account:
        # In both halves: the public one is what the broker reads (authorized/), the secret
        # one shows its holder which account it stands for.
        for path in (public, secret):
            text = Path(path).read_text()
            Path(path).write_text(
                text.replace("metadata\n", f"metadata\n    {ACCOUNT_FIELD} = {account}\n", 1)
            )
    return Path(public), Path(secret)


def _authorize(home: Path, role: str, name: str, public: Path) -> Path:
    target = keys_dir(home) / "authorized" / role / f"{name}.key"
    private_dir(target.parent, tighten=True)
    shutil.copyfile(public, target)
    return target


def ensure_local(home: Path) -> tuple[bytes, bytes]:
    """The broker's key pair, made with the local admin and worker keys on the first start.
    The local admin key is bound to the account the broker runs as."""
    d = private_dir(keys_dir(home), tighten=True)
    if not (d / "broker.key_secret").exists():
        _make_pair(d, "broker")
        if not (d / "client.key_secret").exists():
            local = _make_pair(d, "client", own_account())[0]
            _authorize(home, "admin", _local_user(), local)
        if not (d / "worker.key_secret").exists():
            _authorize(home, "worker", LOCAL_WORKER, _make_pair(d, "worker")[0])
    check_private(d / "broker.key_secret")
    public, secret = zmq.auth.load_certificate(d / "broker.key_secret")
    assert secret is not None
    return public, secret


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def issue(home: Path, role: str, name: str, account: str | None = None) -> tuple[Path, Path, Path]:
    """A new key pair for `name` in `role`, authorized at once; returns public, secret and
    the authorized copy. Refuses to replace an existing name. A user or admin key is bound to
    the Unix `account` (default: `name`); a worker key to none."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role == "worker":
        if account is not None:
            raise ValueError("a worker key runs no jobs of its own: it takes no Unix account")
    else:
        account = account or name
        if not valid_account(account):
            raise ValueError(
                f"{account!r} is not a Unix account name; give the account with --unix-user"
            )
    check_name(name, "a key name")
    issued = keys_dir(home) / "issued"
    for r in ROLES:
        if (keys_dir(home) / "authorized" / r / f"{name}.key").exists():
            raise FileExistsError(f"a key named {name!r} already exists (role {r})")
    if (issued / f"{name}.key").exists():
        raise FileExistsError(f"a key named {name!r} already exists in {issued}")
    public, secret = _make_pair(issued, name, account)
    return public, secret, _authorize(home, role, name, public)


def account_of(path: Path) -> str | None:
    """The Unix account a certificate file binds (its `metadata` section), if any."""
    section = ""
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                section = line
                continue
            key, _, value = line.partition("=")
            if section == "metadata" and key.strip() == ACCOUNT_FIELD:
                account = value.strip().strip("'\"")
                return account if valid_account(account) else None
    return None


def peer(home: Path, kind: str) -> Curve | None:
    """The keys a client (`kind="client"`) or worker (`"worker"`) connects with, if any."""
    d = keys_dir(home)
    mine, server = d / f"{kind}.key_secret", d / "broker.key"
    if not mine.exists() or not server.exists():
        return None
    if kind == "worker":
        check_private(mine)
    public, secret = zmq.auth.load_certificate(mine)
    server_public, _ = zmq.auth.load_certificate(server)
    assert secret is not None
    return Curve(public, secret, server_public)


@dataclass(frozen=True)
class Identity:
    """Who an authorized key is: its name, its role, and the Unix account its jobs run as
    (None for worker keys)."""

    name: str
    role: str
    account: str | None = None

    @property
    def user_id(self) -> str:
        """The ZAP User-Id every later decision reads: `role:name`, and `/account` when the
        account is not the name (a key name holds no `/`). See `parse_user_id`."""
        if self.account is None or self.account == self.name:
            return f"{self.role}:{self.name}"
        return f"{self.role}:{self.name}/{self.account}"


def parse_user_id(user: str) -> Identity:
    role, _, rest = user.partition(":")
    name, _, account = rest.partition("/")
    return Identity(name, role, account or (None if role == "worker" else name))


# How close to the last read a change of `authorized/` must be to be doubted (mtimes are
# coarse: a few ms; a second is plenty).
RACY_SECONDS = 1.0


_log = logging.getLogger("banyan.broker")


class Authorizer:
    """Maps a peer's public key to its Identity, reloading when `authorized/` changes, so a
    deleted key is refused at its next connection without a restart."""

    def __init__(self, home: Path) -> None:
        self.root = keys_dir(home) / "authorized"
        self._stamp: tuple[float, ...] = ()
        self._loaded = 0.0  # when the keys were last read, on the wall clock as mtimes are
        self._known: dict[bytes, Identity] = {}

    def _stamps(self) -> tuple[float, ...]:
        out = []
        for role in ROLES:
            try:
                out.append(os.stat(self.root / role).st_mtime)
            except FileNotFoundError:
                out.append(0.0)
        return tuple(out)

    def lookup(self, public_z85: bytes) -> Identity | None:
        stamp = self._stamps()
        # A directory's mtime moves in the kernel's coarse ticks: a key added or deleted in the
        # same tick as the last read leaves it unchanged. So while a change is that recent,
        # read again (as git does for racily clean files).
        if stamp != self._stamp or max(stamp, default=0.0) >= self._loaded - RACY_SECONDS:
            self._loaded = time.time()
            self._stamp, self._known = stamp, self._load()
        return self._known.get(public_z85)

    def _load(self) -> dict[bytes, Identity]:
        known: dict[bytes, Identity] = {}
        for role in ROLES:
            folder = self.root / role
            if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
                # Its keys are refused as unknown: say why once, at each change.
                _log.warning(
                    "cannot read %s: permission denied, so its %s keys are refused (made by "
                    "another account? chown -R it to this one)",
                    folder,
                    role,
                )
                continue
            for path in sorted(folder.glob("*.key")):
                try:
                    public, _ = zmq.auth.load_certificate(path)
                    account = None if role == "worker" else account_of(path) or path.stem
                except (OSError, ValueError) as e:
                    _log.warning("cannot read the key %s, which is refused: %s", path, e)
                    continue
                known[public] = Identity(path.stem, role, account)
        return known
