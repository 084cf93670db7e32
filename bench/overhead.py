"""W3 overhead: 200 x `sleep 0.05` on 2 slots, against the ideal 5.0 s and `xargs -P2`.

One worker offers 2 cpus; the jobs go in one submit and the clock stops when `wait` returns.
The ideal is jobs x 0.05 s / 2 slots; `xargs -P2 -n1 sh -c` runs the same commands in the same
run, so the share of the overhead that is the machine's, not Banyan's, shows too. Celery +
Redis and HyperQueue, where `make bench-peers-setup` made them ready, run the same jobs on 2
slots in every round (bench/peers/harness.py); Celery's overhead is the target.

    python bench/overhead.py            # 200 jobs, 3 rounds
    python bench/overhead.py --quick    # 40 jobs
    python bench/overhead.py --peers none
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.common import Figure, Report, cluster, median, parser, repeated, workdir
from bench.peers import harness
from bench.throughput import through_banyan, xargs

SLEEP = 0.05
SLOTS = 2
TARGETS = ("celery",)  # Banyan's overhead over the ideal at most each one's, in the same rounds


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="jobs per run (default 200; --quick 40)")
    harness.add_argument(p)
    args = p.parse_args()
    n = args.jobs or (40 if args.quick else 200)
    ideal = n * SLEEP / SLOTS
    command = f"sleep {SLEEP}"
    report = Report("overhead", args.quick, args.repeat, {"jobs": n, "slots": SLOTS})
    with (
        workdir(args.keep, "w3") as root,
        cluster(root) as c,
        harness.started(args.peers, root / "peers", report) as peers,
    ):
        c.start_broker()
        c.start_worker("w1", cpus=SLOTS)
        with c.client() as client:
            through_banyan(client, 10, command)  # warm up
            if args.profile:
                c.profile("broker", args.profile / "w3-broker.txt")
                c.profile("w1", args.profile / "w3-worker.txt")

            def peer(other: harness.Peer) -> Callable[[], float]:
                return lambda: other.batch(n, command)

            def run(i: int) -> dict[str, float]:
                steps = {
                    "xargs_s": lambda: xargs(n, command, SLOTS),
                    "banyan_s": lambda: through_banyan(client, n, command),
                }
                steps.update({other.name: peer(other) for other in peers})
                return harness.round_robin(i, steps)

            report.runs = repeated(args.repeat, run)
            c.stop_profilers()
    wall = median([r["banyan_s"] for r in report.runs])
    ref = median([r["xargs_s"] for r in report.runs])
    over = wall / ideal - 1
    report.add(
        Figure("W3 wall time", wall, "s", "ideal", ideal, wall / ideal),
        Figure("W3 xargs -P2 wall time", ref, "s", "ideal", ideal, ref / ideal),
        Figure(
            "W3 overhead over ideal",
            100 * over,
            "%",
            "xargs over ideal (%)",
            100 * (ref / ideal - 1),
        ),
    )
    overheads = {}
    for other in peers:
        peer_wall = median([r[other.name] for r in report.runs])
        overheads[other.name] = 100 * (peer_wall / ideal - 1)
        report.add(
            Figure(
                f"W3 wall time, {other.label}", peer_wall, "s", "ideal", ideal, peer_wall / ideal
            ),
            Figure(
                f"W3 overhead over ideal, {other.label}",
                overheads[other.name],
                "%",
                "xargs over ideal (%)",
                100 * (ref / ideal - 1),
            ),
        )
    for other in peers:  # the targets; the ratio is of wall times, round by round
        target = other.name in TARGETS
        report.add(
            Figure(
                f"W3 overhead vs {other.label}",
                100 * over,
                "%",
                f"{other.label} (%)",
                overheads[other.name],
                median([r["banyan_s"] / r[other.name] for r in report.runs]),
                f"<= {other.label}'s" if target else "",
                100 * over <= overheads[other.name] if target else None,
            )
        )
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
