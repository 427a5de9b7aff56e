"""`trackrelay mailbox connect|list|disconnect` as a real subprocess against the OAuth server."""

from __future__ import annotations

import os
import pty
import select
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
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

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
        # where connections are used: local mode, a real (if absent) smarthost
        TRACKRELAY_AUTH_MODE="local",
        TRACKRELAY_UPSTREAM="smtp://127.0.0.1:9",
        TRACKRELAY_UPSTREAM_USER="relay",
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


# --- app passwords: the recording upstream (PLAIN/LOGIN for USER/PASSWORD) as the provider ---


@pytest.fixture
def password_setup(
    setup: tuple[dict[str, str], Path, Engine], upstream: RecordingUpstream
) -> tuple[dict[str, str], Path, Engine]:
    env, config, engine = setup
    with config.open("a") as toml:
        toml.write(f'[oauth.fast]\napp_passwords = true\nsmtp = "{upstream.url}"\n')
    env["TRACKRELAY_UPSTREAM_VERIFY_TLS"] = "false"  # the upstream's self-signed certificate
    return env, config, engine


def connect_password(
    env: dict[str, str], config: Path, password: str, *argv: str
) -> tuple[int, str, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "trackrelay", "--config", str(config), "mailbox", "connect",
         ANN, "--user", "ann", "--app-password", *argv],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = process.communicate(password + "\n", timeout=60)
    return process.returncode, out, err


def test_connect_with_an_app_password_list_disconnect(
    password_setup: tuple[dict[str, str], Path, Engine], upstream: RecordingUpstream
) -> None:
    env, config, engine = password_setup
    code, out, err = connect_password(env, config, PASSWORD, "--provider", "fast", "--login", USER)
    assert (code, err) == (0, "")
    assert out == f"connected {ANN} for user ann through fast (app password)\n"
    assert upstream.auth_attempts == [("PLAIN", USER)]  # tried once before it was kept
    with engine.connect() as conn:
        grant = conn.exec_driver_sql("SELECT grant FROM mailbox_connections").scalar_one()
    assert PASSWORD not in grant
    code, out, err = run(env, config, "mailbox", "list")
    assert (code, out) == (0, f"{ANN}\tfast\tpassword\tann\tok\n")
    assert PASSWORD not in out + err
    code, out, _ = run(env, config, "mailbox", "disconnect", ANN)
    assert (code, out) == (
        0,
        f"{ANN}: an app password: forgotten (revoke the app password in the account)\n",
    )
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


def test_a_wrong_app_password_is_exit_1_one_line_and_nothing_stored(
    password_setup: tuple[dict[str, str], Path, Engine], upstream: RecordingUpstream
) -> None:
    env, config, _ = password_setup
    code, out, err = connect_password(env, config, "not it", "--provider", "fast", "--login", USER)
    assert (code, out) == (1, "")  # every mailbox command's user error: exit 1
    assert err.startswith(f"trackrelay: the provider refused the app password for {USER} (535")
    assert f"at {upstream.url}" in err
    assert err.endswith("nothing was stored\n")
    assert err.count("\n") == 1
    assert "not it" not in err
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


@pytest.mark.parametrize(
    ("password", "argv", "error"),
    [
        (PASSWORD, ("--provider", "test"), "[oauth.test] app_passwords is not true"),
        (PASSWORD, ("--provider", "nope"), "no [oauth.nope] table in the config"),
        ("", ("--provider", "fast"), "no app password on stdin"),
    ],
)
def test_connect_with_an_app_password_names_what_is_wrong(
    password_setup: tuple[dict[str, str], Path, Engine],
    upstream: RecordingUpstream,
    password: str,
    argv: tuple[str, ...],
    error: str,
) -> None:
    env, config, _ = password_setup
    code, _, err = connect_password(env, config, password, *argv)
    assert code == 1
    assert err.startswith(f"trackrelay: {error}"), err
    assert err.count("\n") == 1
    assert upstream.auth_attempts == []
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


def test_the_oauth_connect_of_a_password_only_provider_says_use_app_password(
    password_setup: tuple[dict[str, str], Path, Engine],
) -> None:
    env, config, _ = password_setup
    code, _, err = run(
        env, config, "mailbox", "connect", ANN, "--provider", "fast", "--user", "ann"
    )
    assert code == 1
    assert err == (
        "trackrelay: [oauth.fast] has no OAuth client (app_passwords only): use --app-password\n"
    )


def test_on_a_terminal_the_app_password_is_asked_without_echo(
    password_setup: tuple[dict[str, str], Path, Engine], upstream: RecordingUpstream
) -> None:
    env, config, _ = password_setup
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "trackrelay", "--config", str(config), "mailbox", "connect",
         ANN, "--user", "ann", "--app-password", "--provider", "fast", "--login", USER],
        env=env, stdin=terminal, stdout=subprocess.PIPE, stderr=terminal, text=True,
        start_new_session=True,  # no controlling terminal: getpass uses stdin, the pty
    )  # fmt: skip
    os.close(terminal)
    seen = _read_until(controller, b"app password for ann@example.com: ")
    os.write(controller, PASSWORD.encode() + b"\n")  # echo is off: the pty sends nothing back
    out, _ = process.communicate(timeout=60)
    seen += _read_until(controller, b"")
    os.close(controller)
    assert process.returncode == 0, seen
    assert out == f"connected {ANN} for user ann through fast (app password)\n"
    assert PASSWORD.encode() not in seen
    assert upstream.auth_attempts == [("PLAIN", USER)]


def _read_until(fd: int, wanted: bytes, wait: float = 30.0) -> bytes:
    """What the pty says until WANTED has been said (b"": until it is closed or quiet)."""
    seen = b""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and (not wanted or wanted not in seen):
        ready, _, _ = select.select([fd], [], [], 0.5 if wanted else 0.2)
        if not ready:
            if not wanted:
                return seen
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the other end is closed
            return seen
        if not chunk:
            return seen
        seen += chunk
    assert not wanted or wanted in seen, seen
    return seen


def connect_ann(env: dict[str, str], config: Path, oauth_server: OAuthServer) -> None:
    process = trackrelay(
        env, config, "mailbox", "connect", ANN, "--provider", "test", "--user", "ann"
    )
    oauth_server.approve(prompt(process)["user code"], ANN)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert err == ""  # local mode: no warning


def test_a_broken_google_grant_is_disconnected(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    oauth_server.revoke_like_google = True  # 400 invalid_token for a revoked grant
    connect_ann(env, config, oauth_server)
    oauth_server.revoke_user(ANN)
    code, out, err = run(env, config, "mailbox", "disconnect", ANN)
    assert (code, err) == (0, "")
    said = "the provider no longer knows the grant (already revoked or expired): forgotten"
    assert out == f"{ANN}: {said}\n"
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


def test_a_provider_away_at_disconnect_is_exit_1_then_force_forgets(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    connect_ann(env, config, oauth_server)
    oauth_server.revoke_down = True
    code, out, err = run(env, config, "mailbox", "disconnect", ANN)
    assert (code, out) == (1, "")
    assert err.startswith("trackrelay: the provider did not revoke the grant (")
    assert err.endswith(
        "kept, try again (or forget it without revoking): --force forgets it without revoking\n"
    )
    assert err.count("\n") == 1
    assert run(env, config, "mailbox", "list")[1].startswith(f"{ANN}\ttest\toauth\tann\tok")
    code, out, _ = run(env, config, "mailbox", "disconnect", ANN, "--force")
    assert code == 0
    assert out.endswith("forgotten without revoking (remove the app's access in the account)\n")
    assert run(env, config, "mailbox", "list")[:2] == (0, "")


def test_list_shows_the_last_error_and_when(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, engine = setup
    connect_ann(env, config, oauth_server)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE mailbox_connections SET last_error = 'the provider is away',"
            " last_error_at = '2026-12-01 08:30:00.000000'"
        )
    assert run(env, config, "mailbox", "list")[1] == (
        f"{ANN}\ttest\toauth\tann\tok\tlast error 2026-12-01T08:30:00Z: the provider is away\n"
    )


def test_a_device_flow_refusing_the_scope_says_use_the_dashboard(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    oauth_server.device_scope_refused = "mail.send"  # as Google refuses https://mail.google.com/
    code, out, err = run(
        env, config, "mailbox", "connect", ANN, "--provider", "test", "--user", "ann"
    )
    assert (code, out) == (1, "")
    assert err == (
        "trackrelay: the provider refused the scopes for the device flow (invalid_scope: "
        "mail.send is not allowed); Google's device flow does not allow "
        "https://mail.google.com/: connect Google accounts on the dashboard's Mailbox page\n"
    )


def test_connect_outside_local_mode_warns_that_connections_are_unused(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    env = {**env, "TRACKRELAY_AUTH_MODE": "passthrough"}
    code, _, err = run(
        env, config, "mailbox", "connect", ANN, "--provider", "nope", "--user", "ann"
    )
    assert code == 1
    warning, error = err.splitlines()
    assert warning == (
        "trackrelay: warning: mailbox connections are used only in local auth mode "
        "(TRACKRELAY_AUTH_MODE=local); this relay runs in passthrough mode, so no mail goes "
        "out through them"
    )
    assert error.startswith("trackrelay: no [oauth.nope] table")


def test_reseal_after_a_key_rotation(
    setup: tuple[dict[str, str], Path, Engine], oauth_server: OAuthServer
) -> None:
    env, config, _ = setup
    connect_ann(env, config, oauth_server)
    new_key = "a-new-secret-key-0123456789abcdef"
    rotated = {**env, "TRACKRELAY_SECRET_KEY": new_key, "TRACKRELAY_OLD_SECRET_KEYS": TEST_SECRET}
    code, out, err = run(rotated, config, "mailbox", "reseal")
    assert (code, out, err) == (0, "sealed again: 1; already under the current key: 0\n", "")
    only_new = {**env, "TRACKRELAY_SECRET_KEY": new_key}
    code, out, _ = run(only_new, config, "mailbox", "reseal")
    assert (code, out) == (0, "sealed again: 0; already under the current key: 1\n")
    code, out, err = run(env, config, "mailbox", "reseal")  # the old key alone opens nothing
    assert code == 1
    assert out == "sealed again: 0; already under the current key: 0\n"
    assert err == (
        f"trackrelay: no configured key opens the grant of {ANN}: list its key in "
        "TRACKRELAY_OLD_SECRET_KEYS and run this again (else connect it again)\n"
    )
    code, out, _ = run(only_new, config, "mailbox", "disconnect", ANN)  # the grant opens
    assert (code, out) == (0, f"{ANN}: revoked at the provider and forgotten\n")
