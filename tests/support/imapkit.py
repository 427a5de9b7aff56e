"""A connected mailbox for IMAP tests: ann's grant from the in-suite OAuth server,
with the provider's ``imap`` pointing at the suite's Dovecot (tests/support/dovecot.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from shared import mailbox, oauth
from shared.config import Settings
from shared.users import add_user
from tests.support.dovecot import ANN, Dovecot
from tests.support.oauth_server import OAuthServer, provider_settings

PASSWORD = "password123"  # ann's relay password


def imap_provider(
    oauth_server: OAuthServer, dovecot: Dovecot, smtp: str = "smtp://127.0.0.1:9"
) -> dict[str, Any]:
    """The ``oauth`` setting: provider ``test`` with its imap at the suite's Dovecot."""
    providers = provider_settings(oauth_server, smtp)
    providers["test"]["imap"] = dovecot.url
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
