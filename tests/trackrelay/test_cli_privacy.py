"""The CLI commands of issue 6, run as `trackrelay ...` would run them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shared import apitokens, consent
from shared.users import add_user
from tests.support.seedrows import T0, add_message, event, write_events
from tests.support.webhook_server import webhook_server
from trackrelay.cli import main

Run = Callable[..., str]


@pytest.fixture
def run(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Run:
    monkeypatch.setenv("TRACKRELAY_DATABASE_URL", database_url)
    monkeypatch.setenv("TRACKRELAY_VAR_DIR", str(tmp_path / "var"))

    def run(*argv: str, status: int = 0) -> str:
        assert main(list(argv)) == status
        captured = capsys.readouterr()
        return captured.out + captured.err

    return run


def test_token_lifecycle(run: Run, engine: Engine) -> None:
    add_user(engine, "root", "password123", "admin")
    out = run("token", "create", "reporting", "--user", "root")
    token = out.split("token (shown once): ")[1].strip()
    assert apitokens.authenticate_token(engine, token) is not None
    listing = run("token", "list")
    assert "reporting\troot" in listing
    assert token not in listing
    assert "no user" in run("token", "create", "x", "--user", "ghost", status=1)
    run("token", "revoke", token[:12])
    assert apitokens.authenticate_token(engine, token) is None
    assert "revoked" in run("token", "list")


def test_webhook_commands(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKRELAY_WEBHOOK_ALLOW_PRIVATE", "true")  # a loopback server
    with webhook_server() as server:
        out = run("webhook", "add", server.url, "--event", "message.opened")
        assert "signing secret (shown once): whsec_" in out
        assert f"1\tactive\t{server.url}\tmessage.opened\tempty" in run("webhook", "list")
        assert "answered 200" in run("webhook", "test", "1")
        assert server.requests[0].headers["X-Trackrelay-Event"] == "webhook.test"
        assert run("webhook", "pause", "1") == "webhook 1 paused\n"
        assert f"1\tpaused\t{server.url}" in run("webhook", "list")
        assert run("webhook", "resume", "1") == "webhook 1 resumed\n"
        assert f"1\tactive\t{server.url}" in run("webhook", "list")
        assert "no webhook endpoint 9" in run("webhook", "pause", "9", status=1)
    assert "unknown event type" in run(
        "webhook", "add", "https://x.test/", "--event", "nope", status=1
    )
    run("webhook", "remove", "1")
    assert run("webhook", "list") == ""
    assert "no webhook endpoint 1" in run("webhook", "remove", "1", status=1)


def test_consent_commands(run: Run, engine: Engine) -> None:
    assert run("consent", "mode") == "*\topt-out\n"
    run("consent", "mode", "--domain", "eu.example", "opt-in")
    assert run("consent", "mode", "--domain", "eu.example") == "eu.example\topt-in\n"
    assert not consent.consent_allows(engine, "ana@eu.example")
    assert "recorded" in run("consent", "add", "ana@eu.example", "--source", "signed form")
    assert consent.consent_allows(engine, "ana@eu.example")
    listing = run("consent", "list")
    assert "mode\teu.example\topt-in" in listing
    assert "consent\tana@eu.example\tsigned form" in listing
    run("consent", "remove", "ana@eu.example")
    assert "no consent" in run("consent", "remove", "ana@eu.example", status=1)
    run("consent", "mode", "--domain", "eu.example", "default")
    assert consent.consent_allows(engine, "ana@eu.example")
    assert "not a domain" in run("consent", "mode", "--domain", "nodot", "opt-in", status=1)


def test_purge_and_erase_commands(run: Run, engine: Engine) -> None:
    message = add_message(engine, created_at=T0)
    write_events(engine, [event(message)])
    out = run("erase", "bob@client.test")
    assert "erased bob@client.test:" in out
    assert "recipients: 1" in out
    assert "events: 1" in out
    assert "messages: 1" in run("purge", "--days", "1")
    assert "nothing purged" in run("purge", "--days", "0")
