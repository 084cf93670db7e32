"""The ZAP handler: decides, for each CURVE handshake, who the peer is and whether it may in.

It runs inside the broker's poll loop (a ROUTER on the context's ZAP endpoint), so there is no
thread. The client socket admits user and admin keys, the worker socket worker keys only. The
answer's User-Id, `role:name` (with `/account` when a key's Unix account is not its name), is
what every later decision uses (never message content).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
from zmq.utils import z85

from banyan.keys import Authorizer

log = logging.getLogger("banyan.broker")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ADMITS = {b"client": ("user", "admin"), b"worker": ("worker",)}


class ZapHandler:
    def __init__(self, ctx: zmq.Context[Any], authorizer: Authorizer) -> None:
        self.authorizer = authorizer
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.refused = 0

    def handle(self) -> None:
        for _ in range(1000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = self._answer(frames)
            if reply is not None:
                self.sock.send_multipart(reply)

    def _answer(self, frames: list[bytes]) -> list[bytes] | None:
        # [peer, b"", version, request id, domain, address, identity, mechanism, credentials...]
        if len(frames) < 8 or frames[1] != b"":
            return None
        peer, _, version, request_id, domain, address, _identity, mechanism = frames[:8]
        credentials = frames[8:]

        def answer(code: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
            return [peer, b"", version, request_id, code, text, user, b""]

        if mechanism != b"CURVE" or len(credentials) != 1 or domain not in ADMITS:
            self.refused += 1
            return answer(b"400", b"CURVE required")
        who = self.authorizer.lookup(z85.encode(credentials[0]))
        if who is None or who.role not in ADMITS[domain]:
            self.refused += 1
            what = "unknown key" if who is None else f"a {who.role} key"
            log.warning(
                "refused %s on the %s socket from %s",
                what,
                domain.decode(),
                address.decode(errors="replace"),
            )
            # A key known for the other socket is answered 500, not 400, so that a peer that
            # knocked at the wrong port (a worker at the client port) can say so (banyan.link).
            return answer(b"400" if who is None else b"500", b"not authorized")
        return answer(b"200", b"OK", who.user_id.encode())

    def close(self) -> None:
        self.sock.close(linger=0)
