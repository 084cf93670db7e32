"""What users see of each other's jobs through the broker: everything but their output and the
values of their `--env` (where tokens go). A real broker; keys of two users."""

from __future__ import annotations

import json

import pytest

from banyan.cli import status as status_cli
from tests.cluster import Cluster
from tests.test_owners import client_for


def test_env_values_are_the_owners_and_admins_alone(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, eve = client_for(cluster, "alice-p"), client_for(cluster, "eve-p")
    secret = "alice-secret-token-123"
    (job,) = alice.submit(
        'curl -H "Authorization: $API_TOKEN" x', env={"API_TOKEN": secret}, hold=True
    ).jobs
    assert alice.job(job).raw["env"] == {"API_TOKEN": secret}
    assert cluster.client().job(job).raw["env"] == {"API_TOKEN": secret}  # an admin
    seen = eve.job(job).raw
    assert (seen["env"], seen["env_hidden"]) == ({}, True)
    assert seen["command"].startswith("curl")  # the rest of the job stays public

    monkeypatch.setenv("BANYAN_HOME", str(cluster.root / "client-eve-p"))
    port = ["--broker", f"127.0.0.1:{cluster.client_port}"]
    assert status_cli.main([*port, str(job)]) == 0
    shown = capsys.readouterr().out
    assert secret not in shown and "env         only its owner and admins may see it" in shown
    assert status_cli.main([*port, "--json", str(job)]) == 0
    assert secret not in capsys.readouterr().out
    assert status_cli.main([*port, "--json", "--all", "--user", "alice-p"]) == 0
    assert secret not in json.dumps(json.loads(capsys.readouterr().out))
