"""banyan-worker: run jobs from a broker on this machine.

Usage:
  banyan-worker [options] [--tag T]...

Options:
  --broker HOST[:PORT]  The broker's worker socket (default: $BANYAN_BROKER, port 7412).
  --name NAME           Worker name (default: this host's name).
  --cpus N              CPUs to offer (default: all logical CPUs).
  --memory MB           Memory in MiB to offer (default: all physical memory).
  --gpus N              GPUs to offer (default: CUDA_VISIBLE_DEVICES or nvidia-smi).
  --tag T               A label jobs can ask for; repeat for more.
  --spool DIR           Where job output goes (default: /var/spool/banyan/NAME as root,
                        else $BANYAN_HOME/spool/NAME).
  --spool-retention T   Delete a job's output in the spool this long after it last
                        changed (2d, 12h) [default: 7d].
  --spool-min-free SIZE  When the spool's disk has less free, delete the oldest output
                        of ended jobs first (512M, 10G) [default: 1G].
  --run-any-owner       Not root: run every user's jobs, as this account (one trusted user
                        running a private cluster). Without it, only this account's jobs.
  --allow-root-jobs     Root: also run jobs whose owner's account is root, as root.
  --log-level LEVEL     debug, info, warning or error [default: info].
  -h --help             Show this help.

Started as root, the worker runs each job as its owner's Unix account (the account the
owner's key is bound to), never as root unless --allow-root-jobs is given. Started as another
user, it runs only that user's jobs, as that user, unless --run-any-owner is given.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from docopt import DocoptExit, docopt

from banyan import defaults
from banyan.cli import EXIT_USAGE, daemon_logging
from banyan.cli.output import UsageError, parse_memory, positive_duration
from banyan.config import address, home
from banyan.keys import KeyExposed, peer
from banyan.worker import resources
from banyan.worker.daemon import WorkerConfig, WorkerDaemon
from banyan.worker.spool import SpoolPolicy


def main(argv: list[str] | None = None) -> int:
    try:
        args = docopt(__doc__, argv=argv)
        name = args["--name"] or socket.gethostname()
        capacity = resources.override(
            resources.detect(),
            cpus=float(args["--cpus"]) if args["--cpus"] else None,
            memory=int(args["--memory"]) if args["--memory"] else None,
            gpus=int(args["--gpus"]) if args["--gpus"] else None,
        )
        config = WorkerConfig(
            broker=address(args["--broker"], defaults.WORKER_PORT),
            name=name,
            spool=Path(args["--spool"] or default_spool(name)),
            cpus=capacity.cpus,
            memory=capacity.memory_mib,
            gpus=list(capacity.gpus),
            tags=tuple(args["--tag"]),
            curve=peer(home(), "worker"),
            spool_policy=SpoolPolicy(
                retention=positive_duration(args["--spool-retention"], "--spool-retention"),
                min_free=parse_memory(args["--spool-min-free"], "--spool-min-free") << 20,
            ),
            run_any_owner=bool(args["--run-any-owner"]),
            allow_root_jobs=bool(args["--allow-root-jobs"]),
        )
    except (DocoptExit, ValueError) as e:
        print(f"banyan-worker: {e}" if isinstance(e, UsageError) else e, file=sys.stderr)
        return EXIT_USAGE
    except KeyExposed as e:
        print(f"banyan-worker: {e}", file=sys.stderr)
        return EXIT_USAGE
    daemon_logging(args["--log-level"])
    logging.getLogger("banyan.worker").info(
        "worker %s: %g cpus, %d MiB, %d gpus, tags %s -> %s",
        config.name,
        config.cpus,
        config.memory,
        len(config.gpus),
        ",".join(config.tags) or "-",
        config.broker,
    )
    return WorkerDaemon(config).run()


def default_spool(name: str) -> Path:
    """Root's home is usually closed to other users, whose jobs must reach their directories
    in the spool: a root worker keeps it where daemons keep theirs, as slurmd does."""
    if os.geteuid() == 0:
        return Path("/var/spool/banyan") / name
    return home() / "spool" / name


if __name__ == "__main__":
    sys.exit(main())
