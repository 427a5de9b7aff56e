"""relay/imapsession.py against a real Dovecot whose oauth2 passdb asks the in-suite
OAuth server's introspection endpoint: XOAUTH2 with the connection's grant."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from relay import imapsession
from shared import mailbox, webhooks
from shared.config import Settings
from shared.models import MailboxConnection, OutboxItem
from shared.users import add_user
from tests.support.dovecot import ANN, APP_PASSWORD, USER, Dovecot
from tests.support.imapkit import connect_ann, imap_provider
from tests.support.oauth_server import OAuthServer
from tests.support.relaykit import MakeSettings
from tests.support.upstream import RecordingUpstream


def test_logs_in_with_the_grant(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)
    before = oauth_server.introspections
    client = imapsession.open_session(
        settings, db_engine, connection, mailbox.provider(settings, "test")
    )
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        imapsession.close(client)
    assert oauth_server.introspections == before + 1  # Dovecot asked the OAuth server
    assert "method=XOAUTH2" in dovecot.log()


def test_a_refused_token_is_refreshed_once(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)
    oauth_server.expire_access_tokens()  # the relay still thinks the token lives
    client = imapsession.open_session(
        settings, db_engine, connection, mailbox.provider(settings, "test")
    )
    imapsession.close(client)
    assert oauth_server.refreshes() == 1


def test_a_revoked_grant_is_broken(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)
    oauth_server.revoke_user("ann@example.com")
    with pytest.raises(mailbox.MailboxBroken):
        imapsession.open_session(
            settings, db_engine, connection, mailbox.provider(settings, "test")
        )


def test_an_unreachable_server_is_unavailable(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)
    dovecot.stop()
    with pytest.raises(imapsession.ImapUnavailable, match="cannot connect"):
        imapsession.open_session(
            settings, db_engine, connection, mailbox.provider(settings, "test")
        )


def test_a_fresh_token_refused_breaks_the_connection_and_says_why(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    """Refused, refreshed, refused again: no expiry (here the grant lacks the IMAP
    scope): broken with the server's words, announced once, never refreshed again."""
    webhooks.add_endpoint(db_engine, "https://hooks.example/mail", ["mailbox.disconnected"])
    dovecot.stop()
    dovecot.scope = "https://outlook.office.com/IMAP.AccessAsUser.All"  # the grant has not
    dovecot.start()
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)
    provider = mailbox.provider(settings, "test")
    with pytest.raises(mailbox.MailboxBroken, match="refused a fresh token over IMAP") as broken:
        imapsession.open_session(settings, db_engine, connection, provider)
    assert "AUTHENTICATIONFAILED" in str(broken.value)  # the server's own words
    assert oauth_server.refreshes() == 1  # refused once, refreshed, refused again
    assert mailbox.imap_connection(db_engine, settings, connection) is None  # not ok
    with pytest.raises(mailbox.MailboxBroken):
        imapsession.open_session(settings, db_engine, connection, provider)
    assert oauth_server.refreshes() == 1  # no loop of refreshes
    with Session(db_engine) as session:
        row = session.get(MailboxConnection, connection)
        assert row is not None
        assert row.state == "broken"
        assert row.reason == str(broken.value)
        items = session.exec(select(OutboxItem)).all()
    assert [item.event_type for item in items] == ["mailbox.disconnected"]  # once


def connect_with_an_app_password(
    make_settings: MakeSettings, upstream: RecordingUpstream, dovecot: Dovecot, engine: Engine
) -> tuple[Settings, int]:
    """Ann's address, logging in as alice with the one app password both servers take."""
    tables = {"fast": {"app_passwords": True, "smtp": upstream.url, "imap": dovecot.url}}
    settings = make_settings(oauth=tables, upstream_verify_tls=False)
    add_user(engine, "ann", "password123", addresses=[ANN])
    row = mailbox.connect_password(engine, settings, "ann", ANN, "fast", APP_PASSWORD, login=USER)
    assert row.id is not None
    return settings, row.id


def test_an_app_password_connection_logs_in_with_login(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    oauth_server: OAuthServer,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    settings, connection = connect_with_an_app_password(make_settings, upstream, dovecot, db_engine)
    dovecot.append("INBOX", b"Subject: for alice\r\n\r\nhi\r\n", user=USER)
    client = imapsession.open_session(
        settings, db_engine, connection, mailbox.provider(settings, "fast")
    )
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 1  # alice's mailbox, by the login
    finally:
        imapsession.close(client)
    assert oauth_server.introspections == 0  # no token anywhere
    assert f"user=<{USER}>, method=PLAIN" in dovecot.log()


def revoke_app_password(settings: Settings, engine: Engine, connection: int) -> None:
    with Session(engine) as session:  # revoked in the account since
        row = session.get(MailboxConnection, connection)
        assert row is not None
        row.grant = mailbox.seal(settings, ANN, {"password": "revoked app password"})
        session.add(row)
        session.commit()


def state(engine: Engine, connection: int) -> str:
    with Session(engine) as session:
        row = session.get(MailboxConnection, connection)
        assert row is not None
        return row.state


def test_an_app_password_refused_by_imap_and_smtp_breaks_the_connection(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    settings, connection = connect_with_an_app_password(make_settings, upstream, dovecot, db_engine)
    revoke_app_password(settings, db_engine, connection)
    upstream.auth_attempts.clear()
    with pytest.raises(mailbox.MailboxBroken, match=r"refused the app password \(IMAP"):
        imapsession.open_session(
            settings, db_engine, connection, mailbox.provider(settings, "fast")
        )
    assert upstream.auth_attempts == [("PLAIN", USER)]  # one trial AUTH at its SMTP
    assert state(db_engine, connection) == "broken"


def test_an_app_password_refused_by_imap_only_keeps_the_connection(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    """IMAP turned off for the account: the password still sends, so nothing breaks."""
    settings, connection = connect_with_an_app_password(make_settings, upstream, dovecot, db_engine)
    dovecot.stop()
    dovecot.app_password = "another password"
    dovecot.start()
    with pytest.raises(imapsession.ImapRefused, match="is IMAP enabled for the account"):
        imapsession.open_session(
            settings, db_engine, connection, mailbox.provider(settings, "fast")
        )
    assert state(db_engine, connection) == "ok"
