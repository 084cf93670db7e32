"""The wire contract of docs/protocol.md, as banyan/protocol.py enforces it."""

from __future__ import annotations

import contextlib
import copy
import enum
import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banyan import defaults
from banyan import protocol as p
from banyan.arrays import INDEX_VAR as INDEX
from banyan.broker.submission import Source
from banyan.protocol import (
    BAD_REQUEST,
    BROKER_TO_WORKER,
    CLIENT_REPLIES,
    CLIENT_REQUESTS,
    WORKER_TO_BROKER,
    Message,
    ProtocolError,
    decode,
    encode,
    pack,
)

DIRECTIONS = {
    "client_requests": CLIENT_REQUESTS,
    "client_replies": CLIENT_REPLIES,
    "worker_to_broker": WORKER_TO_BROKER,
    "broker_to_worker": BROKER_TO_WORKER,
}

JOB_INFO: dict[str, Any] = {
    "id": 7,
    "name": "build",
    "command": "make",
    "state": "terminated",
    "outcome": "success",
    "exit_code": 0,
    "signal": None,
    "attempts": 1,
    "worker": None,
    "progress": 100.0,
    "progress_message": "done",
    "owner": "alice",
    "depends_on": [{"kind": "after", "job": 3}],
    "groups": ["nightly"],
    "priority": 0,
    "cpus": 1.0,
    "memory": 0,
    "gpus": 0,
    "tags": [],
    "submitted": 1.5,
    "started": 2.5,
    "ended": 3.5,
    "cancel_reason": None,
    "reason": None,
    "history": [{"attempt": 1, "token": 9, "gpu_ids": [0, 1], "rss": None}],
    "output_tail": {"stdout": "ok\n", "stderr": ""},
}
GROUP_INFO: dict[str, Any] = {
    "id": 2,
    "name": "nightly",
    "owner": "alice",
    "open": False,
    "total": 3,
    "counts": {"terminated": 3},
    "done": 3,
    "succeeded": 3,
}
WORKER_INFO: dict[str, Any] = {
    "name": "w1",
    "host": "node1",
    "state": "idle",
    "cpus": 8.0,
    "memory": 16384,
    "gpus": 0,
    "used_cpus": 0.0,
    "used_memory": 0,
    "used_gpus": 0,
    "tags": ["ssd"],
    "running": [],
    "completed": 12,
    "last_seen": 99.5,
}

# One valid body per (direction, type); test_examples_cover_every_type keeps it complete.
EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "client_requests": {
        "ping": {},
        "submit": {
            "jobs": [
                {"command": "echo hello"},
                {
                    "command": "python train.py --lr 0.1",
                    "name": "train",
                    "cwd": "/srv/work",
                    "env": {"CUDA_VISIBLE_DEVICES": "0", "EMPTY": ""},
                    "cpus": 4,
                    "memory": 8192,
                    "gpus": 1,
                    "tags": ["gpu", "a100"],
                    "priority": -5,
                    "max_attempts": 3,
                    "time_limit": 3600,
                    "cancel_grace": 30.5,
                    "output": "logs/%j.out",
                    "depends_on": [
                        {"local": 0},
                        {"kind": "after_any", "job": 12},
                        {"kind": "after_fail", "group": "nightly"},
                        {"group": 4},
                    ],
                    "groups": ["nightly"],
                    "hold": True,
                    "umask": 0o077,
                },
            ],
            "groups": [{"name": "nightly", "open": True}, {"name": "other"}],
            "submit_key": "a1b2c3",
            "environment": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        },
        "cancel": {
            "jobs": [1, 2],
            "groups": ["nightly", 3],
            "reason": "superseded",
            "select": {"ids": [[100, 2000], [5, 5]], "owner": "alice", "state": "available"},
        },
        "modify_many": {
            "jobs": [4],
            "select": {"name": "seed-*", "group": "nightly"},
            "set": {"priority": 3},
            "release": True,
        },
        "modify": {
            "job": 5,
            "set": {"priority": 10, "cpus": 2, "depends_on": [{"job": 4}], "time_limit": None},
            "hold": True,
        },
        "close_group": {"group": "nightly"},
        "status": {
            "jobs": [1],
            "group": 3,
            "state": "running",
            "owner": "alice",
            "all": True,
            "limit": 50,
            "detail": True,
        },
        "wait": {"jobs": [1, 2], "groups": [3], "timeout": 2},
        "workers": {},
        "drain": {"worker": "w1", "resume": True},
        "forget": {"worker": "w1"},
        "stats": {},
        "users": {},
        "set_user": {"name": "bob", "set": {"shares": 2.0, "max_running": None}},
        "events": {"since": 100, "limit": 10},
        "logs": {"job": 7, "stream": "stderr", "offset": 4096, "limit": 1024},
    },
    "client_replies": {
        "pong": {"version": 1, "time": 1700000000.25},
        "submitted": {"jobs": [10, 11], "groups": {"nightly": 2}},
        "cancelled": {"cancelled": [1], "pending": [2], "already": [3]},
        "modified": {"modified": [4], "skipped": [[5, "priority: may only be changed ..."]]},
        "job": {"job": JOB_INFO},
        "group": {"group": GROUP_INFO},
        "status": {"jobs": [JOB_INFO], "groups": [GROUP_INFO], "truncated": False},
        "waited": {"jobs": [JOB_INFO], "timed_out": True},
        "workers": {"workers": [WORKER_INFO]},
        "stats": {"jobs": {"running": 3}, "uptime": 12.5, "workers": [{"name": "w1"}]},
        "users": {"users": [{"name": "bob", "shares": 2.0, "max_running": None}]},
        "events": {
            "events": [
                [1, 10.5, 7, None, "available", None],
                [2, 11.0, 7, "available", "running", "w1"],
            ],
            "next": 3,
        },
        "logs": {"data": b"line\n", "offset": 0, "size": 5, "live": False, "eof": True},
        "error": {"code": "not_found", "message": "no job 99"},
    },
    "worker_to_broker": {
        "register": {
            "name": "w1",
            "host": "node1",
            "cpus": 8,
            "memory": 16384,
            "gpus": 2,
            "tags": ["gpu"],
            "running": [[4, 17]],
            "pid": 4242,
            "only_account": None,
            "refused": {"root": "worker w1 does not run jobs as root"},
            "instance": "5f0c2a9e1b7d3c44",
            "draining": False,
            "prefetch": 2,
        },
        "draining": {"reason": "SIGTERM"},
        "stopping": {},
        "heartbeat": {"running": [[4, 17, 99.5, 1 << 20], [5, 18, None, None]]},
        "claim": {"max": 4},
        "started": {"job": 4, "token": 17, "pid": 5151},
        "hand_back": {"job": 4, "token": 17, "reason": "account bob does not exist on worker w1"},
        "returned": {"job": 5, "token": 18, "reason": "asked back by the broker"},
        "progress": {
            "job": 4,
            "token": 17,
            "percent": 50,
            "message": "epoch 5/10",
            "cpu_percent": 350.0,
            "rss": 123456,
        },
        "result": {
            "job": 4,
            "token": 17,
            "outcome": "exited",
            "exit_code": 0,
            "signal": None,
            "stdout_tail": b"done\n",
            "stderr_tail": b"\xff\x00binary ok",
            "then": [[5, 18]],
        },
        "log_chunk": {
            "request": 3,
            "data": b"x" * 100,
            "offset": 0,
            "size": 100,
            "eof": True,
            "error": None,
        },
    },
    "broker_to_worker": {
        "registered": {"heartbeat": 1.0, "liveness": 5},
        "assign": {
            "jobs": [
                {
                    "job": 4,
                    "token": 17,
                    "attempt": 1,
                    "command": "echo hi",
                    "cwd": None,
                    "env": {"A": "b"},
                    "gpu_ids": [0],
                    "time_limit": 60.0,
                    "cancel_grace": 10.0,
                    "output": None,
                    "account": "alice",
                    "environ": "0f" * 16,
                    "umask": None,
                    "ahead": True,
                    "cpus": 1.0,
                    "memory": 0,
                }
            ],
            "environments": {"0f" * 16: {"PATH": "/usr/bin:/bin"}},
        },
        "cancel": {"job": 4, "token": 17, "reason": "cancelled by alice"},
        "kill_stale": {"job": 4, "token": 16},
        "revoke": {"job": 5, "token": 18},
        "ack": {"job": 4, "token": 17},
        "drain": {"resume": False},
        "heartbeat": {},
        "reregister": {},
        "fetch_log": {
            "request": 3,
            "job": 4,
            "token": 17,
            "stream": "stdout",
            "offset": 0,
            "limit": 65536,
        },
        "error": {"code": "bad_request", "message": "claim: max: must be >= 1, got 0"},
    },
}

ALL_EXAMPLES = [
    pytest.param(direction, mtype, body, id=f"{direction}:{mtype}")
    for direction, bodies in EXAMPLES.items()
    for mtype, body in bodies.items()
]


def frame(mtype: Any, body: Any, req: Any = 7, version: Any = 1) -> bytes:
    """Pack an envelope without encode's checks, as a hostile or buggy peer would."""
    out: bytes = msgpack.packb([version, mtype, req, body], use_bin_type=True)
    return out


def refuse(data: bytes, allowed: frozenset[str] | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, allowed)
    return info.value


# --- round trips -------------------------------------------------------------------------------


def test_examples_cover_every_type() -> None:
    for direction, allowed in DIRECTIONS.items():
        assert set(EXAMPLES[direction]) == set(allowed), direction


def sent_values_survive(sent: Any, got: Any) -> bool:
    """Every value sent comes back equal (ints widened to floats compare equal), defaults aside."""
    if isinstance(sent, dict):
        return isinstance(got, dict) and all(
            k in got and sent_values_survive(v, got[k]) for k, v in sent.items()
        )
    if isinstance(sent, (list, tuple)):
        return (
            isinstance(got, list)
            and len(sent) == len(got)
            and all(sent_values_survive(a, b) for a, b in zip(sent, got, strict=True))
        )
    return bool(sent == got)


@pytest.mark.parametrize(("direction", "mtype", "body"), ALL_EXAMPLES)
def test_round_trip(direction: str, mtype: str, body: dict[str, Any]) -> None:
    allowed = DIRECTIONS[direction]
    original = copy.deepcopy(body)
    data = encode(mtype, body, 42, allowed=allowed)
    assert body == original  # encode never touches the caller's body
    msg = decode(data, allowed)
    assert isinstance(msg, Message)
    assert (msg.type, msg.req) == (mtype, 42)
    # Every key sent comes back with an equal value (ints widened to floats compare equal).
    assert sent_values_survive(body, msg.body)
    # A decoded body is itself valid and decodes to itself: the broker can forward it.
    again = decode(encode(mtype, msg.body, 42, allowed=allowed), allowed)
    assert again == msg
    # Without `allowed` the body still finds its schema.
    assert decode(data).body == msg.body


def test_submit_defaults_filled_and_numbers_widened() -> None:
    msg = decode(encode("submit", {"jobs": [{"command": "true", "cpus": 2}]}), CLIENT_REQUESTS)
    assert msg.body == {
        "jobs": [
            {
                "command": "true",
                "name": "",
                "cwd": None,
                "env": {},
                "cpus": 2.0,
                "memory": defaults.MEMORY_MIB,
                "gpus": defaults.GPUS,
                "tags": [],
                "priority": defaults.PRIORITY,
                "max_attempts": defaults.MAX_ATTEMPTS,
                "time_limit": None,
                "cancel_grace": defaults.CANCEL_GRACE,
                "output": None,
                "depends_on": [],
                "groups": [],
                "hold": False,
                "umask": None,
            }
        ],
        "groups": [],
        "submit_key": None,
        "array": None,
        "each": None,
        "environment": None,
    }
    job = msg.body["jobs"][0]
    assert type(job["cpus"]) is float
    assert type(job["cancel_grace"]) is float


def test_depspec_keeps_only_its_target_and_defaults_kind() -> None:
    body = {"jobs": [{"command": "a"}, {"command": "b", "depends_on": [{"local": 0}, {"job": 3}]}]}
    deps = decode(encode("submit", body), CLIENT_REQUESTS).body["jobs"][1]["depends_on"]
    assert deps == [{"kind": "after", "local": 0}, {"kind": "after", "job": 3}]


def test_defaults_are_not_shared_between_messages() -> None:
    data = encode("submit", {"jobs": [{"command": "a"}]})
    first = decode(data, CLIENT_REQUESTS).body["jobs"][0]
    first["tags"].append("x")
    first["env"]["A"] = "b"
    second = decode(data, CLIENT_REQUESTS).body["jobs"][0]
    assert second["tags"] == [] and second["env"] == {}


def test_worker_defaults() -> None:
    msg = decode(encode("result", {"job": 1, "token": 2, "outcome": "timeout"}), WORKER_TO_BROKER)
    assert msg.body == {
        "job": 1,
        "token": 2,
        "outcome": "timeout",
        "exit_code": None,
        "signal": None,
        "stdout_tail": b"",
        "stderr_tail": b"",
        "runtime": None,
        "then": [],
    }
    started = decode(encode("started", {"job": 1, "token": 2, "pid": 3}), WORKER_TO_BROKER)
    assert started.body["age"] == 0.0


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("started", {"job": 1, "token": 2, "pid": 3, "age": -0.5}),
        ("started", {"job": 1, "token": 2, "pid": 3, "age": math.inf}),
        ("result", {"job": 1, "token": 2, "outcome": "exited", "runtime": -1}),
        ("result", {"job": 1, "token": 2, "outcome": "exited", "runtime": "1"}),
    ],
)
def test_durations_are_finite_and_not_negative(kind: str, body: dict[str, Any]) -> None:
    refuse(frame(kind, body), WORKER_TO_BROKER)


def test_modify_set_carries_only_what_was_sent() -> None:
    msg = decode(encode("modify", {"job": 1, "set": {"priority": 3}}), CLIENT_REQUESTS)
    assert msg.body == {"job": 1, "set": {"priority": 3}, "hold": False, "release": False}


def test_encode_sends_the_body_as_given() -> None:
    data = encode("submit", {"jobs": [{"command": "a"}]})
    assert msgpack.unpackb(data) == [1, "submit", 0, {"jobs": [{"command": "a"}]}]


def test_pack_is_encode_without_the_check() -> None:
    body = {"jobs": [7, 8], "groups": {}}
    assert pack("submitted", body, 5) == encode("submitted", body, 5)
    assert decode(pack("submitted", body, 5), CLIENT_REPLIES).body["jobs"] == [7, 8]
    # Unchecked: a wrong body goes out, and the receiver's decode refuses it.
    assert refuse(pack("submitted", {"jobs": ["x"]}, 5), CLIENT_REPLIES).code == BAD_REQUEST


def test_names_used_both_ways_follow_allowed() -> None:
    client = decode(frame("drain", {"worker": "w1"}), CLIENT_REQUESTS)
    assert client.body == {"worker": "w1", "resume": False}
    worker = decode(frame("drain", {}), BROKER_TO_WORKER)
    assert worker.body == {"resume": False}
    assert refuse(frame("drain", {}), CLIENT_REQUESTS).reason == "worker: required field missing"
    assert decode(frame("heartbeat", {}), BROKER_TO_WORKER).body == {}
    err = refuse(frame("heartbeat", {}), WORKER_TO_BROKER)
    assert err.reason == "running: required field missing"
    # Without `allowed`, whichever direction's schema fits.
    assert decode(frame("cancel", {"job": 1, "token": 2})).body["reason"] == ""
    assert decode(frame("cancel", {"jobs": [1]})).body["reason"] is None


def test_custom_allowed_subset() -> None:
    only = frozenset({"claim", "result"})
    assert decode(frame("claim", {"max": 2}), only).body == {"max": 2, "ahead": None}
    err = refuse(frame("started", {"job": 1, "token": 1, "pid": 1}), only)
    assert err.reason == "type: 'started' is not accepted on this socket"


def test_str_enums_and_tuples_accepted_by_encode() -> None:
    class State(str, enum.Enum):
        RUNNING = "running"

    data = encode("status", {"state": State.RUNNING})
    assert decode(data, CLIENT_REQUESTS).body["state"] == "running"
    data = encode("heartbeat", {"running": [(1, 2, None, None)]}, allowed=WORKER_TO_BROKER)
    assert decode(data, WORKER_TO_BROKER).body["running"] == [[1, 2, None, None]]


def test_memoryview_and_bytearray_frames() -> None:
    data = encode("claim", {"max": 1})
    assert decode(bytearray(data), WORKER_TO_BROKER).body == {"max": 1, "ahead": None}
    assert decode(memoryview(data), WORKER_TO_BROKER).body == {"max": 1, "ahead": None}


def test_command_limit_counts_utf8_bytes() -> None:
    limit = defaults.MAX_COMMAND_BYTES
    fits = "é" * (limit // 2)  # two bytes each
    assert decode(frame("submit", {"jobs": [{"command": fits}]}), CLIENT_REQUESTS)
    err = refuse(frame("submit", {"jobs": [{"command": fits + "é"}]}), CLIENT_REQUESTS)
    assert err.reason == f"jobs[0].command: must be at most {limit} bytes of UTF-8, got {limit + 2}"


# --- refusals: each names the field path and the rule -----------------------------------------

REFUSALS = [
    # missing required
    ("missing", CLIENT_REQUESTS, "submit", {"jobs": [{}]}, "jobs[0].command: required"),
    ("missing-top", CLIENT_REQUESTS, "modify", {"set": {}}, "job: required field missing"),
    ("missing-w", WORKER_TO_BROKER, "claim", {}, "max: required field missing"),
    (
        "missing-in-row",
        BROKER_TO_WORKER,
        "assign",
        {"jobs": [{"job": 1}]},
        "jobs[0].token: required",
    ),
    # unknown field
    (
        "unknown",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "colour": 1}]},
        "jobs[0].colour: unknown field",
    ),
    ("unknown-top", CLIENT_REQUESTS, "ping", {"x": 1}, "x: unknown field"),
    (
        "unknown-before-missing",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"comand": "a"}]},
        "jobs[0].comand: unknown field",
    ),
    ("unknown-bytes-key", CLIENT_REQUESTS, "ping", {b"x": 1}, "[b'x']: unknown field"),
    (
        "modify-unlisted",
        CLIENT_REQUESTS,
        "modify",
        {"job": 1, "set": {"groups": ["g"]}},
        "set.groups: unknown field",
    ),
    # wrong type
    (
        "type",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": 5}]},
        "jobs[0].command: must be a str, got int",
    ),
    ("type-list", CLIENT_REQUESTS, "cancel", {"jobs": 5}, "jobs: must be an array, got int"),
    ("type-map", CLIENT_REQUESTS, "submit", {"jobs": [[]]}, "jobs[0]: must be a map, got array"),
    (
        "type-null",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "cpus": None}]},
        "jobs[0].cpus: must be a number, got null",
    ),
    (
        "type-or-null",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "cwd": 1}]},
        "jobs[0].cwd: must be a str or null, got int",
    ),
    (
        "bytes-for-str",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": b"ls"}]},
        "jobs[0].command: must be a str, got bytes",
    ),
    (
        "str-for-bytes",
        WORKER_TO_BROKER,
        "result",
        {"job": 1, "token": 1, "outcome": "timeout", "stdout_tail": "x"},
        "stdout_tail: must be bytes, got str",
    ),
    (
        "float-for-int",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "memory": 1.0}]},
        "jobs[0].memory: must be an int, got float",
    ),
    (
        "group-ref",
        CLIENT_REQUESTS,
        "close_group",
        {"group": 1.5},
        "group: must be a group name (str) or id (int), got float",
    ),
    (
        "env-key",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "env": {"A=B": "c"}}]},
        "jobs[0].env['A=B']: key must not contain '='",
    ),
    (
        "env-value",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "env": {"A": 1}}]},
        "jobs[0].env.A: must be a str, got int",
    ),
    (
        "nul",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a\0b"}]},
        "jobs[0].command: must not contain NUL",
    ),
    ("enum", CLIENT_REQUESTS, "status", {"state": "done"}, "state: must be one of"),
    (
        "row-arity",
        WORKER_TO_BROKER,
        "heartbeat",
        {"running": [[1, 2, None]]},
        "running[0]: must be an array of 4 items",
    ),
    (
        "row-cell",
        WORKER_TO_BROKER,
        "register",
        {"name": "w", "cpus": 1, "memory": 0, "gpus": 0, "pid": 1, "running": [[1, "t"]]},
        "running[0][1]: must be an int, got str",
    ),
    # bool is not an int (nor a number)
    (
        "bool-int",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "gpus": True}]},
        "jobs[0].gpus: must be an int, got bool",
    ),
    (
        "bool-num",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "cpus": True}]},
        "jobs[0].cpus: must be a number, got bool",
    ),
    (
        "bool-id",
        CLIENT_REQUESTS,
        "cancel",
        {"jobs": [1, False]},
        "jobs[1]: must be an int, got bool",
    ),
    ("int-bool", CLIENT_REQUESTS, "status", {"all": 1}, "all: must be a bool, got int"),
    # out of range
    (
        "range",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a"}] * 3 + [{"command": "b", "cpus": -1}]},
        "jobs[3].cpus: must be > 0, got -1",
    ),
    (
        "range-zero",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "cpus": 0}]},
        "jobs[0].cpus: must be > 0, got 0",
    ),
    (
        "range-high",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "max_attempts": 1001}]},
        "jobs[0].max_attempts: must be <= 1000, got 1001",
    ),
    (
        "range-priority",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "priority": 1 << 31}]},
        "jobs[0].priority: must be <= 2147483647",
    ),
    ("range-claim", WORKER_TO_BROKER, "claim", {"max": 1025}, "max: must be <= 1024, got 1025"),
    ("range-id", CLIENT_REQUESTS, "cancel", {"jobs": [0]}, "jobs[0]: must be >= 1, got 0"),
    (
        "range-uint64",
        CLIENT_REQUESTS,
        "cancel",
        {"jobs": [(1 << 64) - 1]},
        "jobs[0]: must be <= 9223372036854775807",
    ),
    ("range-events", CLIENT_REQUESTS, "events", {"limit": 10001}, "limit: must be <= 10000"),
    (
        "range-percent",
        WORKER_TO_BROKER,
        "progress",
        {"job": 1, "token": 1, "percent": 100.5},
        "percent: must be <= 100, got 100.5",
    ),
    (
        "nan",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "time_limit": float("nan")}]},
        "jobs[0].time_limit: must be a finite number, got nan",
    ),
    (
        "inf",
        WORKER_TO_BROKER,
        "heartbeat",
        {"running": [[1, 1, float("inf"), 0]]},
        "running[0][2]: must be a finite number, got inf",
    ),
    (
        "no-shares",
        CLIENT_REQUESTS,
        "set_user",
        {"name": "bob", "set": {"shares": 0}},
        "set.shares: must be > 0, got 0",
    ),
    (
        "not-a-setting",
        CLIENT_REQUESTS,
        "set_user",
        {"name": "bob", "set": {"cpus": 1}},
        "set.cpus: unknown field",
    ),
    (
        "neg-inf",
        CLIENT_REQUESTS,
        "wait",
        {"timeout": float("-inf")},
        "timeout: must be a finite number, got -inf",
    ),
    (
        "reply-inf",
        CLIENT_REPLIES,
        "stats",
        {"a": {"b": float("inf")}},
        "a.b: must be a finite number, got inf",
    ),
    # too long: strings, lists, maps
    (
        "long-name",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "name": "n" * 257}]},
        "jobs[0].name: must be at most 256 characters, got 257",
    ),
    (
        "long-reason",
        CLIENT_REQUESTS,
        "cancel",
        {"reason": "r" * 1025},
        "reason: must be at most 1024 characters, got 1025",
    ),
    (
        "long-tag",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "tags": ["t" * 65]}]},
        "jobs[0].tags[0]: must be at most 64 characters, got 65",
    ),
    (
        "empty-tag",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "tags": [""]}]},
        "jobs[0].tags[0]: must not be empty",
    ),
    (
        "empty-command",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": ""}]},
        "jobs[0].command: must not be empty",
    ),
    (
        "many-tags",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "tags": ["t"] * 65}]},
        "jobs[0].tags: must have at most 64 items, got 65",
    ),
    (
        "many-deps",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "depends_on": [{"job": 1}] * 1001}]},
        "jobs[0].depends_on: must have at most 1000 items, got 1001",
    ),
    (
        "many-env",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "env": {f"K{i}": "" for i in range(1001)}}]},
        "jobs[0].env: must have at most 1000 entries, got 1001",
    ),
    (
        "long-tail",
        WORKER_TO_BROKER,
        "result",
        {"job": 1, "token": 1, "outcome": "timeout", "stderr_tail": b"x" * 4097},
        "stderr_tail: must be at most 4096 bytes, got 4097",
    ),
    ("empty-assign", BROKER_TO_WORKER, "assign", {"jobs": []}, "jobs: must have at least 1 item"),
    (
        "free-depth",
        CLIENT_REPLIES,
        "job",
        {"job": {"a": [[[[[[[[1]]]]]]]]}},
        "job.a[0][0][0][0][0][0][0]: nested deeper than 8 levels",
    ),
    # DepSpec: exactly one target
    (
        "dep-none",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "depends_on": [{"kind": "after"}]}]},
        "jobs[0].depends_on[0]: must name exactly one of job, group or local, got none",
    ),
    (
        "dep-two",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a"}, {"command": "b", "depends_on": [{"job": 1, "local": 0}]}]},
        "jobs[1].depends_on[0]: must name exactly one of job, group or local, got job and local",
    ),
    (
        "dep-kind",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "depends_on": [{"kind": "before", "job": 1}]}]},
        "jobs[0].depends_on[0].kind: must be one of 'after', 'after_any', 'after_fail', "
        "got 'before'",
    ),
    (
        "dep-local-range",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a", "depends_on": [{"local": 1}]}]},
        "jobs[0].depends_on[0].local: must be < 1 (jobs in this submission), got 1",
    ),
    (
        "dep-local-self",
        CLIENT_REQUESTS,
        "submit",
        {"jobs": [{"command": "a"}, {"command": "b", "depends_on": [{"local": 1}]}]},
        "jobs[1].depends_on[0].local: must not name the job itself",
    ),
    (
        "dep-local-modify",
        CLIENT_REQUESTS,
        "modify",
        {"job": 1, "set": {"depends_on": [{"local": 0}]}},
        "set.depends_on[0].local: only valid in submit",
    ),
    # other cross-field rules
    (
        "dup-group",
        CLIENT_REQUESTS,
        "submit",
        {"groups": [{"name": "g"}, {"name": "g"}]},
        "groups[1].name: duplicate of groups[0].name",
    ),
    (
        "hold-release",
        CLIENT_REQUESTS,
        "modify",
        {"job": 1, "hold": True, "release": True},
        "release: hold and release cannot both be true",
    ),
    (
        "exited-bare",
        WORKER_TO_BROKER,
        "result",
        {"job": 1, "token": 1, "outcome": "exited"},
        "exit_code: an 'exited' result needs exit_code or signal",
    ),
    # the body itself
    ("body-not-map", CLIENT_REQUESTS, "ping", [], "body: must be a map, got array"),
    ("body-null", CLIENT_REQUESTS, "ping", None, "body: must be a map, got null"),
]


@pytest.mark.parametrize(
    ("allowed", "mtype", "body", "reason"),
    [pytest.param(a, t, b, r, id=name) for name, a, t, b, r in REFUSALS],
)
def test_refusal_names_path_and_rule(
    allowed: frozenset[str], mtype: str, body: Any, reason: str
) -> None:
    err = refuse(frame(mtype, body, req=99), allowed)
    assert err.code == "bad_request"
    assert err.reason.startswith(reason), err.reason
    # The envelope was fine, so the server can answer and echo req.
    assert (err.type, err.req) == (mtype, 99)
    # The sending side refuses the same body before it reaches the wire.
    with pytest.raises(ProtocolError) as sent:
        encode(mtype, body, 99, allowed=allowed)
    assert sent.value.reason == err.reason


def test_too_many_jobs_and_groups() -> None:
    jobs = [{"command": "a"}] * (defaults.MAX_JOBS_PER_SUBMIT + 1)
    err = refuse(frame("submit", {"jobs": jobs}), CLIENT_REQUESTS)
    assert (
        err.reason
        == f"jobs: must have at most {defaults.MAX_JOBS_PER_SUBMIT} items, got {len(jobs)}"
    )
    groups = [{"name": "g"}] * (defaults.MAX_GROUPS_PER_SUBMIT + 1)
    err = refuse(frame("submit", {"groups": groups}), CLIENT_REQUESTS)
    assert err.reason.startswith("groups: must have at most 10000 items")


# --- envelope ----------------------------------------------------------------------------------


def test_wrong_version_is_unsupported_and_still_routable() -> None:
    err = refuse(frame("ping", {}, req=5, version=2), CLIENT_REQUESTS)
    assert err.code == "unsupported_version"
    assert err.reason.startswith("version: 2 is not supported")
    assert (err.type, err.req) == ("ping", 5)
    # A newer peer may change more than the version; arity does not matter then.
    err = refuse(msgpack.packb([2, "ping", 6, {}, "extra"]), CLIENT_REQUESTS)
    assert (err.code, err.req) == ("unsupported_version", 6)
    assert refuse(frame("ping", {}, version=0)).code == "unsupported_version"


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_non_int_version_is_a_bad_request(version: Any) -> None:
    err = refuse(frame("ping", {}, req=5, version=version))
    assert err.code == "bad_request"
    assert err.reason.startswith("version: must be an int")
    assert err.req == 5


@pytest.mark.parametrize(
    ("envelope", "reason", "req"),
    [
        ([1, "ping", 3], "envelope: must have 4 items [version, type, req, body], got 3", 3),
        (
            [1, "ping", 3, {}, {}],
            "envelope: must have 4 items [version, type, req, body], got 5",
            3,
        ),
        ([1], "envelope: must have 4 items", None),
        ([], "envelope: must be an array [version, type, req, body], got an empty array", None),
        ({"version": 1}, "envelope: must be an array [version, type, req, body], got map", None),
        ("ping", "envelope: must be an array", None),
        (5, "envelope: must be an array", None),
    ],
)
def test_wrong_arity(envelope: Any, reason: str, req: int | None) -> None:
    err = refuse(msgpack.packb(envelope))
    assert err.code == "bad_request"
    assert err.reason.startswith(reason), err.reason
    assert err.req == req


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (-1, "req: must be in 0..9223372036854775807, got -1"),
        (1 << 63, "req: must be in 0..9223372036854775807, got 9223372036854775808"),
        ((1 << 64) - 1, "req: must be in 0..9223372036854775807"),
        (True, "req: must be an int, got bool"),
        ("7", "req: must be an int, got str"),
        (None, "req: must be an int, got null"),
        (1.0, "req: must be an int, got float"),
    ],
)
def test_bad_req_cannot_be_echoed(req: Any, reason: str) -> None:
    err = refuse(frame("ping", {}, req=req), CLIENT_REQUESTS)
    assert err.reason.startswith(reason)
    assert err.req is None
    assert err.type == "ping"


def test_unknown_or_misplaced_type() -> None:
    err = refuse(frame("launch", {}, req=4), CLIENT_REQUESTS)
    assert (err.reason, err.req, err.type) == ("type: unknown message type 'launch'", 4, None)
    err = refuse(frame(b"ping", {}, req=4), CLIENT_REQUESTS)
    assert err.reason == "type: must be a str, got bytes"
    err = refuse(frame("claim", {"max": 1}, req=4), CLIENT_REQUESTS)
    assert err.reason == "type: 'claim' is not accepted on this socket"
    assert (err.type, err.req) == ("claim", 4)
    err = refuse(frame("submitted", {"jobs": [], "groups": {}}), WORKER_TO_BROKER)
    assert err.reason == "type: 'submitted' is not accepted on this socket"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "frame: not a valid msgpack message"),
        (b"\xc1", "frame: not a valid msgpack message"),  # the one never-used byte
        (b"hello world", "frame: not a valid msgpack message"),  # positive fixints + extra data
        (b"\x94\x01\xa4ping\x07", "frame: not a valid msgpack message"),  # truncated
        (msgpack.packb([1, "ping", 1, {}]) + b"\x00", "frame: not a valid msgpack message"),
        (b"\x94\x01\xa4ping\x07\x81\x01\x02", "frame: not a valid msgpack message"),  # int key
        (b"\x94\x01\xa2\xff\xfe\x07\x80", "frame: not a valid msgpack message"),  # bad UTF-8
        (b"\x94\x01\xa4ping\x07\xd4\x05\x00", "frame: not a valid msgpack message"),  # ext type
        (b"\x91" * 5000 + b"\xc0", "frame: not a valid msgpack message (StackError"),
        (b"\xdd\xff\xff\xff\xff", "frame: not a valid msgpack message"),  # claims 4G items
    ],
)
def test_not_msgpack(data: bytes, reason: str) -> None:
    err = refuse(data, CLIENT_REQUESTS)
    assert err.code == "bad_request"
    assert err.reason.startswith(reason), err.reason
    assert err.req is None


def test_timestamp_ext_is_refused_where_a_value_is_expected() -> None:
    ts = msgpack.Timestamp(1, 0)
    err = refuse(frame("wait", {"timeout": ts}), CLIENT_REQUESTS)
    assert err.reason == "timeout: must be a number or null, got Timestamp"
    err = refuse(frame("stats", {"at": ts}), CLIENT_REPLIES)
    assert err.reason == "at: must be plain data, got Timestamp"


@pytest.mark.parametrize("data", ["a str", None, 5, ["list"]])
def test_non_bytes_frame(data: Any) -> None:
    assert refuse(data).reason.startswith("frame: must be bytes")


def test_oversized_frame_refused_before_unpacking() -> None:
    data = b"\xc1" * (defaults.MAX_MESSAGE_BYTES + 1)
    err = refuse(data, CLIENT_REQUESTS)
    assert err.reason == (
        f"frame: {len(data)} bytes is over the {defaults.MAX_MESSAGE_BYTES} limit"
    )


def test_deep_nesting_inside_the_limit_is_refused_by_the_schema() -> None:
    deep: Any = 1
    for _ in range(1000):
        deep = [deep]
    err = refuse(frame("cancel", {"jobs": deep}), CLIENT_REQUESTS)
    assert err.reason == "jobs[0]: must be an int, got array"
    err = refuse(frame("stats", {"x": deep}), CLIENT_REPLIES)
    assert "nested deeper than 8 levels" in err.reason


# --- encode ------------------------------------------------------------------------------------


def test_encode_refusals() -> None:
    with pytest.raises(ProtocolError) as info:
        encode("launch", {})
    assert info.value.reason == "type: unknown message type 'launch'"
    with pytest.raises(ProtocolError) as info:
        encode("ping", {}, -1)
    assert info.value.reason.startswith("req: must be an int in 0..")
    with pytest.raises(ProtocolError) as info:
        encode("ping", {}, True)
    assert info.value.reason.startswith("req: must be an int")
    with pytest.raises(ProtocolError) as info:
        encode("claim", {"max": 1}, allowed=CLIENT_REQUESTS)
    assert info.value.reason == "type: 'claim' is not accepted on this socket"
    with pytest.raises(ProtocolError) as info:
        encode("submit", {"jobs": [{"command": "\ud800"}]})  # a lone surrogate: not UTF-8
    assert info.value.reason == "jobs[0].command: not UTF-8 text (a surrogate at character 0)"
    with pytest.raises(ProtocolError) as info:
        encode("stats", {"when": object()}, allowed=CLIENT_REPLIES)
    assert info.value.reason == "when: must be plain data, got object"
    with pytest.raises(ProtocolError) as info:
        encode("cancel", {"jobs": [10**5000]}, allowed=CLIENT_REQUESTS)
    assert info.value.reason == "jobs[0]: must be <= 9223372036854775807, got an int of 16610 bits"


def test_protocol_error_shape() -> None:
    err = ProtocolError("bad_request", "x: required field missing", type="ping", req=3)
    assert str(err) == "bad_request: x: required field missing"
    assert (err.code, err.reason, err.type, err.req) == (
        "bad_request",
        "x: required field missing",
        "ping",
        3,
    )
    plain = ProtocolError("bad_request", "frame: nope")
    assert plain.type is None and plain.req is None
    assert p.PROTOCOL_VERSION == defaults.PROTOCOL_VERSION == 1


# --- fuzzing: only ProtocolError ever escapes decode --------------------------------------------

TYPE_NAMES = sorted(CLIENT_REQUESTS | CLIENT_REPLIES | WORKER_TO_BROKER | BROKER_TO_WORKER)
SOCKETS = [None, *DIRECTIONS.values(), frozenset({"submit", "claim"})]

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.sampled_from(["command", "jobs", "job", "token", "local", "kind", "after", "running"]),
)
keys = st.one_of(
    st.text(max_size=10),
    st.binary(max_size=5),
    st.sampled_from(
        [
            "command",
            "jobs",
            "groups",
            "job",
            "token",
            "depends_on",
            "local",
            "env",
            "max",
            "running",
        ]
    ),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(keys, inner, max_size=5),
    ),
    max_leaves=25,
)


def deeply(value: Any, depth: int, as_map: bool) -> Any:
    for _ in range(depth):
        value = {"jobs": value} if as_map else [value]
    return value


def must_only_raise_protocol_error(data: Any, allowed: frozenset[str] | None) -> None:
    try:
        msg = decode(data, allowed)
    except ProtocolError as e:
        assert e.code in ("bad_request", "unsupported_version")
        assert isinstance(e.reason, str) and e.reason
    else:
        assert isinstance(msg, Message)
        assert isinstance(msg.body, dict)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(SOCKETS))
def test_fuzz_arbitrary_bytes(data: bytes, allowed: frozenset[str] | None) -> None:
    must_only_raise_protocol_error(data, allowed)


@FUZZ
@given(
    st.one_of(st.just(1), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1), leaves),
    st.one_of(st.sampled_from(TYPE_NAMES), leaves),
    st.one_of(st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1), leaves),
    values,
    st.sampled_from(SOCKETS),
)
def test_fuzz_arbitrary_envelopes(
    version: Any, mtype: Any, req: Any, body: Any, allowed: frozenset[str] | None
) -> None:
    must_only_raise_protocol_error(frame(mtype, body, req=req, version=version), allowed)


@FUZZ
@given(st.sampled_from(ALL_EXAMPLES), st.data())
def test_fuzz_mutated_valid_bodies(example: Any, data: st.DataObject) -> None:
    direction, mtype, body = example.values
    body = copy.deepcopy(body)
    # Swap one value somewhere in the body for arbitrary data, or add a key.
    target: Any = body
    path = data.draw(st.lists(st.integers(min_value=0, max_value=10), max_size=4))
    for step in path:
        children = list(target.values()) if isinstance(target, dict) else target
        containers = [c for c in children if isinstance(c, (dict, list)) and c]
        if not isinstance(target, (dict, list)) or not containers:
            break
        target = containers[step % len(containers)]
    replacement = data.draw(values)
    if isinstance(target, dict) and target:
        key = data.draw(st.sampled_from([*target, "extra"]))
        target[key] = replacement
    elif isinstance(target, list) and target:
        target[data.draw(st.integers(0, len(target) - 1))] = replacement
    data_bytes = frame(mtype, body)
    for allowed in (DIRECTIONS[direction], None):
        must_only_raise_protocol_error(data_bytes, allowed)
    # encode must refuse with ProtocolError too, never with a packing or type error.
    with contextlib.suppress(ProtocolError):
        encode(mtype, body, allowed=DIRECTIONS[direction])


@FUZZ
@given(
    st.integers(min_value=1, max_value=1100),
    st.booleans(),
    st.sampled_from(["submit", "stats", "job", "cancel", "heartbeat"]),
    st.sampled_from(SOCKETS),
)
def test_fuzz_deep_nesting(
    depth: int, as_map: bool, mtype: str, allowed: frozenset[str] | None
) -> None:
    body = deeply(1, min(depth, 500), as_map)  # msgpack.packb itself stops at 512 levels
    body = body if isinstance(body, dict) else {"jobs": body}
    must_only_raise_protocol_error(frame(mtype, body), allowed)
    # Deeper than msgpack can pack, built by hand: fixmap {"jobs": ...} or fixarray [...]
    prefix = b"\x94\x01" + msgpack.packb(mtype) + b"\x00"
    cell = b"\x81\xa4jobs" if as_map else b"\x91"
    must_only_raise_protocol_error(prefix + cell * depth + b"\x01", allowed)


# ---- the JobSpec fast path --------------------------------------------------------------------

_SPECS: list[Any] = [
    {"command": "true"},
    {"command": "true", "cwd": "/w", "env": {"I": "1"}, "tags": ["a"], "cpus": 2},
    {"command": "x", "name": "n", "hold": True, "groups": ["g"], "depends_on": [{"local": 1}]},
    {"command": "true", "cpus": True},  # a bool is not a number
    {"command": "true", "cpus": -1, "memory": "lots"},  # two faults: the first field's is told
    {"memory": "lots", "command": "true", "cpus": -1},  # whatever order they came in
    {"command": "true", "bogus": 1, "cpus": -1},
    {"cpus": 1},  # no command
    {"comand": "true"},  # misspelt: "unknown" explains it best
    {"command": "true", "env": {"A=B": "1"}},
    {"command": "true", "env": {"A": "x\0y"}},
    {"command": "true", "env": {1: "x"}},
    {"command": "true", "env": ["A"]},
    {"command": "true", "tags": "ssd"},
    {"command": ""},
    "not a map",
    None,
]


@pytest.mark.parametrize("raw", _SPECS)
def test_job_spec_fast_path_answers_as_the_full_check(raw: Any) -> None:
    full = p._straight(p._JOB_FIELDS, None)

    def outcome(check: Any) -> Any:
        try:
            out = check(raw)
        except p._Bad as e:
            return ("refused", p._reason(e))
        return ("ok", list(out.items()))

    assert outcome(p._JOB_SPEC) == outcome(full)


def test_job_spec_fast_path_never_shares_defaults() -> None:
    a, b = (p._JOB_SPEC({"command": "true"}) for _ in range(2))
    for name in ("env", "tags", "depends_on", "groups"):
        assert a[name] == b[name] and a[name] is not b[name]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"A": "1", "B": ""},
        {"A=B": "1"},
        {"": "1"},
        {"A": "x\0"},
        {"A\0": "x"},
        {1: "x"},
        {"A": 1},
        {"A": True},
        ["A"],
        None,
        {f"K{i}": "v" for i in range(defaults.MAX_ENV_ENTRIES + 1)},
        {"A" * (defaults.MAX_NAME + 1): "v"},
    ],
)
def test_env_fast_path_answers_as_the_map_check(env: Any) -> None:
    def outcome(check: Any) -> Any:
        try:
            return ("ok", check(env))
        except p._Bad as e:
            return ("refused", p._reason(e))

    assert outcome(p._env) == outcome(p._ENV_MAP)


def test_an_array_stays_a_template_and_makes_its_jobs_a_slice_at_a_time() -> None:
    template = {"command": "echo {}", "name": "part-{}", "env": {"A": "1"}}
    body = decode(encode("submit", {"jobs": [template], "array": "1-3,7"}), CLIENT_REQUESTS).body
    assert len(body["jobs"]) == 1 and body["array"] == "1-3,7"
    source = Source.of(body)
    made = [{k: j[k] for k in ("command", "name", "env")} for j in source.specs(1, 3)]
    assert made == [
        {"command": f"echo {i}", "name": f"part-{i}", "env": {"A": "1", INDEX: i}}
        for i in ("2", "3")
    ]
    jobs = source.specs(0, source.count)
    assert [j["command"] for j in jobs] == ["echo 1", "echo 2", "echo 3", "echo 7"]
    assert [j["name"] for j in jobs] == ["part-1", "part-2", "part-3", "part-7"]
    assert jobs[3]["env"] == {"A": "1", "BANYAN_ARRAY_INDEX": "7"}
    assert jobs[0]["cpus"] == 1.0  # the template's defaults, in every job
    jobs[0]["env"]["B"] = "x"
    assert "B" not in jobs[1]["env"]  # no map is shared between jobs


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        ({"jobs": [{"command": "a"}, {"command": "b"}], "array": "1-2"}, "array", "exactly one"),
        ({"jobs": [], "array": "1-2"}, "array", "exactly one"),
        ({"jobs": [{"command": "a"}], "array": "5-2"}, "array", "backwards"),
        ({"jobs": [{"command": "a"}], "array": "x"}, "array", "N-M"),
        (
            {"jobs": [{"command": "a"}], "array": "0-1000000"},
            "array",
            "1000001 jobs, over the 200000 one submission may hold (MAX_JOBS_PER_SUBMIT)",
        ),
        (  # more indices than len() of a range can count
            {"jobs": [{"command": "a"}], "array": "0-9223372036854775807"},
            "array",
            "9223372036854775808 jobs, over the 200000 one submission may hold",
        ),
        (
            {"jobs": [{"command": "a"}], "array": "0-9223372036854775807:1,5"},
            "array",
            "9223372036854775809 jobs, over the 200000",
        ),
        (
            {"jobs": [{"command": "a", "name": "n" * 252 + "{}"}], "array": "100000-100001"},
            "jobs[0].name",
            "",
        ),
    ],
)
def test_a_bad_array_is_refused_whole(body: dict[str, Any], where: str, says: str) -> None:
    reason = refuse(frame("submit", body), CLIENT_REQUESTS).reason
    assert reason.startswith(where + ": ") and says in reason, reason


# ---- bounded requests: sizes are checked before anything is built -----------------------------


def test_an_array_too_big_in_bytes_is_refused_before_it_is_expanded() -> None:
    """A 64 KiB command with `{}` over 4,000 indices is 256 MiB of job text: refused from the
    template and the range alone, on both ends, naming the limit."""
    template = {"command": "x" * (defaults.MAX_COMMAND_BYTES - 2) + "{}"}
    body = {"jobs": [template], "array": "0-3999"}
    err = refuse(frame("submit", body), CLIENT_REQUESTS)
    assert err.reason.startswith("array: the array makes 262"), err.reason
    assert "MAX_SUBMIT_BYTES" in err.reason and str(defaults.MAX_SUBMIT_BYTES) in err.reason
    with pytest.raises(ProtocolError):
        encode("submit", body, 1)
    # Just under the limit is taken: 1,000 such jobs are 64,000 KiB.
    template = {"command": "x" * (defaults.MAX_COMMAND_BYTES - 4) + "{}"}
    fits = decode(frame("submit", {"jobs": [template], "array": "0-999"}), CLIENT_REQUESTS)
    assert Source.of(fits.body).count == 1000


def test_a_frame_of_many_small_containers_is_refused_while_unpacking() -> None:
    """Lists nested within the per-list limit still add up: the count stops them."""
    limit = defaults.MAX_REQUEST_CONTAINERS
    per = defaults.MAX_JOBS_PER_SUBMIT
    data = frame("submit", {"jobs": [[{}] * per] * (limit // per + 1)})
    err = refuse(data, CLIENT_REQUESTS)
    assert err.reason == (
        f"frame: over {limit} maps and lists in one request (MAX_REQUEST_CONTAINERS)"
    )
    # One list past twice any request's longest is refused by msgpack before it is built.
    err = refuse(frame("cancel", {"jobs": [{}] * (2 * per + 1)}), CLIENT_REQUESTS)
    assert err.reason == (
        f"frame: {2 * per + 1} exceeds max_array_len({2 * per}): a request's lists hold at most "
        f"{2 * per} items and its maps {2 * defaults.MAX_ENV_ENTRIES} entries"
    )
    # Replies are not requests: a client may read a long list back.
    reply = frame("cancelled", {"cancelled": [1] * (2 * per + 1), "pending": [], "already": []})
    assert len(decode(reply, CLIENT_REPLIES).body["cancelled"]) == 2 * per + 1


@pytest.mark.parametrize(
    "items",
    [
        ["a", "b c", "é'x"],
        [],
        ["a", 1],
        ["a\0"],
        [""],
        "x",
        None,
        ["x" * (defaults.MAX_COMMAND_BYTES + 1)],
        [["nested"]],
    ],
)
def test_each_fast_path_answers_as_the_list_check(items: Any) -> None:
    def outcome(check: Any) -> Any:
        try:
            return ("ok", check(items))
        except p._Bad as e:
            return ("refused", p._reason(e))

    assert outcome(p._each) == outcome(p._EACH_ITEMS)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"jobs": [{"command": "a"}, {"command": "b"}], "each": ["x"]}, "each: needs exactly one"),
        ({"jobs": [{"command": "a"}], "each": ["x"], "array": "1-2"}, "each: an array and each"),
        (
            {"jobs": [{"command": "x" * 65530 + " {}"}], "each": ["ok", "toolong"]},
            "jobs[1].command: must be at most 65536 bytes of UTF-8, got 65538",
        ),
        (
            {"jobs": [{"command": "run", "name": "n-{}"}], "each": ["a", "b" * 300]},
            "jobs[1].name: must be at most 256 characters, got 302",
        ),
        (
            {"jobs": [{"command": "x" * 60000}], "each": ["a"] * 1200},
            "MAX_SUBMIT_BYTES",
        ),
    ],
)
def test_each_lines_are_checked_as_the_jobs_they_make(body: dict[str, Any], says: str) -> None:
    reason = refuse(frame("submit", body), CLIENT_REQUESTS).reason
    assert says in reason, reason


def test_each_lines_make_jobs_as_the_command_line_did() -> None:
    """Without `{}` the line is appended as one quoted argument, with it every `{}` becomes
    the line; the template's other fields go to every job."""
    template = {"command": "convert", "cwd": "/d", "env": {"A": "1"}}
    body = decode(encode("submit", {"jobs": [template], "each": ["a b", "c"]}), CLIENT_REQUESTS)
    made = Source.of(body.body).specs(0, 2)
    assert [j["command"] for j in made] == ["convert 'a b'", "convert c"]
    assert all(j["cwd"] == "/d" and j["env"] == {"A": "1"} for j in made)
    template = {"command": "run {} --out {}.txt", "name": "r-{}"}
    body = decode(encode("submit", {"jobs": [template], "each": ["x"]}), CLIENT_REQUESTS)
    (job,) = Source.of(body.body).specs(0, 1)
    assert (job["command"], job["name"]) == ("run x --out x.txt", "r-x")
