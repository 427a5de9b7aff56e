"""A connected mailbox for IMAP tests: ann's grant from the in-suite OAuth server,
with the provider's ``imap`` pointing at the suite's Dovecot (tests/support/dovecot.py),
and ann sending a tracked message to three recipients through the relay; a reply
and a bounce to it.

Fixture (registered through ``pytest_plugins`` in tests/conftest.py): ``anns_mailbox``,
the real servers behind ann's connection, for a test to connect her and send."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from shared import mailbox, oauth
from shared.config import Settings
from shared.users import add_user
from tests.support.dovecot import ANN, APP_PASSWORD, Dovecot
from tests.support.dovecot import USER as DOVECOT_USER
from tests.support.oauth_server import OAuthServer, provider_settings
from tests.support.relaykit import MakeSettings, client, relay_settings, running_relay
from tests.support.upstream import PASSWORD as UPSTREAM_PASSWORD
from tests.support.upstream import USER, RecordingUpstream

PASSWORD = "password123"  # ann's relay password


def imap_provider(
    oauth_server: OAuthServer,
    dovecot: Dovecot,
    smtp: str = "smtp://127.0.0.1:9",
    **options: Any,
) -> dict[str, Any]:
    """The ``oauth`` setting: provider ``test`` with its imap at the suite's Dovecot
    (and OPTIONS, such as ``sent_delete="trash"``)."""
    providers = provider_settings(oauth_server, smtp)
    providers["test"].update(imap=dovecot.url, **options)
    return providers


def connect_ann(
    engine: Engine, settings: Settings, oauth_server: OAuthServer, sent: str = "clean"
) -> int:
    """Relay user ann, sending as ann@example.com through provider ``test``; the row's id."""
    add_user(engine, "ann", PASSWORD, addresses=[ANN])
    found = mailbox.provider(settings, "test")
    device = oauth.start_device(found)
    oauth_server.approve(device.user_code, ANN)
    token = oauth.poll_device(found, device, sleep=lambda _: None)
    row = mailbox.store(engine, settings, "ann", ANN, "test", token, sent=sent)
    assert row.id is not None
    return row.id


def connect_ann_with_a_password(engine: Engine, settings: Settings) -> int:
    """Relay user ann, sending as ann@example.com through provider ``fast`` with
    Dovecot's login alice and her app password; the row's id."""
    add_user(engine, "ann", PASSWORD, addresses=[ANN])
    row = mailbox.connect_password(
        engine, settings, "ann", ANN, "fast", APP_PASSWORD, login=DOVECOT_USER
    )
    assert row.id is not None
    return row.id


RECIPIENTS = ("bob@example.net", "carol@example.net", "dave@example.net")
MESSAGE = (
    b"From: Ann <ann@example.com>\r\n"
    b"To: bob@example.net, carol@example.net, dave@example.net\r\n"
    b"Subject: the plan\r\n"
    b"Date: Tue, 01 Dec 2026 09:30:00 +0000\r\n"
    b"Message-ID: <plan-1@example.com>\r\n"
    b"X-Track: opens, clicks\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b'<html><body><p>Read <a href="https://example.org/plan">the plan</a>.</p></body></html>\r\n'
)


def local_settings(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    providers: dict[str, Any],
    **overrides: Any,
) -> Settings:
    """The relay's settings: local auth, the smarthost account, the ``oauth`` PROVIDERS."""
    return relay_settings(
        make_settings,
        upstream,
        auth_mode="local",
        upstream_user=USER,
        upstream_password=UPSTREAM_PASSWORD,
        public_url="https://t.example.com",
        oauth=providers,
        **overrides,
    )


def settings_for(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
    oauth_server: OAuthServer,
    dovecot: Dovecot,
    provider_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """The relay's settings (local auth), ann's provider ``test`` at PROVIDER and
    Dovecot; OVERRIDES for the relay's, PROVIDER_OPTIONS for the provider's."""
    values: dict[str, Any] = {
        "imap_sent_window": 1.0,
        "imap_sent_interval": 0.1,
        "imap_poll_interval": 0.5,
        **overrides,
    }
    providers = imap_provider(oauth_server, dovecot, provider.url, **(provider_options or {}))
    return local_settings(make_settings, upstream, providers, **values)


async def ann_sends(
    settings: Settings,
    engine: Engine,
    message: bytes = MESSAGE,
    after: Callable[[str], Awaitable[None]] | None = None,
) -> str:
    """The DATA reply; AFTER (given it) runs before the relay stops."""
    async with running_relay(settings, engine) as relay, client(relay) as smtp:
        await smtp.ehlo()
        await smtp.auth_plain("ann", PASSWORD)
        await smtp.mail(ANN)
        for rcpt in RECIPIENTS:
            await smtp.rcpt(rcpt)
        reply = await smtp.data(message)
        if after is not None:
            await after(reply.message)
        return reply.message  # stop() waits for the Sent folder's cleaning


@dataclass
class Sent:
    """What ann's sending left: the relay's settings, the provider and the DATA reply."""

    settings: Settings
    provider: RecordingUpstream
    reply: str


@dataclass
class AnnsMailbox:
    """The real servers behind ann's mailbox connection: the relay's upstream, the
    provider's submission server and OAuth server, her Dovecot."""

    make_settings: MakeSettings
    upstream: RecordingUpstream
    tls_pair: tuple[Path, Path]
    oauth_server: OAuthServer
    dovecot: Dovecot

    @contextlib.contextmanager
    def provider(
        self, files: str | None = None, *, app_passwords: bool = False
    ) -> Iterator[RecordingUpstream]:
        """The provider's submission server (XOAUTH2 only; with APP_PASSWORDS, PLAIN/LOGIN
        for the upstream's USER/PASSWORD only), running for the ``with`` block; FILES
        given, it files what it takes into Dovecot's Sent ("every" copy, as Microsoft
        365 does, or the "first" per Message-ID, as Gmail does)."""
        provider = RecordingUpstream(
            *self.tls_pair,
            oauth=None if app_passwords else self.oauth_server,
            files_into=None if files is None else self.dovecot,
            files_sent=files or "every",
        ).start()
        try:
            yield provider
        finally:
            provider.stop()

    def serve_env(self, provider: RecordingUpstream, sent_window: str = "1") -> dict[str, str]:
        """What settings_for sets, for ``trackrelay serve`` in a process
        (tests/e2e/test_serve.py)."""
        return {
            "TRACKRELAY_UPSTREAM": self.upstream.url,
            "TRACKRELAY_UPSTREAM_VERIFY_TLS": "false",
            "TRACKRELAY_UPSTREAM_USER": USER,
            "TRACKRELAY_UPSTREAM_PASSWORD": UPSTREAM_PASSWORD,
            "TRACKRELAY_AUTH_MODE": "local",
            "TRACKRELAY_TLS_CERT": str(self.upstream.cert),
            "TRACKRELAY_TLS_KEY": str(self.upstream.key),
            "TRACKRELAY_OAUTH": json.dumps(
                imap_provider(self.oauth_server, self.dovecot, provider.url)
            ),
            "TRACKRELAY_IMAP_SENT_WINDOW": sent_window,
            "TRACKRELAY_IMAP_SENT_INTERVAL": "0.2",
            "TRACKRELAY_IMAP_POLL_INTERVAL": "0.5",
        }

    @contextlib.contextmanager
    def sent(
        self,
        engine: Engine,
        files: str | None = None,
        *,
        sent: str = "clean",
        provider_options: dict[str, Any] | None = None,
        after: Callable[[str], Awaitable[None]] | None = None,
        **overrides: Any,
    ) -> Iterator[Sent]:
        """ann connected (her ``sent`` choice) and MESSAGE sent through the relay, the
        provider running for the ``with`` block; FILES: the provider files into Sent
        ("every" or "first"); the rest as in settings_for and ann_sends."""
        with self.provider(files) as provider:
            settings = settings_for(
                self.make_settings,
                self.upstream,
                provider,
                self.oauth_server,
                self.dovecot,
                provider_options,
                **overrides,
            )
            connect_ann(engine, settings, self.oauth_server, sent)
            reply = asyncio.run(ann_sends(settings, engine, after=after))
            yield Sent(settings, provider, reply)

    @contextlib.contextmanager
    def sent_with_a_password(
        self, engine: Engine, files: str | None = None, **overrides: Any
    ) -> Iterator[Sent]:
        """As ``sent``, with ann's connection an app-password one: provider ``fast``
        takes app passwords only (AUTH PLAIN to send as Dovecot's alice, IMAP LOGIN
        to her mailbox); OVERRIDES are all the relay's settings beyond local_settings."""
        with self.provider(files, app_passwords=True) as provider:
            fast = {"app_passwords": True, "smtp": provider.url, "imap": self.dovecot.url}
            settings = local_settings(
                self.make_settings, self.upstream, {"fast": fast}, **overrides
            )
            connect_ann_with_a_password(engine, settings)
            reply = asyncio.run(ann_sends(settings, engine))
            yield Sent(settings, provider, reply)


@pytest.fixture
def anns_mailbox(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tls_pair: tuple[Path, Path],
    oauth_server: OAuthServer,
    dovecot: Dovecot,
) -> AnnsMailbox:
    return AnnsMailbox(make_settings, upstream, tls_pair, oauth_server, dovecot)


REPLY = (
    b"From: Bob <bob@example.net>\r\n"
    b"To: Ann <ann@example.com>\r\n"
    b"Subject: Re: the plan\r\n"
    b"Message-ID: <reply-1@example.net>\r\n"
    b"In-Reply-To: <plan-1@example.com>\r\n"
    b"References: <plan-1@example.com>\r\n"
    b"\r\n"
    b"Sounds good.\r\n"
)
BOUNCE = (
    b"From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\r\n"
    b"To: ann@example.com\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Message-ID: <bounce-1@mx.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
    b"\r\n"
    b"--b\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Your message could not be delivered.\r\n"
    b"--b\r\n"
    b"Content-Type: message/delivery-status\r\n"
    b"\r\n"
    b"Reporting-MTA: dns; mx.example.com\r\n"
    b"\r\n"
    b"Original-Recipient: rfc822;carol@example.net\r\n"
    b"Final-Recipient: rfc822;carol@example.net\r\n"
    b"Action: failed\r\n"
    b"Status: 5.1.1\r\n"
    b"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
    b"\r\n"
    b"--b\r\n"
    b"Content-Type: text/rfc822-headers\r\n"
    b"\r\n"
    b"Message-ID: <plan-1@example.com>\r\n"
    b"Subject: the plan\r\n"
    b"--b--\r\n"
)
