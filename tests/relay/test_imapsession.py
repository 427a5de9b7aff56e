"""relay/imapsession.py against a real Dovecot whose oauth2 passdb asks the in-suite
OAuth server's introspection endpoint: XOAUTH2 with the connection's grant."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from relay import imapsession
from shared import mailbox
from tests.support.dovecot import Dovecot
from tests.support.imapkit import connect_ann, imap_provider
from tests.support.oauth_server import OAuthServer
from tests.support.relaykit import MakeSettings


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
