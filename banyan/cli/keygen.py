"""banyan-keygen: a CurveZMQ key pair for another person or machine, authorized here.

The layout is `banyan.keys`'s: the pair goes to `keys/issued/`, the public half is copied to
`keys/authorized/ROLE/NAME.key` (what the broker admits), and the person or machine installs
the secret half as `keys/client.key_secret` (users, admins) or `keys/worker.key_secret`
(workers), next to the broker's public `keys/broker.key`.
"""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

from banyan import keys
from banyan.cli import EXIT_OK
from banyan.cli.output import Args, UsageError, print_json, run
from banyan.config import home
from banyan.errors import Conflict, Forbidden, NotFound

TOOL = "banyan-keygen"
USAGE = """banyan-keygen: make and authorize a key for a user, an admin or a worker machine.

Usage:
  banyan-keygen [options] (user | admin | worker) NAME

Run it on the broker's machine, as the user the broker runs as, with the broker's
$BANYAN_HOME (under the shipped systemd unit: sudo -u banyan BANYAN_HOME=/var/lib/banyan
banyan-keygen ...): the new public key is authorized there at once (under
$BANYAN_HOME/keys/authorized/ROLE/), and the output says which two files to copy to the
person's or the worker's machine. Where $BANYAN_HOME holds no broker key pair it refuses.
NAME is the identity the broker records as a job's owner. To revoke a key, delete its
authorized file.

A user or admin key is bound to the Unix account its jobs run as on the workers: NAME, or
the account --unix-user gives. The binding is the `unix_user` line of the authorized file.

Options:
  --unix-user ACCOUNT   The Unix account this user's or admin's jobs run as (default: NAME).
  --json                Print the files made and where they go, as JSON.
  -h --help             Show this help.
"""


def main(argv: list[str] | None = None) -> int:
    return run(TOOL, USAGE, argv, keygen, explain=explain)


def explain(words: list[str]) -> str | None:
    """What is wrong with the words after the options: `ROLE NAME` is wanted."""
    roles = ", ".join(keys.ROLES[:-1]) + f" or {keys.ROLES[-1]}"
    if not words:
        return f"give a role ({roles}) and a NAME: banyan-keygen user NAME"
    if words[0] not in keys.ROLES:
        return f"the role is {roles}, not {words[0]!r}: banyan-keygen ROLE NAME"
    if len(words) == 1:
        return f"give the {words[0]} key's NAME: banyan-keygen {words[0]} NAME"
    if len(words) > 2:
        return f"one NAME only, got {len(words) - 1}: {' '.join(words[1:])}"
    return None


def keygen(args: Args) -> int:
    role = next(r for r in keys.ROLES if args[r])
    name: str = args["NAME"]
    root = home()
    # A key authorized where no broker reads it would admit nobody, and the tool would still
    # look as if it had worked: refuse before making anything.
    if not (keys.keys_dir(root) / "broker.key_secret").exists():
        raise NotFound(
            f"{root} is not a broker's home: it has no broker key pair "
            f"({keys.keys_dir(root)}/broker.key_secret), so a key made here would be "
            "authorized nowhere. Run banyan-keygen on the broker's machine as its account, "
            "with BANYAN_HOME set to the broker's (for the shipped systemd unit: sudo -u "
            f"banyan BANYAN_HOME=/var/lib/banyan banyan-keygen {role} {name})"
        )
    # Files made by another account (root, forgetting sudo -u) would be unreadable to the
    # broker: every key in them refused, and its account's next keygen denied.
    owner = keys.keys_dir(root).stat().st_uid
    if owner != os.geteuid():
        account = _account_name(owner)
        raise Forbidden(
            f"{keys.keys_dir(root)} belongs to the account {account}, which runs the broker: "
            f"run banyan-keygen as it (sudo -u {account} BANYAN_HOME={root} banyan-keygen "
            f"{role} {name}), so that the broker can read the key"
        )
    try:
        public, secret, authorized = keys.issue(root, role, name, args["--unix-user"])
    except FileExistsError as e:
        raise Conflict(f"{e}; pick another name, or delete the old files first") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    except PermissionError as e:
        raise Forbidden(
            f"cannot write {e.filename}: permission denied (run banyan-keygen as the account "
            "that owns it and runs the broker)"
        ) from None
    mine = "worker.key_secret" if role == "worker" else "client.key_secret"
    broker = keys.keys_dir(root) / "broker.key"
    install = {f"keys/{mine}": str(secret), "keys/broker.key": str(broker)}
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
    print(instructions(role, name, public, secret, authorized, install))
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
    install: dict[str, str],
) -> str:
    where = "the worker machine" if role == "worker" else f"{name}'s machine"
    width = max(len(src) for src in install.values())
    article = "an" if role == "admin" else "a"
    lines = [
        f"made {article} {role} key for {name}{bound(role, authorized)}",
        f"  public      {public}",
        f"  secret      {secret}  (mode 600: keep it private)",
        f"  authorized  {authorized}",
        "",
        f"On {where}, under its $BANYAN_HOME (default ~/.banyan), install:",
        *(f"  {src.ljust(width)}  ->  {dst}" for dst, src in install.items()),
        f"  (chmod 600 the secret there), then delete it here: rm {secret}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())


def _account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
