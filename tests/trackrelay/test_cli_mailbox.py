"""`trackrelay mailbox connect|list|disconnect` as a real subprocess against the OAuth server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shared import db
from shared.users import add_user
from tests.conftest import TEST_SECRET
from tests.support.oauth_server import OAuthServer, provider_table

ANN = "ann@example.com"


@pytest.fixture
def setup(tmp_path: Path, oauth_server: OAuthServer) -> tuple[dict[str, str], Path, Engine]:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    add_user(engine, "ann", "password123", addresses=[ANN])
    config = tmp_path / "trackrelay.toml"
    config.write_text(provider_table(oauth_server, "smtp://127.0.0.1:2525"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
    env.update(
        TRACKRELAY_DATABASE_URL=url,
        TRACKRELAY_VAR_DIR=str(tmp_path / "var"),
        TRACKRELAY_SECRET_KEY=TEST_SECRET,
    )
    yield env, config, engine
    engine.dispose()


def trackrelay(env: dict[str, str], config: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trackrelay", "--config", str(config), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(env: dict[str, str], config: Path, *argv: str) -> tuple[int, str, str]:
    process = trackrelay(env, config, *argv)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def prompt(process: subprocess.Popen[str]) -> dict[str, str]:
    """Read the connect command's lines until it waits; 'verification URL', 'user code'."""
    assert process.stdout is not None
    said: dict[str, str] = {}
    for line in process.stdout:
        if line.startswith("waiting"):
            return said
        name, _, value = line.rstrip("\n").partition(": ")
        said[name] = value
    raise AssertionError(process.stderr.read() if process.stderr else "no prompt")


def test_connect_list_disconnect(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    process = trackrelay(
        env, config, "mailbox", "connect", ANN, "--provider", "test", "--user", "ann"
    )
    said = prompt(process)
    assert said["verification URL"] == f"{oauth_server.url}/activate"
    assert said["user code"] in oauth_server.pending_user_codes()
    time.sleep(0.3)  # it is polling: authorization_pending until the person consents
    oauth_server.approve(said["user code"], ANN)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert out.strip() == f"connected {ANN} for user ann through test"
    assert "authorization_pending" not in err
    code, out, _ = run(env, config, "mailbox", "list")
    assert (code, out) == (0, f"{ANN}\ttest\toauth\tann\tok\n")
    access_tokens = list(oauth_server.access)
    code, out, _ = run(env, config, "mailbox", "disconnect", ANN)
    assert (code, out) == (0, f"{ANN}: revoked at the provider and forgotten\n")
    assert not any(oauth_server.is_live(token) for token in access_tokens)
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


def test_an_expired_code_is_a_clear_error(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    oauth_server.device_ttl = 1.5
    code, out, err = run(
        env, config, "mailbox", "connect", ANN, "--provider", "test", "--user", "ann"
    )
    assert code == 1
    assert "user code: " in out
    assert err == "trackrelay: the code expired before it was confirmed; run the command again\n"
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


def test_a_broken_connection_is_listed_with_why(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, engine = setup
    process = trackrelay(
        env, config, "mailbox", "connect", ANN, "--provider", "test", "--user", "ann"
    )
    oauth_server.approve(prompt(process)["user code"], ANN)
    process.communicate(timeout=60)  # and close its pipes
    assert process.returncode == 0
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE mailbox_connections SET state = 'broken', reason = 'revoked at the provider'"
        )
    assert (
        run(env, config, "mailbox", "list")[1]
        == f"{ANN}\ttest\toauth\tann\tbroken: revoked at the provider\n"
    )


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (("--provider", "nope", "--user", "ann"), "no [oauth.nope] table in the config"),
        (("--provider", "test", "--user", "bob"), "no user 'bob'"),
    ],
)
def test_connect_refuses_before_asking_the_provider(
    setup: tuple[dict[str, str], Path, Engine],
    oauth_server: OAuthServer,
    argv: tuple[str, ...],
    error: str,
) -> None:
    env, config, _ = setup
    code, _, err = run(env, config, "mailbox", "connect", ANN, *argv)
    assert code == 1
    assert err.startswith(f"trackrelay: {error}")
    assert oauth_server.pending_user_codes() == []


def test_connect_refuses_an_address_the_user_does_not_own(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    code, _, err = run(
        env, config, "mailbox", "connect", "boss@example.com", "--provider", "test", "--user", "ann"
    )
    assert code == 1
    assert "may not send as boss@example.com" in err
