"""The reference for submit rates: the least a durable single-threaded broker can do.

One ROUTER, one LMDB environment opened as the broker opens it (synchronous commits). Each
turn drains what is waiting, writes every request's body as one row per job in a single write
transaction, commits once (group commit), and only then replies `submitted` with the new ids.
No validation, no indexes, no state machine, no CURVE: what is left is the floor that
ZeroMQ, msgpack, LMDB and CPython put under any design like Banyan's.

    python bench/ideal.py --port 5555 --state /tmp/ideal    # serve until SIGTERM
"""

from __future__ import annotations

import argparse
import signal
import struct
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import zmq

BATCH = 512
_U64 = struct.Struct(">Q")


class Ideal:
    """The reference broker's state: its socket, its store, the next id. `turn` serves once."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, state: str) -> None:
        self.env = lmdb.open(state, map_size=1 << 34, sync=True, metasync=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.bind(endpoint)
        self.next_id = 1

    def turn(self, timeout_ms: int) -> None:
        """Wait up to `timeout_ms` for requests, then drain, write, commit once, reply."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return
        inbox = []
        for _ in range(BATCH):
            try:
                inbox.append(self.sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        replies = []
        with self.env.begin(write=True) as txn:
            for identity, payload in inbox:
                _, _, req, body = msgpack.unpackb(payload, raw=False)
                ids = []
                for job in body["jobs"]:
                    txn.put(_U64.pack(self.next_id), msgpack.packb(job), append=True)
                    ids.append(self.next_id)
                    self.next_id += 1
                reply = [1, "submitted", req, {"jobs": ids, "groups": {}}]
                replies.append([identity, msgpack.packb(reply)])
        for frames in replies:  # only after the commit: persist, then acknowledge
            self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close()
        self.env.close()


def serve(port: int, state: str, ready: Any = None) -> None:
    """Serve on 127.0.0.1:port until SIGTERM; `ready` (an Event) is set once bound."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    ctx = zmq.Context()
    ideal = Ideal(ctx, f"tcp://127.0.0.1:{port}", state)
    if ready is not None:
        ready.set()
    while not stopping:
        ideal.turn(200)
    ideal.close()
    ctx.term()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", type=Path, required=True)
    args = p.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    serve(args.port, str(args.state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
