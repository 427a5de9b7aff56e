"""shared/mailbox.py against the in-suite OAuth server, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine
from sqlmodel import Session, select

from shared import mailbox, oauth, webhooks
from shared.config import Settings
from shared.errors import UserError
from shared.mailbox import MailboxBroken
from shared.models import MailboxConnection, OutboxItem
from shared.users import add_user, remove_user
from tests.support.oauth_server import CLIENT_ID, OAuthServer, provider_settings
from tests.support.seedrows import row_of, seal_grant
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

MakeSettings = Callable[..., Settings]
ADDRESS = "ann@example.com"


def settings_for(make_settings: MakeSettings, server: OAuthServer, **values: Any) -> Settings:
    return make_settings(oauth=provider_settings(server), **values)


def consent(settings: Settings, server: OAuthServer) -> oauth.Token:
    """The device grant, as the CLI runs it, the person approving at once."""
    provider = mailbox.provider(settings, "test")
    device = oauth.start_device(provider)
    server.approve(device.user_code, ADDRESS)
    return oauth.poll_device(provider, device, sleep=lambda _: None)


def connected(engine: Engine, settings: Settings, server: OAuthServer) -> int:
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    row = mailbox.store(engine, settings, "ann", ADDRESS, "test", consent(settings, server))
    assert row.id is not None
    return row.id


def test_the_grant_is_sealed_at_rest_and_served_while_fresh(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    token = consent(settings, oauth_server)
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    row = mailbox.store(engine, settings, "ann", "Ann@Example.com", "test", token)
    assert row.address == ADDRESS
    stored = row_of(engine, row.id or 0)
    assert token.access_token not in stored.grant
    assert token.refresh_token not in stored.grant
    assert stored.state == "ok"
    assert stored.scopes == "mail.send offline_access"  # what the provider granted
    route = mailbox.route(engine, settings, "ann", "ann@EXAMPLE.com")
    assert route is not None
    assert route.id == row.id
    access = mailbox.access_token(engine, settings, route.id)
    assert access.token == token.access_token
    assert oauth_server.refreshes() == 0
    assert mailbox.route(engine, settings, "ann", "other@example.com") is None
    assert mailbox.route(engine, settings, "bob", ADDRESS) is None


def test_refreshed_before_expiry_with_rotation(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    oauth_server.access_ttl = 60  # inside the 300 s margin: due at once
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    first = mailbox.access_token(engine, settings, connection_id)
    assert oauth_server.refreshes() == 1
    assert oauth_server.is_live(first.token)
    oauth_server.access_ttl = 3600
    second = mailbox.access_token(engine, settings, connection_id)
    assert oauth_server.refreshes() == 2
    assert second.token != first.token
    assert mailbox.access_token(engine, settings, connection_id).token == second.token
    assert oauth_server.refreshes() == 2  # fresh now: no third refresh
    row = row_of(engine, connection_id)
    assert row.last_refresh_at is not None
    assert row.lease_until is None
    # rotation honoured: only the newest refresh token is live at the server
    assert len(oauth_server.refresh) == 1
    assert len(oauth_server.used_refresh) == 2


def test_a_revoked_grant_marks_the_connection_broken(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    oauth_server.revoke_user(ADDRESS)
    mailbox.token_refused(engine, connection_id)  # AUTH refused the token: refresh next time
    with pytest.raises(MailboxBroken, match="invalid_grant"):
        mailbox.access_token(engine, settings, connection_id)
    row = row_of(engine, connection_id)
    assert row.state == "broken"
    assert "no longer accepts the grant" in row.reason
    with pytest.raises(MailboxBroken, match="no longer accepts"):
        mailbox.access_token(engine, settings, connection_id)
    assert oauth_server.refreshes() == 1  # broken: the provider is not asked again


def test_two_threads_refreshing_together_send_one_refresh(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    mailbox.token_refused(engine, connection_id)
    oauth_server.token_delay = 0.5
    start = threading.Barrier(3)
    got: list[str] = []
    failed: list[BaseException] = []

    def refresh() -> None:
        start.wait()
        try:
            got.append(mailbox.access_token(engine, settings, connection_id).token)
        except BaseException as exc:  # reported below, not lost in the thread
            failed.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failed == []
    assert oauth_server.refreshes() == 1
    assert len(set(got)) == 1
    assert len(got) == 3
    assert oauth_server.is_live(got[0])
    assert row_of(engine, connection_id).state == "ok"


def test_the_grant_survives_a_key_rotation_and_is_sealed_again(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    old = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, old, oauth_server)
    sealed = row_of(engine, connection_id).grant
    rotated = settings_for(
        make_settings,
        oauth_server,
        secret_key="a-new-secret-key-0123456789abcdef",
        old_secret_keys=old.secret_key.get_secret_value(),
    )
    token = mailbox.access_token(engine, rotated, connection_id).token
    resealed = row_of(engine, connection_id).grant
    assert resealed.split(".")[1] != sealed.split(".")[1]  # another key id
    only_new = settings_for(make_settings, oauth_server, secret_key=rotated.secret_key)
    assert mailbox.access_token(engine, only_new, connection_id).token == token
    with pytest.raises(MailboxBroken, match="TRACKRELAY_OLD_SECRET_KEYS"):
        mailbox.access_token(engine, old, connection_id)  # the old key alone opens nothing


def test_erased_with_the_user(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connected(engine, settings, oauth_server)
    remove_user(engine, "ann")
    with Session(engine) as session:
        assert session.exec(select(MailboxConnection)).all() == []


def test_disconnect_revokes_at_the_provider_and_forgets(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    token = mailbox.access_token(engine, settings, connection_id).token
    assert mailbox.disconnect(engine, settings, ADDRESS) == "revoked at the provider and forgotten"
    assert not oauth_server.is_live(token)
    assert mailbox.list_connections(engine) == []
    with pytest.raises(UserError, match="no mailbox connection"):
        mailbox.disconnect(engine, settings, ADDRESS)


def test_store_names_what_is_wrong(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    token = oauth.Token("a", "r", 0.0)
    with pytest.raises(UserError, match=r"no \[oauth.nope\] table .*configured: test"):
        mailbox.store(engine, settings, "ann", ADDRESS, "nope", token)
    with pytest.raises(UserError, match="no user 'ann'"):
        mailbox.store(engine, settings, "ann", ADDRESS, "test", token)


def test_a_break_is_announced_once_as_mailbox_disconnected(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    webhooks.add_endpoint(engine, "https://hooks.example/mail", ["mailbox.disconnected"])
    webhooks.add_endpoint(engine, "https://hooks.example/opens", ["message.opened"])
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    oauth_server.revoke_user(ADDRESS)
    mailbox.token_refused(engine, connection_id)
    for _ in range(2):  # the second attempt finds it broken: no second announcement
        with pytest.raises(MailboxBroken):
            mailbox.access_token(engine, settings, connection_id)
    with Session(engine) as session:
        rows = session.exec(select(OutboxItem)).all()
    assert [(r.event_type, r.target) for r in rows] == [("mailbox.disconnected", "1")]
    body = json.loads(rows[0].payload)
    assert body["type"] == "mailbox.disconnected"
    connection = body["data"]["connection"]
    assert connection["id"] == connection_id
    assert connection["address"] == ADDRESS
    assert connection["provider"] == "test"
    assert connection["user"] == "ann"
    assert "invalid_grant" in connection["reason"]
    assert rows[0].payload.count(oauth_server.url) == 0  # no endpoint, no token in it
    assert not any(token in rows[0].payload for token in oauth_server.access)


def test_what_the_dashboard_reads_and_sets(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    add_user(engine, "bea", "password123", addresses=["bea@example.com"])
    ann = row_of(engine, connection_id).user_id
    assert [r.id for r in mailbox.connections_of(engine, ann)] == [connection_id]
    assert mailbox.connections_of(engine, ann + 1) == []
    assert mailbox.broken_of(engine, ann) == []
    mailbox.set_sent(engine, connection_id, "leave")
    with pytest.raises(UserError, match="clean or leave"):
        mailbox.set_sent(engine, connection_id, "keep")
    assert row_of(engine, connection_id).sent == "leave"
    mailbox.mark_broken(engine, connection_id, "revoked")
    assert mailbox.broken_of(engine, ann) == [ADDRESS]
    found = mailbox.get_connection(engine, connection_id)
    assert found is not None
    assert (found.state, found.reason) == ("broken", "revoked")
    assert mailbox.get_connection(engine, connection_id + 1) is None


# --- app passwords: the recording upstream (PLAIN/LOGIN for USER/PASSWORD) as the provider ---


def password_settings(make_settings: MakeSettings, smtp: str, **values: Any) -> Settings:
    """Provider ``fast``: app passwords only, its smtp the recording upstream."""
    tables = {"fast": {"app_passwords": True, "smtp": smtp}}
    return make_settings(oauth=tables, upstream_verify_tls=False, **values)


def password_connected(engine: Engine, settings: Settings) -> int:
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    row = mailbox.connect_password(engine, settings, "ann", ADDRESS, "fast", PASSWORD, login=USER)
    assert row.id is not None
    return row.id


def test_an_app_password_is_tried_once_then_sealed_at_rest(
    engine: Engine,
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = password_settings(make_settings, upstream.url)
    connection_id = password_connected(engine, settings)
    assert upstream.auth_attempts == [("PLAIN", USER)]  # the one trial login
    stored = row_of(engine, connection_id)
    assert (stored.method, stored.login, stored.state) == ("password", USER, "ok")
    assert PASSWORD not in stored.grant
    assert PASSWORD.encode() not in base64.urlsafe_b64decode(stored.grant.split(".")[2])
    access = mailbox.access_token(engine, settings, connection_id)
    assert (access.address, access.token, access.mechanism) == (USER, PASSWORD, "PLAIN")
    assert PASSWORD not in repr(access)
    route = mailbox.route(engine, settings, "ann", ADDRESS)
    assert route is not None
    assert route.method == "password"
    assert PASSWORD not in caplog.text


def test_the_login_is_the_address_unless_given(
    engine: Engine, make_settings: MakeSettings, upstream: RecordingUpstream
) -> None:
    settings = password_settings(make_settings, upstream.url)
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    with pytest.raises(UserError) as refused:  # the upstream's account is alice@, not ann@
        mailbox.connect_password(engine, settings, "ann", ADDRESS, "fast", PASSWORD)
    assert refused.value.field == "password"
    assert upstream.auth_attempts == [("PLAIN", ADDRESS)]


def test_a_wrong_app_password_is_a_clear_error_and_nothing_is_stored(
    engine: Engine, make_settings: MakeSettings, upstream: RecordingUpstream
) -> None:
    settings = password_settings(make_settings, upstream.url)
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    with pytest.raises(UserError) as refused:
        mailbox.connect_password(engine, settings, "ann", ADDRESS, "fast", "wrong", login=USER)
    message = str(refused.value)
    assert message.startswith(f"the provider refused the app password for {USER} (535 ")
    assert f"at {upstream.url}" in message
    assert message.endswith("nothing was stored")
    assert "wrong" not in message
    assert refused.value.field == "password"
    assert upstream.auth_attempts == [("PLAIN", USER)]  # one attempt, never a second mechanism
    assert mailbox.list_connections(engine) == []


def test_an_unreachable_provider_is_a_clear_error_and_nothing_is_stored(
    engine: Engine, make_settings: MakeSettings
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = password_settings(make_settings, f"smtps://127.0.0.1:{port}")
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    with pytest.raises(UserError, match=rf"cannot reach smtps://127.0.0.1:{port} to check"):
        mailbox.connect_password(engine, settings, "ann", ADDRESS, "fast", PASSWORD, login=USER)
    assert mailbox.list_connections(engine) == []


def test_connect_password_names_what_is_wrong_before_asking_the_provider(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    tables = {
        **provider_settings(oauth_server),
        "fast": {"app_passwords": True, "smtp": "smtp://127.0.0.1:9"},
    }
    settings = make_settings(oauth=tables)
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    cases = [
        ("test", ADDRESS, PASSWORD, "", r"\[oauth.test\] app_passwords is not true", "provider"),
        ("nope", ADDRESS, PASSWORD, "", r"no \[oauth.nope\] table", "provider"),
        ("fast", ADDRESS, "", "", "the app password is empty", "password"),
        ("fast", ADDRESS, "two\nlines", "", "not one line", "password"),
        ("fast", "boss@example.com", PASSWORD, "", "may not send as boss@example.com", "address"),
        ("fast", ADDRESS, PASSWORD, "a b", "the login is one word", "login"),
    ]
    for name, address, password, login, error, field in cases:
        with pytest.raises(UserError, match=error) as refused:
            mailbox.connect_password(engine, settings, "ann", address, name, password, login=login)
        assert refused.value.field == field
    assert mailbox.list_connections(engine) == []


def test_an_app_password_survives_a_key_rotation_and_is_sealed_again(
    engine: Engine, make_settings: MakeSettings, upstream: RecordingUpstream
) -> None:
    old = password_settings(make_settings, upstream.url)
    connection_id = password_connected(engine, old)
    sealed = row_of(engine, connection_id).grant
    rotated = password_settings(
        make_settings,
        upstream.url,
        secret_key="a-new-secret-key-0123456789abcdef",
        old_secret_keys=old.secret_key.get_secret_value(),
    )
    assert mailbox.access_token(engine, rotated, connection_id).token == PASSWORD
    resealed = row_of(engine, connection_id).grant
    assert resealed.split(".")[1] != sealed.split(".")[1]  # another key id
    only_new = password_settings(make_settings, upstream.url, secret_key=rotated.secret_key)
    assert mailbox.access_token(engine, only_new, connection_id).token == PASSWORD
    with pytest.raises(MailboxBroken, match="TRACKRELAY_OLD_SECRET_KEYS"):
        mailbox.access_token(engine, old, connection_id)
    assert row_of(engine, connection_id).state == "broken"


def test_an_app_password_is_erased_with_the_user_and_forgotten_at_disconnect(
    engine: Engine, make_settings: MakeSettings, upstream: RecordingUpstream
) -> None:
    settings = password_settings(make_settings, upstream.url)
    password_connected(engine, settings)
    said = mailbox.disconnect(engine, settings, ADDRESS)
    assert said == "an app password: forgotten (revoke the app password in the account)"
    assert mailbox.list_connections(engine) == []
    mailbox.connect_password(engine, settings, "ann", ADDRESS, "fast", PASSWORD, login=USER)
    remove_user(engine, "ann")
    with Session(engine) as session:
        assert session.exec(select(MailboxConnection)).all() == []


def test_an_oauth_grant_replaces_an_app_password(
    engine: Engine,
    make_settings: MakeSettings,
    oauth_server: OAuthServer,
    upstream: RecordingUpstream,
) -> None:
    tables = {
        **provider_settings(oauth_server),
        "fast": {"app_passwords": True, "smtp": upstream.url},
    }
    settings = make_settings(oauth=tables, upstream_verify_tls=False)
    connection_id = password_connected(engine, settings)
    row = mailbox.store(engine, settings, "ann", ADDRESS, "test", consent(settings, oauth_server))
    assert row.id == connection_id
    assert (row.method, row.login, row.provider) == ("oauth", ADDRESS, "test")
    assert mailbox.access_token(engine, settings, connection_id).mechanism == "XOAUTH2"


# --- disconnecting what cannot be revoked; grants the provider gives or takes oddly ---


def test_a_broken_grant_is_forgotten_when_google_says_invalid_token(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    oauth_server.revoke_like_google = True  # 400 invalid_token for a revoked token
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    oauth_server.revoke_user(ADDRESS)
    mailbox.token_refused(engine, connection_id)
    with pytest.raises(MailboxBroken):
        mailbox.access_token(engine, settings, connection_id)
    said = mailbox.disconnect(engine, settings, ADDRESS)
    assert said == (
        "the provider no longer knows the grant (already revoked or expired): forgotten"
    )
    assert mailbox.list_connections(engine) == []


def test_a_grant_with_nothing_to_revoke_is_forgotten(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    # stored before store() refused such grants
    seal_grant(engine, settings, connection_id, ADDRESS, oauth.Token("at-x", "", 0.0).as_dict())
    said = mailbox.disconnect(engine, settings, ADDRESS)
    assert said == "the grant has no refresh token to revoke: forgotten"
    assert mailbox.list_connections(engine) == []


def test_a_provider_away_at_disconnect_keeps_it_unless_forced(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connected(engine, settings, oauth_server)
    oauth_server.revoke_down = True
    with pytest.raises(mailbox.NotRevoked, match="kept, try again") as kept:
        mailbox.disconnect(engine, settings, ADDRESS)
    assert "\n" not in str(kept.value)
    assert len(mailbox.list_connections(engine)) == 1
    said = mailbox.disconnect(engine, settings, ADDRESS, force=True)
    assert said.startswith("the provider did not revoke the grant (")
    assert said.endswith("forgotten without revoking (remove the app's access in the account)")
    assert mailbox.list_connections(engine) == []
    assert len(oauth_server.refresh) == 1  # still live at the provider: said so above


def test_a_grant_without_a_refresh_token_is_refused_naming_the_scopes(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    oauth_server.issue_refresh = False
    tables = provider_settings(oauth_server)
    tables["test"]["scopes"] = ["mail.send"]
    settings = make_settings(oauth=tables)
    token = consent(settings, oauth_server)
    assert token.refresh_token == ""
    add_user(engine, "ann", "password123", addresses=[ADDRESS])
    with pytest.raises(UserError) as refused:
        mailbox.store(engine, settings, "ann", ADDRESS, "test", token)
    assert "gave no refresh token" in str(refused.value)
    assert r'[oauth.test] scopes (add "offline_access"' in str(refused.value)
    assert refused.value.field == "provider"
    assert mailbox.list_connections(engine) == []


def test_a_stored_grant_without_a_refresh_token_breaks_at_its_refresh(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    seal_grant(engine, settings, connection_id, ADDRESS, oauth.Token("at-x", "", 0.0).as_dict())
    mailbox.token_refused(engine, connection_id)
    with pytest.raises(MailboxBroken, match="no refresh token"):
        mailbox.access_token(engine, settings, connection_id)
    assert row_of(engine, connection_id).state == "broken"
    assert oauth_server.refreshes() == 0  # Authlib is never handed an empty one


def test_a_token_answer_without_access_token_is_unavailable_and_kept_as_last_error(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    mailbox.token_refused(engine, connection_id)
    oauth_server.token_answer = {"token_type": "Bearer", "expires_in": 3600}
    with pytest.raises(mailbox.MailboxUnavailable, match="no access_token"):
        mailbox.access_token(engine, settings, connection_id)
    row = row_of(engine, connection_id)
    assert (row.state, row.lease_until) == ("ok", None)
    assert row.last_error == "[oauth.test]: the token answer has no access_token"
    assert row.last_error_at is not None
    oauth_server.token_answer = None  # the provider mends: the grant was fine all along
    mailbox.access_token(engine, settings, connection_id)
    row = row_of(engine, connection_id)
    assert (row.last_error, row.last_error_at) == ("", None)


def test_a_database_error_is_unavailable_in_one_line_without_sql(
    tmp_path: Path, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    empty = create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no schema: SQL fails
    try:
        for call in (mailbox.access_token, lambda e, s, i: mailbox.token_refused(e, i)):
            with pytest.raises(mailbox.MailboxUnavailable) as failed:
                call(empty, settings, 1)
            assert str(failed.value) == (
                "the mailbox connection cannot be read now (OperationalError)"
            )
    finally:
        empty.dispose()


def test_a_refused_client_secret_breaks_nobody_and_mends_with_the_config(
    engine: Engine,
    make_settings: MakeSettings,
    oauth_server: OAuthServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    webhooks.add_endpoint(engine, "https://hooks.example/mail", ["mailbox.disconnected"])
    settings = settings_for(make_settings, oauth_server, notify_from="relay@example.com")
    connection_id = connected(engine, settings, oauth_server)
    oauth_server.clients[CLIENT_ID] = "the-new-secret"  # the old client secret expired
    mailbox.token_refused(engine, connection_id)
    with pytest.raises(mailbox.MailboxMisconfigured) as refused:
        mailbox.access_token(engine, settings, connection_id)
    assert str(refused.value) == (
        "the provider refused the relay's client (invalid_client): "
        "check [oauth.test] client_id/client_secret"
    )
    assert isinstance(refused.value, mailbox.MailboxUnavailable)
    row = row_of(engine, connection_id)
    assert (row.state, row.reason) == ("ok", "")
    assert "[oauth.test] client_id/client_secret" in row.last_error
    with Session(engine) as session:
        assert session.exec(select(OutboxItem)).all() == []  # no webhook, no mail
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "[oauth.test] client_id/client_secret" in record.getMessage()
    tables = provider_settings(oauth_server)
    tables["test"]["client_secret"] = "the-new-secret"  # the operator fixes the table
    fixed = make_settings(oauth=tables, notify_from="relay@example.com")
    access = mailbox.access_token(engine, fixed, connection_id)
    assert oauth_server.is_live(access.token)
    assert row_of(engine, connection_id).last_error == ""


def test_reconnecting_keeps_the_sent_setting(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    settings = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, settings, oauth_server)
    assert row_of(engine, connection_id).sent == "clean"  # a new one: clean
    mailbox.set_sent(engine, connection_id, "leave")
    mailbox.mark_broken(engine, connection_id, "revoked")
    row = mailbox.store(engine, settings, "ann", ADDRESS, "test", consent(settings, oauth_server))
    assert (row.id, row.state, row.sent) == (connection_id, "ok", "leave")
    row = mailbox.store(
        engine, settings, "ann", ADDRESS, "test", consent(settings, oauth_server), "clean"
    )
    assert row.sent == "clean"  # said: set


# --- key rotation: sealing again, conditionally ---


def rotated_settings(make_settings: MakeSettings, server: OAuthServer, old: Settings) -> Settings:
    return settings_for(
        make_settings,
        server,
        secret_key="a-new-secret-key-0123456789abcdef",
        old_secret_keys=old.secret_key.get_secret_value(),
    )


def test_sealing_again_never_writes_back_a_grant_refreshed_meanwhile(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    old = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, old, oauth_server)
    rotated = rotated_settings(make_settings, oauth_server, old)
    stale = row_of(engine, connection_id)  # process A reads the grant under the old key
    mailbox.token_refused(engine, connection_id)
    mailbox.access_token(engine, rotated, connection_id)  # process B refreshes: rotated
    refreshed = row_of(engine, connection_id).grant
    assert not mailbox._reseal(engine, rotated, stale, mailbox.unseal(old, ADDRESS, stale.grant)[0])
    assert row_of(engine, connection_id).grant == refreshed  # B's refresh token stays
    mailbox.token_refused(engine, connection_id)
    only_new = settings_for(make_settings, oauth_server, secret_key=rotated.secret_key)
    assert oauth_server.is_live(mailbox.access_token(engine, only_new, connection_id).token)
    assert row_of(engine, connection_id).state == "ok"
    assert oauth_server.refreshes() == 2


def test_reseal_seals_every_connection_under_the_current_key(
    engine: Engine, make_settings: MakeSettings, oauth_server: OAuthServer
) -> None:
    old = settings_for(make_settings, oauth_server)
    connection_id = connected(engine, old, oauth_server)
    add_user(engine, "bea", "password123", addresses=["bea@example.com"])
    gone = settings_for(make_settings, oauth_server, secret_key="a-key-nobody-lists-any-more-0123")
    token = consent(gone, oauth_server)
    lost = mailbox.store(engine, gone, "bea", "bea@example.com", "test", token)
    rotated = rotated_settings(make_settings, oauth_server, old)
    assert mailbox.reseal(engine, rotated) == mailbox.Resealed(1, 0, ["bea@example.com"])
    assert mailbox.reseal(engine, rotated) == mailbox.Resealed(0, 1, ["bea@example.com"])
    assert row_of(engine, lost.id or 0).state == "ok"  # named, not broken (nobody is told)
    only_new = settings_for(make_settings, oauth_server, secret_key=rotated.secret_key)
    assert mailbox.access_token(engine, only_new, connection_id).token  # opens without old
    assert oauth_server.refreshes() == 0
