"""Keys bound to Unix accounts, private key and state files, and the worker's rules for whose
jobs it runs as whom (SPEC §6); the parts that need no second account."""

from __future__ import annotations

import os
import resource
import stat
from pathlib import Path

import pytest
import zmq.auth

from banyan import defaults, keys
from banyan.keys import Identity, KeyExposed, parse_user_id
from banyan.worker import accounts
from banyan.worker.accounts import Account, Policy


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_user_key_is_bound_to_its_name_or_the_account_given(tmp_path: Path) -> None:
    _, _, alice = keys.issue(tmp_path, "user", "alice")
    _, _, bob = keys.issue(tmp_path, "admin", "bob-laptop", account="bob")
    _, _, node = keys.issue(tmp_path, "worker", "node7")
    assert (keys.account_of(alice), keys.account_of(bob), keys.account_of(node)) == (
        "alice",
        "bob",
        None,
    )
    found = keys.Authorizer(tmp_path)
    identities = {found.lookup(zmq.auth.load_certificate(p)[0]) for p in (alice, bob, node)}
    assert identities == {
        Identity("alice", "user", "alice"),
        Identity("bob-laptop", "admin", "bob"),
        Identity("node7", "worker", None),
    }


def test_bad_bindings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--unix-user"):
        keys.issue(tmp_path, "user", "Alice Smith")  # not an account name: say which
    with pytest.raises(ValueError, match="not a Unix account name"):
        keys.issue(tmp_path, "user", "alice", account="al:ice")
    with pytest.raises(ValueError, match="worker key"):
        keys.issue(tmp_path, "worker", "n1", account="root")


def test_a_key_from_before_bindings_runs_as_the_account_named_like_it(tmp_path: Path) -> None:
    d = tmp_path / "keys" / "authorized" / "user"
    d.mkdir(parents=True)
    public, _ = zmq.auth.create_certificates(d, "carol")  # no metadata at all
    assert keys.account_of(Path(public)) is None
    who = keys.Authorizer(tmp_path).lookup(zmq.auth.load_certificate(public)[0])
    assert who == Identity("carol", "user", "carol")


@pytest.mark.parametrize(
    "who",
    [
        Identity("alice", "user", "alice"),
        Identity("alice-laptop", "admin", "alice"),
        Identity("odd:name", "user", "odd:name"),  # an unbound old key with a colon
        Identity("n1", "worker", None),
    ],
)
def test_the_user_id_carries_name_role_and_account(who: Identity) -> None:
    assert parse_user_id(who.user_id) == who


def test_the_first_start_makes_private_keys_for_this_account(tmp_path: Path) -> None:
    home = tmp_path / "home"
    keys.ensure_local(home)
    k = home / "keys"
    assert mode(home) == mode(k) == mode(k / "authorized" / "admin") == 0o700
    for secret in ("broker", "client", "worker"):
        assert mode(k / f"{secret}.key_secret") == 0o600
    (admin,) = (k / "authorized" / "admin").iterdir()
    assert keys.account_of(admin) == keys.own_account()


def test_an_existing_home_is_left_as_it_is_but_keys_are_made_private(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    (home / "keys").mkdir(parents=True, mode=0o755)
    os.chmod(home, 0o755)
    os.chmod(home / "keys", 0o755)
    keys.ensure_local(home)
    assert (mode(home), mode(home / "keys")) == (0o755, 0o700)


def test_a_secret_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    keys.ensure_local(tmp_path)
    secret = tmp_path / "keys" / "worker.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(KeyExposed, match=f"chmod 600 {secret}"):
        keys.peer(tmp_path, "worker")
    os.chmod(secret, 0o600)
    assert keys.peer(tmp_path, "worker") is not None


def test_the_state_folder_is_the_brokers_alone(tmp_path: Path) -> None:
    from banyan.broker.store import Store

    Store(tmp_path / "state").close()
    assert mode(tmp_path / "state") == 0o700
    assert {mode(p) for p in (tmp_path / "state").iterdir()} == {0o600}


# ---- the worker's rules -------------------------------------------------------------------


def fake(name: str, uid: int) -> Account:
    return Account(name, uid, uid, (uid,), f"/home/{name}", "/bin/sh")


@pytest.fixture
def clock() -> list[float]:
    return [100.0]


def test_a_worker_not_root_runs_only_its_own_accounts_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accounts, "own", lambda: fake("alice", 1234))
    p = Policy("w1")
    assert p.only_account == "alice" and p.refused == {}
    assert p.resolve("alice", 0.0) == fake("alice", 1234)
    assert p.resolve("bob", 0.0) == (
        "worker w1 runs only alice's jobs (it is not root, and was not started with "
        "--run-any-owner)"
    )
    anyone = Policy("w1", run_any_owner=True)
    assert anyone.only_account is None and anyone.resolve("bob", 0.0) == fake("alice", 1234)


def test_a_root_worker_runs_each_account_as_itself_and_root_only_if_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accounts, "own", lambda: fake("root", 0))
    known = {"alice": fake("alice", 1234), "root": fake("root", 0), "toor": fake("toor", 0)}
    monkeypatch.setattr(accounts, "lookup", known.get)
    p = Policy("w1")
    root_refused = "worker w1 does not run jobs as root (start it with --allow-root-jobs)"
    assert p.only_account is None and p.refused == {"root": root_refused}
    assert p.resolve("alice", 0.0) == known["alice"]
    assert p.resolve("toor", 0.0) == root_refused  # uid 0 under any name
    assert p.resolve("ghost", 0.0) == "account ghost does not exist on worker w1"
    assert set(p.refused) == {"root", "toor", "ghost"}
    allowed = Policy("w1", allow_root=True)
    assert allowed.refused == {} and allowed.resolve("root", 0.0) == known["root"]


def test_a_root_worker_runs_no_job_as_the_brokers_account_unless_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accounts, "own", lambda: fake("root", 0))
    known = {n: fake(n, uid) for n, uid in (("banyan", 990), ("alias", 990), ("alice", 1234))}
    monkeypatch.setattr(accounts, "lookup", known.get)
    p = Policy("w1")
    assert p.learn_broker_account("banyan", 0.0)  # new: it registers again, refusing it
    refused = (
        "worker w1 does not run jobs as the broker's account banyan "
        "(start it with --allow-root-jobs)"
    )
    assert p.refused["banyan"] == refused and not p.learn_broker_account("banyan", 1.0)
    assert p.resolve("banyan", 0.0) == refused
    assert p.resolve("alias", 0.0) == refused  # its uid under any name
    assert p.resolve("alice", 0.0) == known["alice"]
    assert p.resolve("ghost", 0.0) == "account ghost does not exist on worker w1"
    assert not p.recheck(defaults.ACCOUNT_CACHE)  # looks again: banyan exists, still refused
    assert "banyan" in p.refused and "ghost" in p.refused
    allowed = Policy("w1", allow_root=True)
    assert not allowed.learn_broker_account("banyan", 0.0)
    assert allowed.resolve("banyan", 0.0) == known["banyan"]
    monkeypatch.setattr(accounts, "own", lambda: fake("banyan", 990))
    alone = Policy("w1")  # not root, as the broker's own account: the one-account setup
    assert not alone.learn_broker_account("banyan", 0.0)
    assert alone.resolve("banyan", 0.0) == fake("banyan", 990)


def test_a_missing_account_is_looked_up_again_and_then_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(accounts, "own", lambda: fake("root", 0))
    known: dict[str, Account] = {}
    monkeypatch.setattr(accounts, "lookup", known.get)
    p = Policy("w1", allow_root=True)
    assert isinstance(p.resolve("ghost", 10.0), str)
    assert not p.recheck(20.0)  # not due yet
    due = 10.0 + defaults.ACCOUNT_CACHE
    assert not p.recheck(due) and "ghost" in p.refused  # due, still missing
    known["ghost"] = fake("ghost", 4321)
    assert not p.recheck(due + 1)  # the next look is a whole period later
    assert p.recheck(due + defaults.ACCOUNT_CACHE)
    assert p.refused == {} and p.resolve("ghost", due + 61) == known["ghost"]


def test_login_path_follows_login_defs(tmp_path: Path) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("# x\nENV_SUPATH\tPATH=/sbin:/bin\nENV_PATH PATH=/usr/bin:/bin:/games\n")
    assert accounts.login_path(0, str(defs)) == "/sbin:/bin"
    assert accounts.login_path(1000, str(defs)) == "/usr/bin:/bin:/games"
    assert accounts.login_path(1000, str(tmp_path / "none")) == "/usr/local/bin:/usr/bin:/bin"
    # Read once, and again when it changes.
    defs.write_text("ENV_PATH PATH=/opt/bin:/usr/bin:/bin\n")
    assert accounts.login_path(1000, str(defs)) == "/opt/bin:/usr/bin:/bin"
    assert (
        accounts.login_path(0, str(defs))
        == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )


def test_limits_conf_the_users_line_beats_the_groups_which_beats_everyones(
    tmp_path: Path,
) -> None:
    main = tmp_path / "limits.conf"
    main.write_text(
        "*        soft  nofile  1000\n"
        "*        hard  nofile  4000\n"
        "@nogroup -     nproc   300\n"  # a group alice is not in
        "alice    soft  nofile  2000  # her own\n"
        "1000:    -     core    unlimited\n"
        "*        hard  cpu     2\n"
        "bogus line\n"
    )
    extra = tmp_path / "limits.d"
    extra.mkdir()
    (extra / "90-late.conf").write_text("*  soft  nofile  1500\n")  # same rank as `*`: later wins
    got = {
        limit: (soft, hard)
        for limit, soft, hard in accounts.login_limits(
            "alice", 1000, (), (str(main), str(extra / "*.conf"))
        )
    }
    infinity = resource.RLIM_INFINITY
    assert got[resource.RLIMIT_NOFILE] == (2000, 4000)
    assert got[resource.RLIMIT_CORE] == (infinity, infinity)
    assert got[resource.RLIMIT_CPU][1] == 120  # minutes, as seconds
    assert resource.RLIMIT_NPROC not in got
