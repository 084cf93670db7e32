"""Where things are: BANYAN_HOME, BANYAN_BROKER and address parsing, shared by every program."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from banyan import defaults


def home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`$BANYAN_HOME`, else `~/.banyan`: keys and (by default) the broker's state live here."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("BANYAN_HOME") or Path.home() / ".banyan")


def address(text: str | None, default_port: int = defaults.CLIENT_PORT) -> str:
    """A tool's broker as a ZeroMQ tcp endpoint: `--broker HOST[:PORT]` (`text`), else
    `$BANYAN_BROKER`, else loopback; the port defaults to `default_port`."""
    source = "--broker" if text else "BANYAN_BROKER"
    host, port = split(text or os.environ.get("BANYAN_BROKER") or defaults.BROKER_HOST, source)
    return f"tcp://{host}:{port or default_port}"


def worker_address(text: str | None) -> str:
    """A worker's broker. `--broker HOST[:PORT]` names the worker port itself. Otherwise the
    host comes from `$BANYAN_BROKER`, whose port, if it has one, is the *client* port (tools and
    workers share the variable) and is not used here. Where no `--broker` port is given, the
    port is `$BANYAN_WORKER_PORT`, else the default worker port."""
    if text:
        host, port = split(text, "--broker")
    else:
        env = os.environ.get("BANYAN_BROKER") or defaults.BROKER_HOST
        host, port = split(env, "BANYAN_BROKER")[0], None
    return f"tcp://{host}:{port or worker_port()}"


def worker_port() -> int:
    """`$BANYAN_WORKER_PORT`, else the default worker port; a bad value is a ValueError."""
    given = os.environ.get("BANYAN_WORKER_PORT", "").strip()
    if not given:
        return defaults.WORKER_PORT
    if not given.isdigit() or not 1 <= int(given) <= 65535:
        raise ValueError(
            f"BANYAN_WORKER_PORT: {given!r} is not a port: it must be a number from 1 to 65535"
        )
    return int(given)


def split(text: str, source: str) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT`, `[IPV6]:PORT` or `tcp://` any of those; a clear ValueError naming
    `source` otherwise."""
    rest = text.strip().removeprefix("tcp://")
    if rest.startswith("["):  # [v6] or [v6]:port
        host, sep, tail = rest.partition("]")
        host += sep
        port = tail.removeprefix(":") if tail.startswith(":") else None
        if tail and port is None:
            raise ValueError(f"{source}: {text!r} is not HOST[:PORT]")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address
        host, port = rest, None
        if ":" in host and not _ipv6(host):
            raise ValueError(
                f"{source}: {text!r} is not HOST[:PORT] (an IPv6 address with a port goes in "
                "brackets: [::1]:7411)"
            )
    if not host or any(c.isspace() or c in "/@?#" for c in host) or host == "[]":
        raise ValueError(f"{source}: {text!r} is not HOST[:PORT]")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host, (_port(port, source, text) if port is not None else None)


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(port: str, source: str, text: str) -> int:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"{source}: {text!r} is not HOST[:PORT]; the port must be a number from 1 to 65535"
        )
    return int(port)
