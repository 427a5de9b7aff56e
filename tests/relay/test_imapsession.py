"""relay/imapsession.py against a real Dovecot whose oauth2 passdb asks the in-suite
OAuth server's introspection endpoint: XOAUTH2 with the connection's grant."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from relay import imapsession
from shared import mailbox
from shared.config import Settings
from shared.models import MailboxConnection
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


def test_a_grant_without_the_imap_scope_is_refused_not_broken(
    make_settings: MakeSettings, oauth_server: OAuthServer, dovecot: Dovecot, db_engine: Engine
) -> None:
    dovecot.stop()
    dovecot.scope = "https://outlook.office.com/IMAP.AccessAsUser.All"  # the grant has not
    dovecot.start()
    settings = make_settings(oauth=imap_provider(oauth_server, dovecot))
    connection = connect_ann(db_engine, settings, oauth_server)
    with pytest.raises(imapsession.ImapRefused, match="IMAP scope"):
        imapsession.open_session(
            settings, db_engine, connection, mailbox.provider(settings, "test")
        )
    assert oauth_server.refreshes() == 1  # refused once, refreshed, refused again
    found = mailbox.imap_connection(db_engine, settings, connection)
    assert found is not None  # still ok: it may send
    dovecot.stop()
    dovecot.scope = "mail.send"  # one the grant has: the same check lets it in
    dovecot.start()
    imapsession.close(imapsession.open_session(settings, db_engine, connection, found.provider))


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


def test_a_refused_app_password_is_imap_refused_once(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    dovecot: Dovecot,
    db_engine: Engine,
) -> None:
    settings, connection = connect_with_an_app_password(make_settings, upstream, dovecot, db_engine)
    with Session(db_engine) as session:  # revoked in the account since
        row = session.get(MailboxConnection, connection)
        assert row is not None
        row.grant = mailbox.seal(settings, ANN, {"password": "revoked app password"})
        session.add(row)
        session.commit()
    with pytest.raises(imapsession.ImapRefused, match=f"refused the app password of {USER}"):
        imapsession.open_session(
            settings, db_engine, connection, mailbox.provider(settings, "fast")
        )
    with Session(db_engine) as session:  # sending finds out; IMAP alone breaks nothing
        row = session.get(MailboxConnection, connection)
        assert row is not None
        assert row.state == "ok"
