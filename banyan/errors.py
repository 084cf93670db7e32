"""Error types shared by the broker, the client and the tools.

Every refusal carries a wire `code` (see docs/protocol.md) and a message meant for a person.
"""

from __future__ import annotations


class BanyanError(Exception):
    """A refused request. `code` travels on the wire; `message` is shown to the user."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class BadRequest(BanyanError):
    code = "bad_request"


class Invalid(BadRequest):
    """A request the client's own checks refuse before sending it, as the broker would: a
    field past its limit or of the wrong form. Nothing was sent."""


class NotFound(BanyanError):
    code = "not_found"


class Conflict(BanyanError):
    """An illegal transition, a field not writable in this state, a cycle, a duplicate name."""

    code = "conflict"


class Forbidden(BanyanError):
    code = "forbidden"


class NoSpace(BanyanError):
    code = "no_space"


class Busy(BanyanError):
    """A user has as many long operations waiting as one may (the broker's
    MAX_WAITING_PER_USER): refused, nothing changed; try again when one has ended."""

    code = "busy"


class BrokerUnavailable(BanyanError):
    """The broker cannot be reached, or stopped answering: nothing was refused, nothing may
    have happened. The tools exit 3 on it (SPEC §8)."""

    code = "unavailable"


class KeyRefused(BrokerUnavailable):
    """The broker refused this machine's key at the handshake, or the key it needs is missing:
    no request got through. Fixed with keys (docs/operations.md), not by trying again."""

    code = "key_refused"


class WrongPort(BrokerUnavailable):
    """What answers at this address is the broker's other socket (client port for a worker,
    worker port for a tool)."""

    code = "wrong_port"


BY_CODE: dict[str, type[BanyanError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        Conflict,
        Forbidden,
        NoSpace,
        Busy,
        BrokerUnavailable,
        WrongPort,
    )
}


def from_wire(code: str, message: str) -> BanyanError:
    """Rebuild the typed error a broker sent, so clients can catch it by class."""
    return BY_CODE.get(code, BanyanError)(message, code)
