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
"""

from __future__ import annotations

import getpass
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

ROLES = ("user", "admin", "worker")
LOCAL_WORKER = "local-worker"


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


def _make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _authorize(home: Path, role: str, name: str, public: Path) -> Path:
    target = keys_dir(home) / "authorized" / role / f"{name}.key"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public, target)
    return target


def ensure_local(home: Path) -> tuple[bytes, bytes]:
    """The broker's key pair, made with the local admin and worker keys on the first start."""
    d = keys_dir(home)
    if not (d / "broker.key_secret").exists():
        _make_pair(d, "broker")
        if not (d / "client.key_secret").exists():
            _authorize(home, "admin", _local_user(), _make_pair(d, "client")[0])
        if not (d / "worker.key_secret").exists():
            _authorize(home, "worker", LOCAL_WORKER, _make_pair(d, "worker")[0])
    public, secret = zmq.auth.load_certificate(d / "broker.key_secret")
    assert secret is not None
    return public, secret


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def issue(home: Path, role: str, name: str) -> tuple[Path, Path, Path]:
    """A new key pair for `name` in `role`, authorized at once; returns public, secret and
    the authorized copy. Refuses to replace an existing name."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not name or "/" in name or name.startswith(".") or len(name) > 128:
        raise ValueError(f"{name!r} is not a usable key name")
    issued = keys_dir(home) / "issued"
    for r in ROLES:
        if (keys_dir(home) / "authorized" / r / f"{name}.key").exists():
            raise FileExistsError(f"a key named {name!r} already exists (role {r})")
    if (issued / f"{name}.key").exists():
        raise FileExistsError(f"a key named {name!r} already exists in {issued}")
    public, secret = _make_pair(issued, name)
    return public, secret, _authorize(home, role, name, public)


def peer(home: Path, kind: str) -> Curve | None:
    """The keys a client (`kind="client"`) or worker (`"worker"`) connects with, if any."""
    d = keys_dir(home)
    mine, server = d / f"{kind}.key_secret", d / "broker.key"
    if not mine.exists() or not server.exists():
        return None
    public, secret = zmq.auth.load_certificate(mine)
    server_public, _ = zmq.auth.load_certificate(server)
    assert secret is not None
    return Curve(public, secret, server_public)


class Authorizer:
    """Maps a peer's public key to (name, role), reloading when `authorized/` changes, so a
    deleted key is refused at its next connection without a restart."""

    def __init__(self, home: Path) -> None:
        self.root = keys_dir(home) / "authorized"
        self._stamp: tuple[float, ...] = ()
        self._known: dict[bytes, tuple[str, str]] = {}

    def _stamps(self) -> tuple[float, ...]:
        out = []
        for role in ROLES:
            try:
                out.append(os.stat(self.root / role).st_mtime)
            except FileNotFoundError:
                out.append(0.0)
        return tuple(out)

    def lookup(self, public_z85: bytes) -> tuple[str, str] | None:
        stamp = self._stamps()
        if stamp != self._stamp:
            self._stamp, self._known = stamp, self._load()
        return self._known.get(public_z85)

    def _load(self) -> dict[bytes, tuple[str, str]]:
        known: dict[bytes, tuple[str, str]] = {}
        for role in ROLES:
            for path in sorted((self.root / role).glob("*.key")):
                try:
                    public, _ = zmq.auth.load_certificate(path)
                except (OSError, ValueError):
                    continue
                known[public] = (path.stem, role)
        return known
