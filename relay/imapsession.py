"""Speaking IMAP with a mailbox connection's grant: the one owner.

The Sent folder's cleaner (relay/sentfolder.py) and the INBOX watcher
(relay/inboxwatch.py) get their session here: the provider's ``imap`` URL
(shared/oauthproviders.py; ``imaps://`` with a verified certificate, or
plaintext ``imap://`` to a loopback address only), and ``AUTHENTICATE
XOAUTH2`` with the connection's live access token from shared/mailbox.py. A
token the server refuses is marked refused (shared/mailbox.py
``token_refused``), refreshed and tried once more; a fresh token refused too
is no expiry (the grant lacks the IMAP scope, ``IMAP.AccessAsUser.All`` at
Microsoft, ``https://mail.google.com/`` at Google; IMAP disabled for the
tenant; consent by another account): the connection is marked broken with
the server's words (``mark_broken``: banner, webhook, mail, once), since
without IMAP its Sent folder keeps recipient 1's pixel and its INBOX goes
unread, and reconnecting with the IMAP scope is what cures it. Never
refreshed a second time.

An app-password connection (shared/mailbox.py ``method = password``) logs in
with IMAP ``LOGIN`` of its login and password instead, once. A refused
password breaks the connection only when the provider's SMTP refuses it too
(one trial AUTH, shared/mailbox.py ``try_password``): an account can have
IMAP turned off (Gmail's setting, Outlook.com) with the password good for
sending, and sending must not stop for that; then it is
:class:`ImapRefused`, the connection stays ``ok``.

The client is IMAPClient (blocking): callers run it in a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from sqlalchemy import Engine

from shared import mailbox
from shared.config import Settings
from shared.errors import UserError
from shared.oauthproviders import OAuthProvider

#: What can go wrong on the wire (refused connection, timeout, TLS, a server's BAD/NO).
WIRE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ssl.SSLError,
    IMAPClient.Error,
    IMAPClient.AbortError,
)


class ImapUnavailable(Exception):
    """The IMAP server could not be reached or failed: try again later."""


class ImapRefused(Exception):
    """The IMAP server refused the app password that the provider's SMTP still takes
    (IMAP turned off for the account): the connection stays ``ok``."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'imaps' if self.tls else 'imap'}://{self.host}:{self.port}"


def target(provider: OAuthProvider) -> Target | None:
    """Where the provider's IMAP server is; None when its table names none."""
    if not provider.imap:
        return None
    parts = urlsplit(provider.imap)
    tls = parts.scheme == "imaps"
    return Target(parts.hostname or "", parts.port or (993 if tls else 143), tls)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _context(settings: Settings, where: Target) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if _loopback(where.host) and not settings.upstream_verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _connect(settings: Settings, where: Target) -> IMAPClient:
    try:
        return IMAPClient(
            where.host,
            port=where.port,
            ssl=where.tls,
            ssl_context=_context(settings, where) if where.tls else None,
            timeout=settings.imap_timeout,
        )
    except WIRE_ERRORS as exc:
        raise ImapUnavailable(f"cannot connect to {where}: {exc}") from None


def close(client: IMAPClient) -> None:
    """Log out, or at least close the socket (never raises)."""
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            return


def open_session(
    settings: Settings, engine: Engine, connection_id: int, provider: OAuthProvider
) -> IMAPClient:
    """A session logged in with the connection's grant (or its app password).

    MailboxBroken / MailboxUnavailable from shared/mailbox.py (the grant; a
    fresh token refused marks it broken first); ImapUnavailable (the server);
    ImapRefused (the app password, which SMTP still takes).
    """
    where = target(provider)
    if where is None:
        raise ImapUnavailable("the provider's table names no imap server")
    for attempt in (1, 2):
        access = mailbox.access_token(engine, settings, connection_id)
        client = _connect(settings, where)
        try:
            if access.mechanism == "PLAIN":  # an app password: IMAP LOGIN, one attempt
                client.login(access.address, access.token)
            else:
                client.oauth2_login(access.address, access.token)
        except LoginError as exc:
            close(client)
            words = _words(exc)
            if access.mechanism == "PLAIN":
                _password_refused(settings, engine, connection_id, provider, access, where, words)
            if attempt == 2:
                reason = (
                    f"the provider refused a fresh token over IMAP ({where}: {words}); "
                    "does the grant have the IMAP scope?"
                )
                _broken(settings, engine, connection_id, reason)
            mailbox.token_refused(engine, connection_id)  # refreshed at the next access_token
            continue
        except WIRE_ERRORS as exc:
            close(client)
            raise ImapUnavailable(f"{where} failed at login: {exc}") from None
        return client
    raise AssertionError("unreachable: the second refusal raised")


def _password_refused(
    settings: Settings,
    engine: Engine,
    connection_id: int,
    provider: OAuthProvider,
    access: mailbox.Access,
    where: Target,
    words: str,
) -> NoReturn:
    """IMAP refused the app password: broken if SMTP refuses it too, else ImapRefused."""
    try:
        asyncio.run(mailbox.try_password(settings, provider, access.address, access.token))
    except UserError as exc:
        if exc.field != "password":  # SMTP cannot be asked now: nothing known
            raise ImapUnavailable(
                f"{where} refused the app password of {access.address} ({words}), "
                f"and SMTP cannot be asked: {exc}"
            ) from None
        reason = f"the provider refused the app password (IMAP {where}: {words}; SMTP too)"
        _broken(settings, engine, connection_id, reason)
    raise ImapRefused(
        f"{where} refused the app password of {access.address} ({words}) that SMTP takes: "
        "is IMAP enabled for the account?"
    )


def _broken(settings: Settings, engine: Engine, connection_id: int, reason: str) -> NoReturn:
    mailbox.mark_broken(engine, connection_id, reason, notify_email=bool(settings.notify_from))
    raise mailbox.MailboxBroken(reason)


def _words(exc: BaseException) -> str:
    """The server's own words from a LoginError (imaplib's repr of the NO line)."""
    text = str(exc).strip()
    found = re.fullmatch(r"b'(.*)'|b\"(.*)\"", text)
    if found:
        text = found.group(1) or found.group(2) or text
    return " ".join(text.split())[:160] or "refused"
