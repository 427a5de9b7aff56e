"""Local mode: mail from a connected address goes out through its mailbox, end to end.

Two real upstreams on loopback: the shared smarthost (password AUTH) and the
provider's submission server, OAuth only like Microsoft 365 (tests/support/
upstream.py with ``oauth``), whose tokens the in-suite OAuth server issues and
introspects. The relay runs in the test's loop (tests/support/relaykit.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import Engine, create_engine
from sqlmodel import Session, select

from relay import mailboxes
from relay.server import RelayServer
from relay.upstream import UpstreamUnavailable
from shared import mailbox, oauth, webhooks
from shared.config import Settings
from shared.models import MailboxConnection, OutboxItem
from shared.users import add_user
from tests.support.oauth_server import CLIENT_SECRET, OAuthServer, provider_settings
from tests.support.relaykit import MakeSettings, client, relay_settings, running_relay, send
from tests.support.seedrows import row_of, seal_grant
from tests.support.upstream import PASSWORD, SMTP_AUTH_DISABLED, USER, RecordingUpstream

ANN = "ann@example.com"
OTHER = "ann@example.org"  # also hers, not connected: the smarthost
MESSAGE = b"From: ann@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def provider(tls_pair: tuple[Path, Path], oauth_server: OAuthServer) -> Iterator[RecordingUpstream]:
    server = RecordingUpstream(*tls_pair, oauth=oauth_server).start()
    yield server
    server.stop()


def local_settings(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    oauth: dict[str, dict[str, Any]],
    **overrides: Any,
) -> Settings:
    """Local mode with the smarthost account USER and the provider tables OAUTH."""
    return relay_settings(
        make_settings, upstream, auth_mode="local", upstream_user=USER, oauth=oauth, **overrides
    )


def oauth_settings(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    oauth_server: OAuthServer,
    smtp: str,
    **overrides: Any,
) -> Settings:
    """local_settings with the in-suite OAuth server's provider ``test`` on SMTP."""
    return local_settings(
        make_settings, upstream, provider_settings(oauth_server, smtp), **overrides
    )


def connect_ann(engine: Engine, settings: Settings, oauth_server: OAuthServer) -> int:
    add_user(engine, "ann", "password123", addresses=[ANN, OTHER])
    found = mailbox.provider(settings, "test")
    device = oauth.start_device(found)
    oauth_server.approve(device.user_code, ANN)
    token = oauth.poll_device(found, device, sleep=lambda _: None)
    row = mailbox.store(engine, settings, "ann", ANN, "test", token)
    assert row.id is not None
    return row.id


async def ann_sends(relay: RelayServer, sender: str = ANN) -> aiosmtplib.SMTPResponse:
    return await send(relay, MESSAGE, sender=sender, user="ann", password="password123")


async def ann_refused(relay: RelayServer) -> aiosmtplib.SMTPSenderRefused:
    """Ann's message from ANN, which the relay must refuse at MAIL FROM."""
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await ann_sends(relay)
    return refused.value


def refusals(settings: Settings, engine: Engine, times: int) -> list[aiosmtplib.SMTPSenderRefused]:
    """One relay on SETTINGS refusing Ann's message TIMES times in a row."""

    async def go() -> list[aiosmtplib.SMTPSenderRefused]:
        async with running_relay(settings, engine) as relay:
            return [await ann_refused(relay) for _ in range(times)]

    return asyncio.run(go())


def both_addresses_sent(settings: Settings, engine: Engine) -> None:
    """Ann sends from ANN (connected) and from OTHER (the smarthost): both 250."""

    async def go() -> None:
        async with running_relay(settings, engine) as relay:
            assert (await ann_sends(relay)).code == 250
            assert (await ann_sends(relay, OTHER)).code == 250

    asyncio.run(go())


def test_a_connected_address_goes_through_its_mailbox(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    settings = oauth_settings(
        make_settings, upstream, oauth_server, provider.url, upstream_password=PASSWORD
    )
    connect_ann(db_engine, settings, oauth_server)
    both_addresses_sent(settings, db_engine)
    assert [m.mail_from for m in provider.messages] == [ANN]
    assert provider.auth_attempts == [("XOAUTH2", ANN)]  # one AUTH, with the token
    assert [m.mail_from for m in upstream.messages] == [OTHER]
    assert upstream.auth_attempts == [("PLAIN", USER)]  # the smarthost account
    assert oauth_server.introspections == 1


def test_a_due_token_is_refreshed_before_the_login(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    oauth_server.access_ttl = 60  # inside the refresh margin: due at every login
    settings = oauth_settings(make_settings, upstream, oauth_server, provider.url)
    connect_ann(db_engine, settings, oauth_server)

    async def go() -> None:
        async with running_relay(settings, db_engine) as relay:
            for _ in range(2):
                assert (await ann_sends(relay)).code == 250

    asyncio.run(go())
    assert len(provider.messages) == 2
    assert oauth_server.refreshes() == 2  # one per session, each rotating the refresh token
    assert len(oauth_server.refresh) == 1


def test_a_revoked_grant_is_454_naming_the_mailbox_page_and_nothing_is_lost(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    settings = oauth_settings(make_settings, upstream, oauth_server, provider.url)
    connection_id = connect_ann(db_engine, settings, oauth_server)
    oauth_server.revoke_user(ANN)  # the relay still holds an access token it thinks is live

    # the refused token refreshed at once: invalid_grant, broken
    for refusal in refusals(settings, db_engine, 3):
        assert refusal.code == 454
        assert refusal.message.startswith("4.7.0 Mailbox connection of ann@example.com")
        assert "no longer accepts the grant" in refusal.message
        assert "Mailbox page of the dashboard" in refusal.message
    assert provider.messages == []
    assert upstream.messages == []  # never sent another way either
    assert provider.auth_attempts == [("XOAUTH2", ANN)]  # one AUTH; then it is known broken
    assert provider.connections == 1  # the broken connection's 454s opened none
    assert oauth_server.refreshes() == 1
    with Session(db_engine) as session:
        row = session.exec(select(MailboxConnection)).one()
    assert row.id == connection_id
    assert row.state == "broken"


def test_a_token_expiring_mid_session_is_refreshed_at_the_reopening(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    """One client session, two messages; between them the provider drops the idle
    connection and the token has expired: the reopening logs in with a new token."""
    settings = oauth_settings(make_settings, upstream, oauth_server, provider.url)
    connect_ann(db_engine, settings, oauth_server)

    async def go() -> None:
        async with running_relay(settings, db_engine) as relay, client(relay) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain("ann", "password123")
            await smtp.sendmail(ANN, ["bob@example.net"], MESSAGE)
            oauth_server.expire_access_tokens()
            with Session(db_engine) as session:  # the relay learns it as it would by the clock
                row = session.exec(select(MailboxConnection)).one()
                assert row.id is not None
            mailbox.token_refused(db_engine, row.id)
            await asyncio.to_thread(provider.drop_connections)
            await smtp.sendmail(ANN, ["carol@example.net"], MESSAGE)

    asyncio.run(go())
    assert [m.rcpt_tos for m in provider.messages] == [["bob@example.net"], ["carol@example.net"]]
    assert provider.auth_attempts == [("XOAUTH2", ANN), ("XOAUTH2", ANN)]
    assert oauth_server.refreshes() == 1
    assert oauth_server.introspections == 2  # two logins, each with a live token


def test_an_unreadable_database_is_451_not_the_shared_account(
    make_settings: MakeSettings, upstream: RecordingUpstream, oauth_server: OAuthServer
) -> None:
    settings = oauth_settings(make_settings, upstream, oauth_server, upstream.url)
    gone = create_engine("sqlite:////nonexistent-directory/relay.db")
    with pytest.raises(UpstreamUnavailable):
        asyncio.run(mailboxes.find(settings, gone, "ann", ANN))
    gone.dispose()


def test_a_connection_whose_provider_left_the_config_is_454(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    tables = provider_settings(oauth_server, provider.url)
    settings = local_settings(make_settings, upstream, tables)
    connect_ann(db_engine, settings, oauth_server)
    tables["other"] = tables.pop("test")
    settings = local_settings(make_settings, upstream, tables)
    (refused,) = refusals(settings, db_engine, 1)
    assert refused.code == 454
    assert "[oauth.test] is not in the config" in refused.message
    assert upstream.messages == []
    assert provider.messages == []


# --- app passwords: a second recording upstream without oauth is the provider ---


@pytest.fixture
def password_provider(tls_pair: tuple[Path, Path]) -> Iterator[RecordingUpstream]:
    server = RecordingUpstream(*tls_pair).start()  # PLAIN/LOGIN for USER/PASSWORD
    yield server
    server.stop()


def password_settings(
    make_settings: MakeSettings, upstream: RecordingUpstream, provider: RecordingUpstream
) -> Settings:
    fast = {"fast": {"app_passwords": True, "smtp": provider.url}}
    return local_settings(make_settings, upstream, fast, upstream_password=PASSWORD)


def connect_ann_with_a_password(engine: Engine, settings: Settings) -> int:
    add_user(engine, "ann", "password123", addresses=[ANN, OTHER])
    row = mailbox.connect_password(engine, settings, "ann", ANN, "fast", PASSWORD, login=USER)
    assert row.id is not None
    return row.id


def test_an_app_password_connection_sends_through_its_mailbox(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    password_provider: RecordingUpstream,
    db_engine: Engine,
) -> None:
    settings = password_settings(make_settings, upstream, password_provider)
    connect_ann_with_a_password(db_engine, settings)
    password_provider.auth_attempts.clear()  # the trial login at connect time
    both_addresses_sent(settings, db_engine)
    assert [m.mail_from for m in password_provider.messages] == [ANN]
    assert password_provider.auth_attempts == [("PLAIN", USER)]  # one AUTH, the login
    assert [m.mail_from for m in upstream.messages] == [OTHER]


def test_a_refused_app_password_is_broken_454_and_announced(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    password_provider: RecordingUpstream,
    db_engine: Engine,
) -> None:
    webhooks.add_endpoint(db_engine, "https://hooks.example/mail", ["mailbox.disconnected"])
    settings = password_settings(make_settings, upstream, password_provider)
    connection_id = connect_ann_with_a_password(db_engine, settings)
    # revoked in the account since: the provider says 535
    seal_grant(db_engine, settings, connection_id, ANN, {"password": "revoked app password"})
    password_provider.auth_attempts.clear()

    refused, still = refusals(settings, db_engine, 2)
    for refusal in (refused, still):
        assert refusal.code == 454
        assert refusal.message.startswith("4.7.0 Mailbox connection of ann@example.com")
        assert "refused the app password" in refusal.message
        assert "Mailbox page of the dashboard" in refusal.message
    assert password_provider.auth_attempts == [("PLAIN", USER)]  # one; then known broken
    assert password_provider.messages == []
    assert upstream.messages == []  # never the shared account instead
    row = row_of(db_engine, connection_id)
    assert row.state == "broken"
    assert row.reason.startswith("the provider refused the app password: 535")
    with Session(db_engine) as session:
        items = session.exec(select(OutboxItem)).all()
    assert [item.event_type for item in items] == ["mailbox.disconnected"]
    assert "revoked app password" not in items[0].payload
    assert mailbox.broken_of(db_engine, row.user_id) == [ANN]  # the dashboard's banner


def test_an_app_password_whose_provider_stopped_taking_them_is_454(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    password_provider: RecordingUpstream,
    db_engine: Engine,
) -> None:
    connect_ann_with_a_password(
        db_engine, password_settings(make_settings, upstream, password_provider)
    )
    password_provider.auth_attempts.clear()
    settings = local_settings(
        make_settings,
        upstream,
        {"fast": {"app_passwords": False, "issuer": "https://id.example", "client_id": "c",
                  "smtp": password_provider.url}},
    )  # fmt: skip
    (refused,) = refusals(settings, db_engine, 1)
    assert refused.code == 454
    assert "[oauth.fast] no longer takes app passwords" in refused.message
    assert password_provider.auth_attempts == []
    assert upstream.messages == []


# --- a token refused right after a refresh; transient failures ---


def test_a_fresh_token_refused_at_auth_breaks_the_connection_once(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    """Microsoft 365 with SMTP AUTH off for the tenant: the token is live, refreshed
    it is refused again, so it is no expiry: broken with the provider's words, the
    webhook once, and no more refreshes nor logins."""
    webhooks.add_endpoint(db_engine, "https://hooks.example/mail", ["mailbox.disconnected"])
    provider.refuse_tokens = SMTP_AUTH_DISABLED
    settings = oauth_settings(make_settings, upstream, oauth_server, provider.url)
    connection_id = connect_ann(db_engine, settings, oauth_server)

    first, second = refusals(settings, db_engine, 2)
    for refusal in (first, second):
        assert refusal.code == 454
        assert "the provider refused a fresh token: 535 5.7.139" in refusal.message
        assert "Mailbox page of the dashboard" in refusal.message
    assert provider.auth_attempts == [("XOAUTH2", ANN), ("XOAUTH2", ANN)]  # then known broken
    assert provider.connections == 1
    assert oauth_server.refreshes() == 1  # one fresh token, never a loop
    assert provider.messages == []
    assert upstream.messages == []
    row = row_of(db_engine, connection_id)
    assert row.state == "broken"
    assert "SmtpClientAuthentication is disabled for the Tenant" in row.reason
    with Session(db_engine) as session:
        items = session.exec(select(OutboxItem)).all()
    assert [item.event_type for item in items] == ["mailbox.disconnected"]


def test_a_token_the_provider_retired_early_is_refreshed_in_the_same_try(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    settings = oauth_settings(make_settings, upstream, oauth_server, provider.url)
    connect_ann(db_engine, settings, oauth_server)
    oauth_server.expire_access_tokens()  # the relay thinks it lives; the provider does not

    async def go() -> None:
        async with running_relay(settings, db_engine) as relay:
            assert (await ann_sends(relay)).code == 250

    asyncio.run(go())
    assert len(provider.messages) == 1
    assert provider.auth_attempts == [("XOAUTH2", ANN), ("XOAUTH2", ANN)]
    assert oauth_server.refreshes() == 1


def test_an_unreachable_provider_is_451_naming_it_without_reconnecting(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    nobody = "smtp+starttls://127.0.0.1:9"  # nobody there
    settings = oauth_settings(make_settings, upstream, oauth_server, nobody)
    connection_id = connect_ann(db_engine, settings, oauth_server)

    for refusal in refusals(settings, db_engine, 2):
        assert refusal.code == 451
        assert refusal.message.startswith("4.4.1 Mailbox provider test of ann@example.com")
        assert "127.0.0.1:9" in refusal.message
        assert "try again later" in refusal.message
        assert "Mailbox page" not in refusal.message  # reconnecting would not help
    assert upstream.messages == []  # never the shared account instead
    assert row_of(db_engine, connection_id).state == "ok"


def test_an_unreachable_token_endpoint_is_451_without_reconnecting(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    tables = provider_settings(oauth_server, provider.url)
    settings = local_settings(make_settings, upstream, tables)
    connection_id = connect_ann(db_engine, settings, oauth_server)
    mailbox.token_refused(db_engine, connection_id)  # due: the relay must refresh
    tables["test"]["token_endpoint"] = "http://127.0.0.1:9/token"  # down now
    settings = local_settings(make_settings, upstream, tables)

    for refusal in refusals(settings, db_engine, 2):
        assert refusal.code == 451
        assert "Mailbox provider test of ann@example.com cannot be reached now" in refusal.message
        assert "its token endpoint" in refusal.message
        assert "Mailbox page" not in refusal.message
    assert provider.connections == 0  # the token first, then the connection
    assert row_of(db_engine, connection_id).state == "ok"


def test_a_refused_client_secret_is_454_for_ops_and_breaks_no_connection(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    db_engine: Engine,
) -> None:
    def settings_with(secret: str) -> Settings:
        tables = provider_settings(oauth_server, provider.url)
        tables["test"]["client_secret"] = secret
        return local_settings(make_settings, upstream, tables)

    fixed = settings_with(CLIENT_SECRET)
    connection_id = connect_ann(db_engine, fixed, oauth_server)
    expired = settings_with("a-client-secret-that-expired")  # the provider refuses it now
    mailbox.token_refused(db_engine, connection_id)  # due for a refresh

    async def go(settings: Settings) -> aiosmtplib.SMTPResponse | aiosmtplib.SMTPSenderRefused:
        async with running_relay(settings, db_engine) as relay:
            try:
                return await ann_sends(relay)
            except aiosmtplib.SMTPSenderRefused as refused:
                return refused

    refused = asyncio.run(go(expired))
    assert isinstance(refused, aiosmtplib.SMTPSenderRefused)
    assert refused.code == 454  # for ops, not a transient 451: retrying will not mend it
    assert refused.message.startswith("4.7.0 ")
    assert "[oauth.test] client_id/client_secret" in refused.message
    with Session(db_engine) as session:
        assert session.exec(select(MailboxConnection.state)).one() == "ok"
        assert session.exec(select(OutboxItem)).all() == []  # nobody is told
    sent = asyncio.run(go(fixed))  # ops fixed the table: no reconnecting
    assert sent.code == 250
    assert [m.mail_from for m in provider.messages] == [ANN]
