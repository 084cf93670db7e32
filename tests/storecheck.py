"""Whole-store consistency: every index and count equals what the records imply."""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any

import msgpack

from banyan.broker.records import Group, Job, JobState
from banyan.broker.store import Store

_PAIR = struct.Struct(">QQ")


def assert_consistent(store: Store) -> dict[int, Job]:
    """Check every table against the job and group records; returns the jobs."""
    tables: dict[str, list[Any]] = dict(msgpack.unpackb(store.dump(), strict_map_key=False))
    jobs = {j.id: j for j in (Job.unpack(msgpack.unpackb(v)) for _, v in tables["jobs"])}
    groups = {g.id: g for g in (Group.unpack(msgpack.unpackb(v)) for _, v in tables["groups"])}
    with store.read() as tx:
        by_state = {s.value: list(tx.jobs_in_state(s.value)) for s in JobState}
        assert sorted(j for ids in by_state.values() for j in ids) == sorted(jobs)
        for state, ids in by_state.items():
            assert all(jobs[j].state == state for j in ids)
            assert tx.state_counts()[state] == len(ids)
        assert {j for j, _ in tx.eligible()} == {j.id for j in jobs.values() if j.eligible}
        owners = {j.owner for j in jobs.values()}
        for owner in owners:
            mine = Counter(j.state for j in jobs.values() if j.owner == owner)
            assert tx.tally(owner).counts == dict(mine), owner
        for tally in tx.tallies():
            assert tally.owner in owners or not tally.counts, tally
        for key, _ in tables["attempts"]:
            assert struct.unpack_from(">Q", key)[0] in jobs, "an attempt of a deleted job"
        for key, _ in tables["edges"]:
            target, dependent = _PAIR.unpack_from(key, 1)
            assert dependent in jobs, "an edge from a deleted job"
            assert target in (jobs if key[:1] == b"j" else groups), "an edge to a deleted target"
        members = {g: set(tx.group_members(g)) for g in groups}
        for group in groups.values():
            assert tx.group_by_name(group.name) == group
            for member in members[group.id]:
                assert group.id in jobs[member].groups
        for job in jobs.values():
            for group_id in job.groups:
                assert group_id in groups and job.id in members[group_id]
        # An exported environment is kept exactly while jobs name it, and counts them.
        named = Counter(j.environ for j in jobs.values() if j.environ is not None)
        for key, raw in tables["environments"]:
            uses, _ = msgpack.unpackb(raw)
            assert named.pop(key.decode(), 0) == uses, f"environment {key!r} counts {uses}"
        assert not named, f"jobs name environments not stored: {named}"
    return jobs
