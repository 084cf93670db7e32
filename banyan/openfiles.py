"""How many connections a daemon can hold: each one is a file descriptor, and the soft limit
most systems start a process with (1,024) is a few hundred idle connections away. The hard
limit is what an unprivileged process may raise it to; a systemd unit sets both
(`LimitNOFILE=`)."""

from __future__ import annotations

import resource

# Below this the daemon says so when it starts: a site with many workers or tools needs more.
ADVISED = 8192


def raise_to_hard() -> int:
    """Raise this process's soft limit on open files to its hard limit; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
