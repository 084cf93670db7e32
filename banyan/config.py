"""Where things are: BANYAN_HOME, BANYAN_BROKER and address parsing, shared by every program."""

from __future__ import annotations

import os
from pathlib import Path

from banyan import defaults


def home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`$BANYAN_HOME`, else `~/.banyan`: keys and (by default) the broker's state live here."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("BANYAN_HOME") or Path.home() / ".banyan")


def address(text: str | None, default_port: int) -> str:
    """`HOST[:PORT]` (or `$BANYAN_BROKER`, or loopback) as a ZeroMQ tcp endpoint."""
    text = text or os.environ.get("BANYAN_BROKER") or defaults.BROKER_HOST
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or (host.endswith(":") and not host.startswith("[")):
        host, port = text, str(default_port)
    if not host:
        raise ValueError(f"broker address {text!r} has no host")
    return f"tcp://{host}:{int(port)}"
