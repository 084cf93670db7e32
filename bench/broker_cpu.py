"""The broker's own CPU per submit, measured in one process, with no clients competing for cores.

The other benchmarks time whole processes against each other on a 2-core machine, where the
clients' CPU and the disk move every figure by 10-20% from run to run. Here a real broker
(`Broker`, a real store in a scratch directory, plain ZeroMQ on loopback) and one DEALER live in
this process. The requests are encoded before the clock starts; then the broker's loop serves
them, and `time.process_time` over that part (the broker, ZeroMQ's I/O thread, and the DEALER
sending requests and reading replies) is divided by the requests served. That varies far less
between runs, so it is the figure to compare before and after a change to the request path.

- pipelined: 20,000 single-job submits from a client that keeps 512 in flight (the broker
  merges a turn's small submits into one submission, and commits once a turn);
- one at a time: a submit, then the broker's turns until its reply: one commit per request.

The reference is bench/ideal.py's broker, served the same way in the same process: drain,
one row per job, one commit per turn, reply; no validation, no indexes, no state machine.

    python bench/broker_cpu.py            # 20,000 pipelined, 2,000 one at a time
    python bench/broker_cpu.py --quick    # 2,000 and 200
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from banyan.broker.server import Broker, BrokerConfig
from bench.common import Figure, Report, median, parser, repeated, workdir
from bench.ideal import Ideal

BODY = {"jobs": [{"command": "true"}], "groups": [], "submit_key": None}
# Requests in flight: as a pipelining client keeps, within the broker's SLOW_CONSUMER (a client
# more than 1,000 replies behind loses the replies past that).
WINDOW = 512
MAX_STEPS = 1_000_000  # bounds every serving loop in count...
DEADLINE = 120.0  # ...and in seconds; far above what any run needs


def _frames(n: int, first: int) -> list[bytes]:
    return [msgpack.packb([1, "submit", first + i, BODY]) for i in range(n)]


def _dealer(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def _replies(sock: zmq.Socket[Any]) -> int:
    got = 0
    while sock.poll(0):
        reply = msgpack.unpackb(sock.recv(), raw=False)
        if reply[1] != "submitted":
            raise RuntimeError(f"refused: {reply}")
        got += 1
    return got


def pipelined(step: Callable[[], None], sock: zmq.Socket[Any], n: int, first: int) -> float:
    """CPU µs per request for n submits sent by a client keeping WINDOW of them in flight."""
    frames = _frames(n, first)
    window = min(WINDOW, n)
    for frame in frames[:window]:
        sock.send(frame)
    time.sleep(0.2)  # the I/O threads move the first window into the broker's queue
    sent, got = window, 0
    started, deadline = time.process_time(), time.monotonic() + DEADLINE
    for _ in range(MAX_STEPS):
        step()
        answered = _replies(sock)
        got += answered
        for frame in frames[sent : sent + answered]:
            sock.send(frame)
        sent = min(n, sent + answered)
        if got >= n:
            return 1e6 * (time.process_time() - started) / n
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"only {got} of {n} answered")


def one_at_a_time(step: Callable[[], None], sock: zmq.Socket[Any], n: int, first: int) -> float:
    """CPU µs per request when each waits for its reply before the next is sent."""
    frames = _frames(n, first)
    started, deadline = time.process_time(), time.monotonic() + DEADLINE
    for frame in frames:
        sock.send(frame)
        for _ in range(MAX_STEPS):
            step()
            if _replies(sock):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no reply")
    return 1e6 * (time.process_time() - started) / n


def measure(root: Path, n_pipe: int, n_one: int) -> dict[str, float]:
    for sub in ("broker", "ideal"):
        (root / sub).mkdir(parents=True)
    ctx: zmq.Context[Any] = zmq.Context()
    config = BrokerConfig(
        str(root / "broker"), bind="127.0.0.1", client_port=0, worker_port=0, secure=False
    )
    broker = Broker(config, ctx=ctx)
    ideal = Ideal(ctx, "tcp://127.0.0.1:0", str(root / "ideal"))
    ideal_port = int(ideal.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    to_broker = _dealer(ctx, f"tcp://127.0.0.1:{broker.client_port}")
    to_ideal = _dealer(ctx, f"tcp://127.0.0.1:{ideal_port}")
    try:
        broker_step = functools.partial(broker.step, 0.001)
        ideal_step = functools.partial(ideal.turn, 1)
        one_at_a_time(broker_step, to_broker, 50, 1)  # warm up: connection, page cache
        one_at_a_time(ideal_step, to_ideal, 50, 1)
        return {
            "pipelined_us": pipelined(broker_step, to_broker, n_pipe, 100),
            "ideal_pipelined_us": pipelined(ideal_step, to_ideal, n_pipe, 100),
            "one_us": one_at_a_time(broker_step, to_broker, n_one, 100 + n_pipe),
            "ideal_one_us": one_at_a_time(ideal_step, to_ideal, n_one, 100 + n_pipe),
        }
    finally:
        to_broker.close()
        to_ideal.close()
        ideal.close()
        broker.close()
        ctx.term()


def main() -> int:
    args = parser(__doc__).parse_args()
    n_pipe, n_one = (2000, 200) if args.quick else (20_000, 2000)
    report = Report("broker_cpu", args.quick, args.repeat, {"pipelined": n_pipe, "one": n_one})
    with workdir(args.keep, "cpu") as root:
        report.runs = repeated(args.repeat, lambda i: measure(root / str(i), n_pipe, n_one))

    def med(key: str) -> float:
        return median([r[key] for r in report.runs])

    for label, key in (("pipelined", "pipelined"), ("one at a time", "one")):
        value, ref = med(f"{key}_us"), med(f"ideal_{key}_us")
        report.add(
            Figure(f"broker CPU per submit, {label}", value, "µs", "ideal broker", ref, value / ref)
        )
    report.notes.append("CPU of this process while serving: broker, ZeroMQ I/O, reading replies")
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
