"""Where the relay delivers: one client session's way to the upstream.

The SMTP itself (TLS rules, one-attempt AUTH, replies) is shared.smtpclient,
the one client trackrelay has; the DATA content is written by the relay's own
encoder (relay/datawriter.py); dev mode delivers to a Maildir
(relay/maildir.py). What this module adds for a relay:

* One upstream connection serves one client session across its messages; a
  connection dropped between transactions is reopened (and re-authenticated
  with the credentials kept in session memory) at the next MAIL.
* A passthrough AUTH is checked with ONE attempt upstream and, on success,
  kept for those reopenings.
* A mailbox connection (relay/mailboxes.py) logs in with XOAUTH2 and asks
  ``token_source`` for a live access token at each (re)opening, so a token
  that expired during a long session is refreshed, not resent. It asks
  before opening TCP: a broken connection is answered without a connection
  to the provider. A token refused (5xx) is handed back to ``token_source``
  once, for a fresh one, and AUTH is tried once more; a second refusal is
  the caller's to judge (relay/mailboxes.py ``failed``: broken).
* ``close()`` never QUITs between DATA and its content (a client leaving
  mid-delivery closes the session while DATA runs).
* DATA (its content and the reply to the final dot) is given
  ``TRACKRELAY_UPSTREAM_DATA_TIMEOUT`` (600 s), every other command
  ``TRACKRELAY_UPSTREAM_TIMEOUT``. Past it the client gets 451 and retries:
  if the upstream accepted after all, that retry is a second copy, the one
  case no relay that does not queue can rule out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from relay.datawriter import send_data
from relay.headers import Segment
from relay.maildir import MaildirSink
from shared.config import Settings, Upstream
from shared.smtpclient import (
    UNAVAILABLE,
    Capabilities,
    Reply,
    SmtpClient,
    UpstreamUnavailable,
    command,
)

# Replies and capabilities are shared.smtpclient's; named here too for the
# relay modules that know them as the upstream's.
__all__ = [
    "UNAVAILABLE",
    "Capabilities",
    "Connection",
    "LoginRefused",
    "Reply",
    "SmtpUpstream",
    "TokenSource",
    "UpstreamUnavailable",
    "connect",
    "probe",
]

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0


class LoginRefused(UpstreamUnavailable):
    """The mailbox login was refused (after a fresh token, for XOAUTH2); ``reply``
    is the server's."""


#: Called with None for the (user, secret) of a login; with the 5xx reply the last
#: token got, for a fresh one (it raises UpstreamUnavailable when there is none).
TokenSource = Callable[[Reply | None], Awaitable[tuple[bytes, bytes]]]


class Connection(Protocol):
    """One client session's way to the upstream (SMTP server or Maildir sink)."""

    capabilities: Capabilities

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply: ...
    async def mail(self, sender: str, options: Sequence[str]) -> Reply: ...
    async def rcpt(self, recipient: str) -> Reply: ...
    async def data(self, content: Sequence[Segment]) -> Reply: ...
    async def rset(self) -> None: ...
    async def close(self) -> None: ...


def connect(
    settings: Settings,
    *,
    login: tuple[bytes, bytes] | None = None,
    target: Upstream | None = None,
    client_cert: tuple[Path, Path] | None = None,
) -> Connection:
    """A connection object for the configured upstream, or ``target`` (opened lazily),
    presenting ``client_cert`` over TLS when the server asks for one."""
    target = target or settings.upstream_target
    if target.is_sink:
        assert target.path is not None
        return MaildirSink(target.path)
    return SmtpUpstream(settings, target, login=login, client_cert=client_cert)


class SmtpUpstream:
    """An SMTP upstream, TLS required, reopened between transactions."""

    def __init__(
        self,
        settings: Settings,
        target: Upstream,
        *,
        login: tuple[bytes, bytes] | None = None,
        client_cert: tuple[Path, Path] | None = None,
        token_source: TokenSource | None = None,
        mechanism: str = "XOAUTH2",
        mailbox: int | None = None,
    ) -> None:
        """``token_source``: the (user, secret) of each (re)opening's AUTH with
        ``mechanism``: XOAUTH2 with an access token, PLAIN with an app password;
        called with the refusal when the XOAUTH2 token it gave was refused."""
        self.target = target
        self._client_cert = client_cert
        self.capabilities = Capabilities()
        self.mailbox = mailbox  # the mailbox connection this session sends through, if any
        self._settings = settings
        self._login = login
        self._token_source = token_source
        self._mechanism = mechanism if token_source is not None else "PLAIN"
        self._client: SmtpClient | None = None
        self._logged_in: SmtpClient | None = None
        self._in_transaction = False
        self._lock = asyncio.Lock()

    # --- connection ---

    async def _open(self) -> SmtpClient:
        if self._client is not None and self._client.is_connected:
            return self._client
        client = SmtpClient(self._settings, self.target, self._client_cert)
        self.capabilities = await client.connect()
        self._client = client
        self._in_transaction = False
        return client

    async def _reopen_with_login(self) -> SmtpClient:
        if self._token_source is not None:
            return await self._reopen_with_token(self._token_source)
        client = await self._open()
        if self._login is not None and self._logged_in is not client:
            reply = await self._auth(client, self._mechanism, *self._login)
            if not reply.ok:
                log.warning("upstream %s refused the session's login again: %s", self.target, reply)
                raise UpstreamUnavailable(str(reply))
        return client

    async def _reopen_with_token(self, source: TokenSource) -> SmtpClient:
        """The mailbox login: the secret first (no TCP for a broken connection), then
        AUTH; a refused XOAUTH2 token once more with a fresh one."""
        client = self._client
        if client is not None and client.is_connected and self._logged_in is client:
            return client
        user, secret = await source(None)  # raises UpstreamUnavailable with a reply
        client = await self._open()
        reply = await self._auth(client, self._mechanism, user, secret)
        if not reply.ok and reply.code >= 500 and self._mechanism == "XOAUTH2":
            log.info("upstream %s refused the access token (%s): a fresh one", self.target, reply)
            user, secret = await source(reply)
            client = await self._open()  # the same connection, unless the server dropped it
            reply = await self._auth(client, self._mechanism, user, secret)
        if not reply.ok:
            log.warning("upstream %s refused the mailbox login: %s", self.target, reply)
            raise LoginRefused(str(reply), reply)
        return client

    async def _auth(
        self, client: SmtpClient, mechanism: str, username: bytes, password: bytes
    ) -> Reply:
        reply = await client.authenticate(mechanism, username, password)
        if reply.ok:
            self._logged_in = client
            self._mechanism = mechanism
        return reply

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply:
        """Check the client's credentials with one AUTH; on success keep them."""
        client = await self._open()
        reply = await self._auth(client, mechanism, username, password)
        if reply.ok:
            self._login = (username, password)
        return reply

    # --- transactions ---

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        if self._in_transaction:
            await self.rset()
        was_open = self._client is not None and self._client.is_connected
        try:
            client = await self._reopen_with_login()
            return await self._mail(client, sender, options)
        except UpstreamUnavailable:
            if not was_open:
                raise
        # Dropped between transactions (idle timeout upstream): reopen once.
        client = await self._reopen_with_login()
        return await self._mail(client, sender, options)

    async def _mail(self, client: SmtpClient, sender: str, options: Sequence[str]) -> Reply:
        reply = await client.mail(sender, options)
        self._in_transaction = reply.ok
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        return await self._require().rcpt(recipient)

    async def data(self, content: Sequence[Segment]) -> Reply:
        client = self._require()
        self._in_transaction = False
        async with self._lock:  # close() must not QUIT between DATA and its content
            # RFC 5321 4.5.3.2.6: the reply to the final dot may take 10 minutes
            # (a server filtering the message); answering 451 sooner would make
            # the client retry a message the upstream may still accept.
            wait = self._settings.upstream_data_timeout
            return await command(send_data(client.smtp, content, wait))

    async def rset(self) -> None:
        self._in_transaction = False
        if self._client is not None:
            await self._client.rset()

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None:
                await client.close()

    def _require(self) -> SmtpClient:
        if self._client is None or not self._client.is_connected:
            raise UpstreamUnavailable("the upstream connection was lost")
        return self._client


async def probe(settings: Settings, target: Upstream | None = None) -> Capabilities | None:
    """Connect once without logging in, to learn what the upstream (or ``target``) advertises."""
    target = target or settings.upstream_target
    if target.is_sink:
        return Capabilities(smtputf8=True)
    client = SmtpClient(settings, target)
    try:
        return await asyncio.wait_for(client.connect(), PROBE_TIMEOUT)
    except (UpstreamUnavailable, TimeoutError):
        return None
    finally:
        await client.close()
