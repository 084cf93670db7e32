"""What a connecting socket learns about its connection, in words for the person who must act.

A DEALER that connects never fails by itself: ZeroMQ retries quietly, so a closed port, an
unknown host, a missing key and a refused key all used to look like a broker that does not
answer. The socket's monitor says what happened within milliseconds; `Watch` turns those events
into the error a tool reports (exit 3) and a worker logs.

The broker's ZAP handler answers an unknown or revoked key with status 400, and a key it knows
for the other socket (a worker key at the client port, a user key at the worker port) with 500,
so that a peer at the wrong port can say so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from banyan import defaults
from banyan.errors import BrokerUnavailable, KeyRefused, WrongPort
from banyan.keys import Curve, keys_dir, peer

# What the two kinds of peer call each other, for messages.
_KEYGEN = {"client": "banyan-keygen user NAME", "worker": "banyan-keygen worker NAME"}
_MY_PORT = {"client": ("client", defaults.CLIENT_PORT), "worker": ("worker", defaults.WORKER_PORT)}
_OTHER = {"client": "worker", "worker": "client"}
_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
)
# A CURVE handshake the broker drops this many times in a row (with no other word) means a
# broker that cannot read this machine's HELLO (keys/broker.key is not its key) or one that
# has no keys at all, which may close before saying so. A keyless probe tells the two apart.
_DROPS = 2
PROBE_WAIT = 0.5  # seconds a probe may take; it needs a round trip or two
# Why a connection to the broker failed, when the network (not the broker) is at fault.
_NETWORK = {
    errno.EHOSTUNREACH: "no route to host (is that machine up, and on a network this one reaches?)",
    errno.ENETUNREACH: "network is unreachable (this machine has no route to it: check its "
    "network link and routes)",
    errno.EHOSTDOWN: "host is down",
    errno.ETIMEDOUT: "connecting got no answer (is that machine up, and does every firewall on "
    "the way let the connection through?)",
}
_OTHER_ERROR = "{error}"


@dataclass(frozen=True)
class Credentials:
    """The key a peer connects with (None: no keys here) and where it came from."""

    kind: str  # "client" or "worker"
    home: Path
    curve: Curve | None

    @property
    def secret(self) -> Path:
        return keys_dir(self.home) / f"{self.kind}.key_secret"

    @property
    def server(self) -> Path:
        return keys_dir(self.home) / "broker.key"


def credentials(home: Path, kind: str) -> Credentials:
    """This machine's key pair for `kind` and the broker's public key; none at all means a
    keyless connection (an `--insecure` broker). Half a set is an error found before
    connecting, naming the missing file."""
    found = Credentials(kind, home, None)
    mine, server = found.secret.exists(), found.server.exists()
    if not mine and not server:
        return found
    if not mine:
        raise KeyRefused(
            f"no {kind} key: {found.secret} is missing; on the broker's machine, "
            f"`{_KEYGEN[kind]}` makes one and says where to copy it"
        )
    if not server:
        raise KeyRefused(
            f"the broker's public key is missing: copy keys/broker.key from the broker's "
            f"machine ($BANYAN_HOME/keys/broker.key there) to {found.server}"
        )
    try:
        curve = peer(home, kind)
    except (OSError, ValueError) as e:
        raise KeyRefused(f"cannot read the keys in {keys_dir(home)}: {e}") from None
    return Credentials(kind, home, curve)


class Watch:
    """The monitor of one connecting socket. `read()` takes what happened since the last call
    and returns the problem it shows, if any; `handshakes` counts connections made, so a
    caller can tell that it is talking over a new connection (its broker restarted)."""

    def __init__(self, sock: zmq.Socket[Any], endpoint: str, creds: Credentials) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.creds = creds
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(_EVENTS)
        self.handshakes = 0
        self.drops = 0
        self.reached = False  # a TCP connection was made: something listens there
        self.closed = False  # the connection made last was closed since (its broker went away)
        self.unreachable: BrokerUnavailable | None = None  # why connecting fails, once probed

    def read(self) -> BrokerUnavailable | None:
        """The problem the events since the last call show; a key's or port's before a
        connection's, as ZeroMQ retries a connection after refusing a handshake."""
        trouble = None
        for _ in range(1000):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = int(event["event"])
            found = self._event(kind, int(event["value"]))
            if found is not None and (trouble is None or type(trouble) is BrokerUnavailable):
                trouble = found
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                trouble = None  # connected since: what went wrong before is over
        return trouble

    def _event(self, event: int, value: int) -> BrokerUnavailable | None:
        if event == zmq.EVENT_CONNECTED:
            self.reached = True
            return None
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes += 1
            self.drops = 0
            self.closed = False
            return None
        if event == zmq.EVENT_DISCONNECTED:
            self.closed = self.closed or self.handshakes > 0
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return self._refused() if value != 500 else self._wrong_port()
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return self._protocol(value)
        if self.handshakes:
            return None  # a broker that was there and went away: retried quietly
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.creds.curve is not None:
            self.drops += 1
            if self.drops >= _DROPS:
                if keyless(self.sock.context, self.endpoint):
                    return self._protocol(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
                return KeyRefused(
                    f"the broker at {self.endpoint} dropped the key handshake: "
                    f"{self.creds.server} is not its public key (copy keys/broker.key again "
                    "from the broker's machine)"
                )
        if event == zmq.EVENT_CONNECT_RETRIED and not self.reached:
            if self.unreachable is None:  # probed once: ZeroMQ retries every 100 ms
                self.unreachable = self._unreachable()
            return self.unreachable
        return None

    def _refused(self) -> KeyRefused:
        what = "this worker's" if self.creds.kind == "worker" else "this"
        return KeyRefused(
            f"the broker at {self.endpoint} refused {what} key ({self.creds.secret}): it is "
            f"not authorized there, or was revoked; on the broker's machine, "
            f"`{_KEYGEN[self.creds.kind]}` makes one"
        )

    def _wrong_port(self) -> WrongPort:
        mine, port = _MY_PORT[self.creds.kind]
        other = _OTHER[self.creds.kind]
        return WrongPort(
            f"the broker at {self.endpoint} knows this key, but not on this port: either "
            f"this is its {other} port ({mine}s use its {mine} port, {port} by default), or "
            f"{self.creds.secret} holds a {other} key"
        )

    def _protocol(self, value: int) -> KeyRefused:
        if value != zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return KeyRefused(f"the key handshake with the broker at {self.endpoint} failed")
        if self.creds.curve is None:
            return KeyRefused(
                f"the broker at {self.endpoint} requires a key and this machine has none: "
                f"{self.creds.secret} is missing; on the broker's machine, "
                f"`{_KEYGEN[self.creds.kind]}` makes one and says where to copy it"
            )
        return KeyRefused(
            f"the broker at {self.endpoint} runs without keys (--insecure) and refuses "
            f"keyed connections; move {keys_dir(self.creds.home)} aside to connect to it"
        )

    def _unreachable(self) -> BrokerUnavailable | None:
        """Why ZeroMQ's connection failed, in words: it does not say, so a plain TCP connect
        to the same address asks the kernel (None: that one connected)."""
        host, _, port = self.endpoint.removeprefix("tcp://").rpartition(":")
        try:
            found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            return BrokerUnavailable(f"cannot find the broker's host {host!r}: {e}")
        family, kind, proto, _, address = found[0]
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(PROBE_WAIT)
            try:
                failed = probe.connect_ex(address)
            except OSError as e:  # a timeout, or an address this machine cannot use at all
                failed = e.errno or errno.ETIMEDOUT
        if not failed:
            return None
        if failed in (errno.EAGAIN, errno.EINPROGRESS):  # what connect_ex says when time is up
            failed = errno.ETIMEDOUT
        if failed == errno.ECONNREFUSED:
            role = "worker" if self.creds.kind == "worker" else "client"
            return BrokerUnavailable(
                f"nothing is listening at {self.endpoint} (connection refused): is "
                f"banyan-broker running there, and is {port} its {role} port?"
            )
        why = _NETWORK.get(failed, _OTHER_ERROR).format(error=os.strerror(failed))
        return BrokerUnavailable(f"cannot reach the broker at {self.endpoint}: {why}")

    def close(self) -> None:
        # Stop the monitor before closing either end, or its inproc name stays taken.
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)


def keyless(ctx: zmq.Context[Any], endpoint: str) -> bool:
    """Whether the broker at `endpoint` completes a handshake without keys. Only connects:
    nothing is sent."""
    probe: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    monitor: zmq.Socket[Any] = probe.get_monitor_socket(_EVENTS)
    try:
        probe.connect(endpoint)
        deadline = time.monotonic() + PROBE_WAIT
        for _ in range(100):
            left = deadline - time.monotonic()
            if left <= 0 or not monitor.poll(max(1, int(left * 1000))):
                return False
            event = int(recv_monitor_message(monitor)["event"])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event & (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return False
        return False
    finally:
        with contextlib.suppress(zmq.ZMQError):
            probe.disable_monitor()
        monitor.close(linger=0)
        probe.close(linger=0)
