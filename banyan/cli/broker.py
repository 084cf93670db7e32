"""banyan-broker: the one process that owns the durable queue.

Usage:
  banyan-broker [options]

SIGTERM or SIGINT stops it after its current turn; SIGHUP (a closed terminal) is logged and
ignored.

Options:
  --bind HOST          Address to bind both sockets to [default: 127.0.0.1].
  --client-port N      Port for users' tools [default: 7411].
  --worker-port N      Port for worker daemons [default: 7412].
  --state-dir DIR      LMDB state directory (default: $BANYAN_HOME/state).
  --heartbeat S        Heartbeat interval in seconds [default: 1.0].
  --liveness N         Missed heartbeats before a worker is lost [default: 5].
  --prefetch N         Jobs a worker may hold ahead at most, beyond its free room, unless
                       it sets its own (banyan-worker --prefetch): as many as its slots
                       run in 0.1 s at its recent job length; 0: none [default: 8].
  --retention T        Keep ended jobs, their attempts and events this long (2h, 30d),
                       then purge them; `none` keeps them forever [default: 30d].
  --usage-half-life T  Fair share: a user's past usage counts half after T (1h30m, 7d)
                       [default: 7d].
  --insecure           No CurveZMQ keys: every peer is trusted (loudly warned about off
                       loopback).
  --log-level LEVEL    debug, info, warning or error [default: info].
  -h --help            Show this help.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
from typing import Any

import zmq

from banyan import openfiles
from banyan.broker.server import Broker, BrokerConfig
from banyan.broker.state import Config
from banyan.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, daemon_logging
from banyan.cli.output import number, positive_duration, prefetch
from banyan.cli.usage import UsageError, parse
from banyan.config import home
from banyan.keys import KeyExposed

TOOL = "banyan-broker"


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = parse(__doc__ or "", argv)
        except SystemExit:  # --help was printed
            return EXIT_OK
        config = BrokerConfig(
            state_dir=args["--state-dir"] or str(home() / "state"),
            bind=args["--bind"],
            client_port=number(args["--client-port"], "--client-port", integer=True),
            worker_port=number(args["--worker-port"], "--worker-port", integer=True),
            core=Config(
                heartbeat=number(args["--heartbeat"], "--heartbeat", positive=True),
                liveness=number(args["--liveness"], "--liveness", minimum=1, integer=True),
                half_life=positive_duration(args["--usage-half-life"], "--usage-half-life"),
                retention=retention(args["--retention"]),
                prefetch=prefetch(args["--prefetch"]),
            ),
            secure=not args["--insecure"],
        )
        if max(config.client_port, config.worker_port) > 65535:
            raise UsageError("--client-port, --worker-port: a port is at most 65535")
        if config.client_port and config.client_port == config.worker_port:
            raise UsageError("--client-port and --worker-port must differ")
    except UsageError as e:
        print(f"{TOOL}: {e}" + (f"\n{e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_USAGE
    daemon_logging(args["--log-level"])
    log = logging.getLogger("banyan.broker")
    # Every connection (a tool, a worker, one still in its handshake) holds a descriptor.
    limit = openfiles.raise_to_hard()
    if limit < openfiles.ADVISED:
        log.warning(
            "it may hold only %d open files, so about as many connections of tools and "
            "workers at once; raise the limit (LimitNOFILE= in its systemd unit, ulimit -n) "
            "to %d or more",
            limit,
            openfiles.ADVISED,
        )
    if not config.secure and not _loopback(config.bind):
        log.warning(
            "INSECURE: listening on %s with no keys; anyone who can reach these ports can "
            "submit and run commands as any user",
            config.bind,
        )
    elif not config.secure:
        log.info("keys are off (--insecure): every local peer acts as the administrator")
    try:
        broker = Broker(config)
    except KeyExposed as e:
        log.error("%s", e)
        return EXIT_USAGE
    except zmq.ZMQError as e:  # most often: another broker already listens there
        why = str(e)
        if e.errno == errno.ENODEV:  # what ZeroMQ says of a name it cannot bind to
            why = "it is no address or network interface of this machine (--bind takes one "
            why += "of its addresses, or 0.0.0.0 for all)"
        log.error("cannot listen on %s (ports %d, %d): %s", config.bind, *_ports(config), why)
        return EXIT_REFUSED
    except OSError as e:  # the state directory or keys cannot be made or read
        log.error("cannot start: %s", e)
        return EXIT_REFUSED

    def stop(*_: Any) -> None:
        # Only a flag: the loop finishes its turn, commits and closes (SPEC: signals set flags).
        broker.stopping = True

    def hangup(*_: Any) -> None:
        broker.hangups += 1  # logged and ignored: a closed terminal must not stop the broker

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    broker.run()
    return EXIT_OK


def retention(text: str) -> float | None:
    """`--retention`: a duration, or `none` to keep everything."""
    if text.strip().lower() == "none":
        return None
    try:
        return positive_duration(text, "--retention")
    except UsageError:
        raise UsageError(
            f"--retention: expected how long to keep ended jobs, such as 30d, 12h or 90m, or "
            f"none to keep them forever; got {text!r}"
        ) from None


def _ports(config: BrokerConfig) -> tuple[int, int]:
    return config.client_port, config.worker_port


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


if __name__ == "__main__":
    sys.exit(main())
