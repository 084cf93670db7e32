"""banyan-worker: run jobs from a broker on this machine.

Usage:
  banyan-worker [options] [--tag T]...

The broker's worker socket is at --broker HOST[:PORT], else at the host of $BANYAN_BROKER
(whose port, if it names one, is the client port the tools use). Where --broker names no port,
the port is $BANYAN_WORKER_PORT, else 7412.

The first SIGTERM or SIGINT drains the worker: running jobs finish, nothing new starts, then it
exits 0 and the broker shows it stopped. A second one cancels the running jobs, which the broker
requeues on other workers. SIGHUP (a closed terminal) is logged and ignored. Exit 1: another
live worker has this name. Exit 3: the broker refused this worker's key, or --broker is not its
worker port.

Options:
  --broker HOST[:PORT]  The broker's worker socket (see above).
  --name NAME           Worker name, one live worker each: one word of letters, digits and
                        . _ @ - (default: this host's name).
  --cpus N              CPUs to offer (default: all logical CPUs).
  --memory SIZE         Memory to offer: MiB, or a size such as 64G (default: all physical).
  --gpus N              GPUs to offer (default: CUDA_VISIBLE_DEVICES or nvidia-smi).
  --tag T               A label jobs can ask for; repeat for more.
  --prefetch N          Jobs to hold ahead, beyond free room, so that a slot that frees
                        starts its next job at once; 0: none (default: as many as its
                        slots run in 0.1 s at its recent job length, at most the
                        broker's --prefetch).
  --spool DIR           Where job output goes, in a directory per account (default:
                        /var/spool/banyan/NAME as root, else $BANYAN_HOME/spool/NAME).
  --spool-retention T   Delete a job's output in the spool this long after it last
                        changed (2d, 12h) [default: 7d].
  --spool-min-free SIZE  When the spool's disk has less free, delete the oldest output
                        of ended jobs first (512M, 10G) [default: 1G].
  --run-any-owner       Not root: run every user's jobs, as this account (one trusted user
                        running a private cluster). Without it, only this account's jobs.
  --allow-root-jobs     Root: also run jobs whose owner's account is root, as root, and
                        jobs of the broker's own account (which can read its keys).
  --log-level LEVEL     debug, info, warning or error [default: info].
  -h --help             Show this help.

Started as root, the worker runs each job as its owner's Unix account (the account the
owner's key is bound to), never as root or as the broker's own account unless it is
given --allow-root-jobs. Started as another user, it runs only that user's jobs, as that
user, unless --run-any-owner is given.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from banyan.cli import EXIT_UNAVAILABLE, EXIT_USAGE, daemon_logging
from banyan.cli.output import Args, number, parse_memory, positive_duration, prefetch
from banyan.cli.usage import UsageError, parse
from banyan.config import home, worker_address
from banyan.errors import KeyRefused
from banyan.keys import KeyExposed, check_name, private_dir
from banyan.link import credentials
from banyan.worker import resources
from banyan.worker.daemon import WorkerConfig, WorkerDaemon
from banyan.worker.runner import SpoolUnusable
from banyan.worker.spool import SpoolPolicy

TOOL = "banyan-worker"
LEVELS = ("debug", "info", "warning", "error")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = parse(__doc__ or "", argv)
        except SystemExit:  # --help was printed
            return 0
        config = worker_config(args)
    except UsageError as e:
        print(f"{TOOL}: {e}" + (f"\n{e.hint}" if e.hint else ""), file=sys.stderr)
        return EXIT_USAGE
    except KeyExposed as e:
        print(f"{TOOL}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyRefused as e:  # a key file is missing: found before connecting
        print(f"{TOOL}: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if config.home is not None and config.spool.is_relative_to(config.home):
        private_dir(config.home)  # made here for the first time: private, as the broker makes it
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
    try:
        daemon = WorkerDaemon(config)
    except SpoolUnusable as e:
        # A usage error, not exit 1: a unit restarts on 1 (a taken name frees itself).
        print(f"{TOOL}: --spool {e}", file=sys.stderr)
        return EXIT_USAGE
    return daemon.run()


def worker_config(args: Args) -> WorkerConfig:
    """The worker's configuration from its options; a bad value is a UsageError."""
    if args["--log-level"].lower() not in LEVELS:
        raise UsageError(f"--log-level: one of {', '.join(LEVELS)}, got {args['--log-level']!r}")
    given = args["--name"]
    name = socket.gethostname() if given is None else given
    try:
        check_name(name, "a worker name")
    except ValueError as e:
        said = f"--name: {e}" if given is not None else f"{e} (it is this host's: give --name)"
        raise UsageError(said) from None
    try:
        broker = worker_address(args["--broker"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    capacity = resources.override(
        resources.detect(),
        cpus=number(args["--cpus"], "--cpus", positive=True) if args["--cpus"] else None,
        memory=parse_memory(args["--memory"], "--memory") if args["--memory"] else None,
        gpus=number(args["--gpus"], "--gpus", integer=True) if args["--gpus"] else None,
    )
    where = home()
    return WorkerConfig(
        broker=broker,
        name=name,
        spool=Path(args["--spool"] or default_spool(name)),
        cpus=capacity.cpus,
        memory=capacity.memory_mib,
        gpus=list(capacity.gpus),
        tags=tuple(args["--tag"]),
        curve=credentials(where, "worker").curve,
        home=where,
        spool_policy=SpoolPolicy(
            retention=positive_duration(args["--spool-retention"], "--spool-retention"),
            min_free=parse_memory(args["--spool-min-free"], "--spool-min-free") << 20,
        ),
        run_any_owner=bool(args["--run-any-owner"]),
        allow_root_jobs=bool(args["--allow-root-jobs"]),
        prefetch=None if args["--prefetch"] is None else prefetch(args["--prefetch"]),
    )


def default_spool(name: str) -> Path:
    """Root's home is usually closed to other users, whose jobs must reach their directories
    in the spool: a root worker keeps it where daemons keep theirs, as slurmd does."""
    if os.geteuid() == 0:
        return Path("/var/spool/banyan") / name
    return home() / "spool" / name


if __name__ == "__main__":
    sys.exit(main())
