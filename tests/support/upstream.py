"""A recording upstream SMTP server for tests: what the relay delivered, byte for byte.

It is a real aiosmtpd server made with ``loop.create_server`` on 127.0.0.1,
port 0, running its own event loop in a thread (so sync and async tests, and
relays in subprocesses, can all use it). It speaks STARTTLS with a self-signed
certificate and requires AUTH (PLAIN or LOGIN) for :data:`USER` /
:data:`PASSWORD`, counting every attempt (``require_auth=False``: none, as a
gateway's return path or an MTA's last hop needs). Behaviour can be changed per test:
refuse some recipients, answer DATA with a given reply, answer slowly, or
drop the connection in the middle of DATA.

Fixtures (registered through ``pytest_plugins`` in conftest.py):

* ``tls_pair``: (cert, key) paths of a self-signed certificate, per session.
* ``upstream``: a started :class:`RecordingUpstream`; ``upstream.url`` is what
  ``TRACKRELAY_UPSTREAM`` should be, with ``upstream_verify_tls=False``.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.tlscert import write_self_signed

USER = "alice@example.com"
PASSWORD = "correct horse battery"


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
    host: str = "127.0.0.1"
    port: int = 0
    require_auth: bool = True  # False: a return path that knows its peers (a gateway's)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(self.cert, self.key)

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
        ok = user == USER and data.password.decode() == PASSWORD
        return AuthResult(success=ok, handled=False)

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
