"""compose.yaml and the Dockerfile: Docker cannot run here, so check what can be checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.config import Settings
from trackrelay.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_topology(compose: dict) -> None:
    services = compose["services"]
    assert "postgres" in services
    assert "mailpit" in services
    relays = [s for s in services.values() if s.get("command") == ["relay"]]
    receivers = [s for s in services.values() if s.get("command") == ["receiver"]]
    assert len(relays) == 2
    assert len(receivers) == 2
    for service in relays + receivers:
        assert "healthcheck" in service
        assert service["environment"]["TRACKRELAY_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "${TRACKRELAY_SECRET_KEY" in service["environment"]["TRACKRELAY_SECRET_KEY"]


def test_every_command_is_a_valid_trackrelay_invocation(compose: dict) -> None:
    parser = build_parser()
    for name, service in compose["services"].items():
        if service.get("build") != ".":
            continue
        args = parser.parse_args(service["command"])
        assert callable(args.command), name


def test_dockerfile_installs_the_packages_compose_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("relay", "receiver", "shared", "trackrelay"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["trackrelay"]' in dockerfile


def test_every_setting_in_compose_exists(compose: dict) -> None:
    """A misspelt TRACKRELAY_ variable would be refused at start (extra="forbid")."""
    fields = {f"TRACKRELAY_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("TRACKRELAY_"):
                assert key in fields, (name, key)


def test_relays_and_receivers_keep_their_journal_on_a_volume(compose: dict) -> None:
    """The relay and receiver journals (database outages) must survive a restart."""
    for name, service in compose["services"].items():
        if service.get("command") in (["relay"], ["receiver"]):
            mounts = [v.split(":")[1] for v in service.get("volumes", [])]
            assert "/var/lib/trackrelay" in mounts, name
