"""Real, separate network stacks for a broker and its workers: Linux network namespaces joined
by veth pairs, so a partition is a link going down rather than a process being paused.

    root ns  10.77.0.2 ──veth── 10.77.0.1  broker ns  10.77.{i}.1 ──veth── 10.77.{i}.2  worker i

The test talks to the broker over the first link; worker i reaches it over link i. The names
carry this process's pid, and `close()` deletes everything, even after a failed setup.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
SUBNET = "10.77"


class NetnsUnavailable(Exception):
    """Namespaces cannot be made here (no root, no iproute2, a restricted container)."""


def _ip(*args: str) -> None:
    try:
        done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    except OSError as e:  # no iproute2 here
        raise NetnsUnavailable(f"cannot run {IP}: {e}") from None
    if done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class Network:
    def __init__(self, workers: list[str]) -> None:
        tag = str(os.getpid())
        self.broker = f"bny{tag}b"
        self.workers = {name: f"bny{tag}w{i}" for i, name in enumerate(workers, 1)}
        self.links = {name: f"bw{i}" for i, name in enumerate(workers, 1)}  # in the broker ns
        self.root_link = f"bny{tag}r"
        self._made: list[str] = []

    # where things are -------------------------------------------------------------------------

    broker_for_clients = f"{SUBNET}.0.1"

    def broker_for(self, worker: str) -> str:
        return f"{SUBNET}.{list(self.workers).index(worker) + 1}.1"

    def prefix(self, ns: str) -> list[str]:
        return [IP, "netns", "exec", ns]

    # setting up and tearing down ---------------------------------------------------------------

    def open(self) -> None:
        """Make the namespaces and links; NetnsUnavailable says why it could not."""
        try:
            self._add(self.broker)
            _ip(
                "link",
                "add",
                self.root_link,
                "type",
                "veth",
                "peer",
                "name",
                "c0",
                "netns",
                self.broker,
            )
            self._made.append(f"link:{self.root_link}")
            _ip("addr", "add", f"{SUBNET}.0.2/24", "dev", self.root_link)
            _ip("link", "set", self.root_link, "up")
            self._up(self.broker, "c0", f"{SUBNET}.0.1/24")
            for i, (name, ns) in enumerate(self.workers.items(), 1):
                self._add(ns)
                link = self.links[name]
                _ip(
                    "-n",
                    self.broker,
                    "link",
                    "add",
                    link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                self._up(self.broker, link, f"{SUBNET}.{i}.1/24")
                self._up(ns, "eth0", f"{SUBNET}.{i}.2/24")
        except BaseException:
            self.close()
            raise

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def _up(ns: str, dev: str, addr: str) -> None:
        _ip("-n", ns, "addr", "add", addr, "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")

    def cut(self, worker: str) -> None:
        """Take the worker's link down: its packets go nowhere, in both directions."""
        _ip("-n", self.broker, "link", "set", self.links[worker], "down")

    def restore(self, worker: str) -> None:
        _ip("-n", self.broker, "link", "set", self.links[worker], "up")

    def close(self) -> None:
        """Delete every namespace (their veths go with them) and the root-side link."""
        for made in reversed(self._made):
            with contextlib.suppress(NetnsUnavailable):
                if made.startswith("link:"):
                    _ip("link", "del", made[5:])
                else:
                    _ip("netns", "del", made)
        self._made.clear()
