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


def serve(port: int, state: str, ready: Any = None) -> None:
    """Serve on 127.0.0.1:port until SIGTERM; `ready` (an Event) is set once bound."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    env = lmdb.open(state, map_size=1 << 34, sync=True, metasync=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    if ready is not None:
        ready.set()
    next_id = 1
    while not stopping:
        if not sock.poll(200, zmq.POLLIN):
            continue
        inbox = []
        for _ in range(BATCH):
            try:
                inbox.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        replies = []
        with env.begin(write=True) as txn:
            for identity, payload in inbox:
                _, _, req, body = msgpack.unpackb(payload, raw=False)
                ids = []
                for job in body["jobs"]:
                    txn.put(_U64.pack(next_id), msgpack.packb(job), append=True)
                    ids.append(next_id)
                    next_id += 1
                reply = [1, "submitted", req, {"jobs": ids, "groups": {}}]
                replies.append([identity, msgpack.packb(reply)])
        for frames in replies:  # only after the commit: persist, then acknowledge
            sock.send_multipart(frames)
    sock.close()
    ctx.term()
    env.close()


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
