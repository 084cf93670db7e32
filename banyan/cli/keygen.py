"""banyan-keygen: a CurveZMQ key pair for another person or machine, authorized here.

The layout is `banyan.keys`'s: the pair goes to `keys/issued/`, the public half is copied to
`keys/authorized/ROLE/NAME.key` (what the broker admits), and the person or machine installs
the secret half as `keys/client.key_secret` (users, admins) or `keys/worker.key_secret`
(workers), next to the broker's public `keys/broker.key`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from banyan import keys
from banyan.cli import EXIT_OK, EXIT_REFUSED
from banyan.cli.output import Args, UsageError, print_json, run
from banyan.config import home

TOOL = "banyan-keygen"
USAGE = """banyan-keygen: make and authorize a key for a user, an admin or a worker machine.

Usage:
  banyan-keygen [options] (user | admin | worker) NAME

Run it on the broker's machine, as the user the broker runs as: the new public key is
authorized there at once (under $BANYAN_HOME/keys/authorized/ROLE/), and the output says
which two files to copy to the person's or the worker's machine. NAME is the identity the
broker records as a job's owner. To revoke a key, delete its authorized file.

A user or admin key is bound to the Unix account its jobs run as on the workers: NAME, or
the account --unix-user gives. The binding is the `unix_user` line of the authorized file.

Options:
  --unix-user ACCOUNT   The Unix account this user's or admin's jobs run as (default: NAME).
  --json                Print the files made and where they go, as JSON.
  -h --help             Show this help.
"""


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, keygen)


def keygen(args: Args) -> int:
    role = next(r for r in keys.ROLES if args[r])
    name: str = args["NAME"]
    root = home()
    try:
        public, secret, authorized = keys.issue(root, role, name, args["--unix-user"])
    except FileExistsError as e:
        print(f"{TOOL}: {e}; pick another name, or delete the old files first", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as e:
        raise UsageError(str(e)) from None
    mine = "worker.key_secret" if role == "worker" else "client.key_secret"
    broker = keys.keys_dir(root) / "broker.key"
    # On a machine that is not the broker's, the broker's public key must come from there.
    broker_src = str(broker) if broker.exists() else "(the broker's $BANYAN_HOME/keys/broker.key)"
    install = {f"keys/{mine}": str(secret), "keys/broker.key": broker_src}
    if args["--json"]:
        print_json(
            {
                "role": role,
                "name": name,
                "unix_user": keys.account_of(authorized),
                "public": str(public),
                "secret": str(secret),
                "authorized": str(authorized),
                "install": install,
            }
        )
        return EXIT_OK
    print(instructions(role, name, public, secret, authorized, broker, install))
    return EXIT_OK


def bound(role: str, authorized: Path) -> str:
    """How the output names the key's Unix account."""
    if role == "worker":
        return ""
    return f" (its jobs run as the Unix account {keys.account_of(authorized)})"


def instructions(
    role: str,
    name: str,
    public: Path,
    secret: Path,
    authorized: Path,
    broker: Path,
    install: dict[str, str],
) -> str:
    where = "the worker machine" if role == "worker" else f"{name}'s machine"
    width = max(len(src) for src in install.values())
    lines = [
        f"made a {role} key for {name}{bound(role, authorized)}",
        f"  public      {public}",
        f"  secret      {secret}  (mode 600: keep it private)",
        f"  authorized  {authorized}",
        "",
        f"On {where}, under its $BANYAN_HOME (default ~/.banyan), install:",
        *(f"  {src.ljust(width)}  ->  {dst}" for dst, src in install.items()),
        f"  (chmod 600 the secret there), then delete it here: rm {secret}",
    ]
    if not broker.exists():
        lines += [
            "",
            f"No broker key in {broker.parent}: this is not the broker's machine, so also copy",
            f"  {authorized}  ->  the broker's $BANYAN_HOME/keys/authorized/{role}/{name}.key",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
