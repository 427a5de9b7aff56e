"""A recording upstream SMTP server for tests: what the relay delivered, byte for byte.

It is a real aiosmtpd server made with ``loop.create_server`` on 127.0.0.1,
port 0, running its own event loop in a thread (so sync and async tests, and
relays in subprocesses, can all use it). It speaks STARTTLS with a self-signed
certificate and requires AUTH (PLAIN or LOGIN) for :data:`USER` /
:data:`PASSWORD`, counting every attempt (``require_auth=False``: none, as a
gateway's return path or an MTA's last hop needs). Behaviour can be changed per test:
refuse some recipients, answer DATA with a given reply, answer slowly, or
drop the connection in the middle of DATA.

With ``oauth`` set to the in-suite OAuth server (tests/support/oauth_server.py)
it behaves like Microsoft 365 without basic authentication: password AUTH is
refused with ``535 5.7.139``, and only SASL XOAUTH2 or OAUTHBEARER with an
access token the OAuth server's introspection endpoint says is active, for
the account named in the SASL message, logs in (a refused token gets the
334 JSON error challenge, then ``535 5.7.3``). ``refuse_tokens`` set: every
token, live or not, gets that reply instead (a tenant with SMTP AUTH off).

With ``files_into`` set to the suite's Dovecot (tests/support/dovecot.py) it
files what it accepted into the sender's Sent folder (IMAP APPEND, seen),
the way the provider does: ``files_sent = "every"`` each copy (Microsoft 365,
so per-recipient copies put N tracked copies in Sent Items), ``"first"`` the
first copy of each Message-ID only (Gmail).

Fixtures (registered through ``pytest_plugins`` in conftest.py):

* ``tls_pair``: (cert, key) paths of a self-signed certificate, per session.
* ``upstream``: a started :class:`RecordingUpstream`; ``upstream.url`` is what
  ``TRACKRELAY_UPSTREAM`` should be, with ``upstream_verify_tls=False``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import json
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.tlscert import write_self_signed
from tests.support.dovecot import SENT, Dovecot
from tests.support.oauth_server import CLIENT_ID, CLIENT_SECRET, OAuthServer

USER = "alice@example.com"
PASSWORD = "correct horse battery"
BASIC_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
TOKEN_REFUSED = "535 5.7.3 Authentication unsuccessful"
SMTP_AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    peercert: dict[str, Any] | None = None  # the client's TLS certificate, if it showed one


@dataclass
class RecordingUpstream:
    cert: Path
    key: Path
    smtputf8: bool = True
    size: int | None = None
    refuse: dict[str, str] = field(default_factory=dict)  # RCPT address -> reply
    data_reply: str | None = None  # e.g. "554-5.7.1 first\r\n554 5.7.1 second"
    data_delay: float = 0.0
    reset_mid_data: int = 0  # the next N DATA commands: read a little, then drop the connection
    messages: list[Received] = field(default_factory=list)
    auth_attempts: list[tuple[str, str]] = field(default_factory=list)  # (mechanism, user)
    connections: int = 0
    oauth: OAuthServer | None = None  # set: OAuth only, tokens checked by introspection
    host: str = "127.0.0.1"
    port: int = 0
    require_auth: bool = True  # False: a return path that knows its peers (a gateway's)
    files_into: Dovecot | None = None  # set: accepted mail is filed in the sender's Sent
    files_sent: str = "every"  # "every" copy (Microsoft 365), "first" per Message-ID (Gmail)
    refuse_tokens: str | None = None  # set: the reply to every XOAUTH2/OAUTHBEARER login

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(self.cert, self.key)
        self._filed: set[str] = set()  # Message-IDs filed ("first")

    def file_sent(self, user: str, data: bytes) -> None:
        """Into USER's Sent folder, as the provider would (blocking: IMAP)."""
        if self.files_into is None:
            return
        found = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)", data.split(b"\r\n\r\n")[0])
        message_id = found.group(1).decode() if found else ""
        if self.files_sent == "first":
            if message_id and message_id in self._filed:
                return
            self._filed.add(message_id)
        self.files_into.append(SENT, data, flags=(b"\\Seen",), user=user)

    def ask_for_certificates(self, ca: Path) -> None:
        """Ask TLS clients for a certificate that ``ca`` signed (as an Exchange Online
        inbound connector with TlsSenderCertificateName does); see Received.peercert."""
        self._context.verify_mode = ssl.CERT_OPTIONAL
        self._context.load_verify_locations(cafile=str(ca))

    @property
    def url(self) -> str:
        return f"smtp+starttls://{self.host}:{self.port}"

    def start(self) -> RecordingUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.Server:
        return await self._loop.create_server(self._protocol, self.host, self.port)

    def _protocol(self) -> SMTP:
        self.connections += 1
        protocol = _SMTP(
            _Handler(self),
            hostname="upstream.test",
            ident="recording upstream",
            tls_context=self._context,
            require_starttls=True,
            auth_required=self.require_auth,
            authenticator=self._authenticate,
            enable_SMTPUTF8=self.smtputf8,
            auth_exclude_mechanism=[] if self.oauth else ["XOAUTH2", "OAUTHBEARER"],
            data_size_limit=self.size,
            loop=self._loop,
        )
        self._protocols.append(protocol)
        return protocol

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        user = data.login.decode()
        self.auth_attempts.append((mechanism, user))
        if self.oauth is not None:
            return AuthResult(success=False, handled=False, message=BASIC_DISABLED)
        ok = user == USER and data.password.decode() == PASSWORD
        return AuthResult(success=ok, handled=False, auth_data=user)  # whose Sent it files in

    async def token_user(self, token: str) -> str:
        """The account an access token is live for, asked at the introspection endpoint."""
        assert self.oauth is not None
        async with httpx2.AsyncClient(timeout=10) as client:
            reply = await client.post(
                f"{self.oauth.url}/introspect",
                data={"token": token},
                auth=(CLIENT_ID, CLIENT_SECRET),
            )
        answer = reply.json()
        return str(answer.get("username", "")) if answer.get("active") else ""

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._server = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        # Let every connection_lost run (and the TLS layers under them close),
        # or their sockets would be finalised later, in some other test.
        for _ in range(200):
            if all(protocol.transport is None for protocol in self._protocols):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def drop_connections(self) -> None:
        """Close every open client connection (an idle timeout on the server's side)."""

        async def drop() -> None:
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until ``count`` messages arrived (for relays in another process)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.messages


class _SMTP(SMTP):
    async def smtp_DATA(self, arg: str) -> None:
        upstream = self.event_handler.upstream
        if upstream.reset_mid_data <= 0 or not self.envelope or not self.envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            return
        upstream.reset_mid_data -= 1
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readline()  # the first line of the message, then the wire is cut
        assert self.transport is not None
        self.transport.abort()


class _Handler:
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """``user=U^Aauth=Bearer T^A^A``; a refused token: 334 JSON, then 535."""
        fields = await _sasl_fields(server, args)
        if fields is None:
            return AuthResult(success=False, handled=True)
        pairs = dict(item.split("=", 1) for item in fields.split("\x01") if "=" in item)
        return await self._bearer(server, "XOAUTH2", pairs.get("user", ""), pairs)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC 7628: ``n,a=U,^Ahost=..^Aport=..^Aauth=Bearer T^A^A``."""
        fields = await _sasl_fields(server, args)
        if fields is None:
            return AuthResult(success=False, handled=True)
        gs2, _, rest = fields.partition("\x01")
        user = next((p[2:] for p in gs2.split(",") if p.startswith("a=")), "")
        user = user.replace("=2C", ",").replace("=3D", "=")
        pairs = dict(item.split("=", 1) for item in rest.split("\x01") if "=" in item)
        return await self._bearer(server, "OAUTHBEARER", user, pairs)

    async def _bearer(
        self, server: SMTP, mechanism: str, user: str, pairs: dict[str, str]
    ) -> AuthResult:
        upstream = self.upstream
        upstream.auth_attempts.append((mechanism, user))
        scheme, _, token = pairs.get("auth", "").partition(" ")
        live_for = ""
        if upstream.oauth is not None and scheme == "Bearer" and token:
            live_for = await upstream.token_user(token)
        if live_for and live_for == user and upstream.refuse_tokens is None:
            return AuthResult(success=True, auth_data=user)
        error = {"status": "401", "schemes": "bearer", "scope": "https://outlook.office.com/"}
        await server.challenge_auth(json.dumps(error))  # the client ends the exchange
        return AuthResult(
            success=False, handled=False, message=upstream.refuse_tokens or TOKEN_REFUSED
        )

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.upstream.refuse.get(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.upstream.data_delay:
            await asyncio.sleep(self.upstream.data_delay)
        if self.upstream.data_reply is not None:
            return self.upstream.data_reply
        assert envelope.mail_from is not None
        assert envelope.original_content is not None
        user = str(session.auth_data or envelope.mail_from)
        await asyncio.to_thread(self.upstream.file_sent, user, envelope.original_content)
        self.upstream.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                (session.ssl or {}).get("peercert"),
            )
        )
        return f"250 2.0.0 Ok: queued as {len(self.upstream.messages)}"


async def _sasl_fields(server: SMTP, args: list[str]) -> str | None:
    """The initial response (or the answer to an empty challenge), decoded."""
    if len(args) > 1:
        try:
            raw = base64.b64decode(args[1], validate=True)
        except binascii.Error:
            await server.push("501 5.5.2 Can't decode base64")
            return None
    else:
        answer = await server.challenge_auth("")
        if answer is MISSING or not isinstance(answer, bytes):
            return None
        raw = answer
    return raw.decode("utf-8", "replace")


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    write_self_signed(cert, key, "127.0.0.1")
    return cert, key


@pytest.fixture
def upstream(tls_pair: tuple[Path, Path]) -> Iterator[RecordingUpstream]:
    server = RecordingUpstream(*tls_pair).start()
    yield server
    server.stop()
    # A socket or transport a relay test left open is reported by the garbage
    # collector whenever it next runs, failing whatever test runs then: collect
    # now, so the report fails the test that leaked it.
    gc.collect()
