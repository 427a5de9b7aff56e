"""Where the relay delivers: an SMTP server through aiosmtplib, or a Maildir sink.

Why this module is careful:

* aiosmtplib has no pooling and, with its default ``start_tls=None``, would log
  in over plaintext to a server that does not offer STARTTLS. We always ask for
  TLS (``start_tls=True`` or ``use_tls=True``); only the explicit loopback
  ``smtp://`` upstream is plaintext.
* ``login()`` tries every mechanism the server offers, multiplying failed
  attempts on the user's real account. :meth:`SmtpUpstream.authenticate`
  makes exactly ONE attempt with one mechanism.
* One upstream connection serves one client session across its messages; a
  connection dropped between transactions is reopened (and re-authenticated
  with the credentials kept in session memory) at the next MAIL.
* aiosmtplib raises on refusals and joins multi-line replies with ``\\n``;
  every outcome becomes a :class:`Reply` whose :attr:`Reply.line` rebuilds a
  proper multi-line SMTP reply for the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Protocol, cast

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import SMTPProtocol

from relay.headers import Segment
from shared.config import Settings, Upstream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: a code and its text (lines joined with ``\\n``)."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def line(self) -> str:
        """The reply as the client must see it: ``554-first`` ... ``554 last``."""
        lines = [_printable(part) for part in self.text.split("\n")] or [""]
        head = [f"{self.code}-{part}" for part in lines[:-1]]
        return "\r\n".join([*head, f"{self.code} {lines[-1]}".rstrip()])

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.text.splitlines())}"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text.strip("\r"))


UNAVAILABLE = Reply(451, "4.4.1 Upstream server unavailable, try again later")


class UpstreamUnavailable(Exception):
    """The upstream cannot be reached or dropped the connection mid-command."""


@dataclass
class Capabilities:
    """What the upstream advertises; decides what the relay may advertise."""

    smtputf8: bool = False
    eightbitmime: bool = True
    size: int | None = None
    auth: list[str] = field(default_factory=list)

    @classmethod
    def from_extensions(cls, extensions: dict[str, str], auth: Sequence[str]) -> Capabilities:
        size = extensions.get("size", "")
        return cls(
            smtputf8="smtputf8" in extensions,
            eightbitmime="8bitmime" in extensions,
            size=int(size) if size.isdigit() and int(size) > 0 else None,
            auth=[m.upper() for m in auth],
        )


class Connection(Protocol):
    """One client session's way to the upstream (SMTP server or Maildir sink)."""

    capabilities: Capabilities

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply: ...
    async def mail(self, sender: str, options: Sequence[str]) -> Reply: ...
    async def rcpt(self, recipient: str) -> Reply: ...
    async def data(self, content: Sequence[Segment]) -> Reply: ...
    async def rset(self) -> None: ...
    async def close(self) -> None: ...


def connect(settings: Settings, *, login: tuple[bytes, bytes] | None = None) -> Connection:
    """A connection object for the configured upstream (opened lazily)."""
    target = settings.upstream_target
    if target.is_sink:
        assert target.path is not None
        return MaildirSink(target.path)
    return SmtpUpstream(settings, target, login=login)


class SmtpUpstream:
    """An aiosmtplib connection, TLS required, reopened between transactions."""

    def __init__(
        self, settings: Settings, target: Upstream, *, login: tuple[bytes, bytes] | None = None
    ) -> None:
        self.target = target
        self.capabilities = Capabilities()
        self._settings = settings
        self._login = login
        self._mechanism = "PLAIN"
        self._smtp: aiosmtplib.SMTP | None = None
        self._logged_in: aiosmtplib.SMTP | None = None
        self._in_transaction = False
        self._lock = asyncio.Lock()

    # --- connection ---

    async def _open(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        smtp = aiosmtplib.SMTP(
            hostname=self.target.host,
            port=self.target.port,
            local_hostname=self._settings.smtp_hostname or None,
            timeout=self._settings.upstream_timeout,
            use_tls=self.target.implicit_tls,
            start_tls=self.target.starttls,  # True or False, never None (see module doc)
            validate_certs=self._settings.upstream_verify_tls,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
        except aiosmtplib.SMTPException as exc:
            smtp.close()
            log.warning("upstream %s unavailable: %s", self.target, exc)
            raise UpstreamUnavailable(str(exc)) from exc
        except OSError as exc:
            smtp.close()
            log.warning("upstream %s unavailable: %s", self.target, exc)
            raise UpstreamUnavailable(str(exc)) from exc
        except BaseException:
            # Cancelled between connect and EHLO (a probe timing out, a client
            # leaving during AUTH or MAIL): nothing else holds this connection.
            smtp.close()
            raise
        self._smtp = smtp
        self._in_transaction = False
        self.capabilities = Capabilities.from_extensions(
            smtp.esmtp_extensions, smtp.server_auth_methods
        )
        return smtp

    async def _reopen_with_login(self) -> aiosmtplib.SMTP:
        smtp = await self._open()
        if self._login is not None and self._logged_in is not smtp:
            reply = await self._auth(smtp, self._mechanism, *self._login)
            if not reply.ok:
                log.warning("upstream %s refused the session's login again: %s", self.target, reply)
                raise UpstreamUnavailable(str(reply))
        return smtp

    async def _auth(
        self, smtp: aiosmtplib.SMTP, mechanism: str, username: bytes, password: bytes
    ) -> Reply:
        """ONE authentication attempt (aiosmtplib's login() would try them all)."""
        offered = self.capabilities.auth
        if mechanism not in offered and offered:
            # The client's mechanism is not offered upstream: still one attempt.
            mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN"
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        try:
            response = await method(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        self._logged_in = smtp
        self._mechanism = mechanism
        return Reply(response.code, response.message)

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply:
        """Check the client's credentials with one AUTH; on success keep them."""
        smtp = await self._open()
        reply = await self._auth(smtp, mechanism, username, password)
        if reply.ok:
            self._login = (username, password)
        return reply

    # --- transactions ---

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        if self._in_transaction:
            await self.rset()
        was_open = self._smtp is not None and self._smtp.is_connected
        try:
            smtp = await self._reopen_with_login()
            return await self._mail(smtp, sender, options)
        except UpstreamUnavailable:
            if not was_open:
                raise
        # Dropped between transactions (idle timeout upstream): reopen once.
        smtp = await self._reopen_with_login()
        return await self._mail(smtp, sender, options)

    async def _mail(self, smtp: aiosmtplib.SMTP, sender: str, options: Sequence[str]) -> Reply:
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        reply = await _command(smtp.mail(sender, options=list(options), encoding=encoding))
        self._in_transaction = reply.ok
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        smtp = self._require()
        encoding = "ascii" if recipient.isascii() else "utf-8"
        return await _command(smtp.rcpt(recipient, encoding=encoding))

    async def data(self, content: Sequence[Segment]) -> Reply:
        smtp = self._require()
        self._in_transaction = False
        async with self._lock:  # close() must not QUIT between DATA and its content
            return await _command(_send_data(smtp, content, self._settings.upstream_timeout))

    async def rset(self) -> None:
        self._in_transaction = False
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                self._smtp.close()

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None and smtp.is_connected:
            transport = smtp.transport
            try:
                await asyncio.wait_for(smtp.quit(), timeout=5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()
            if transport is not None:
                await _until_closed(transport)

    def _require(self) -> aiosmtplib.SMTP:
        if self._smtp is None or not self._smtp.is_connected:
            raise UpstreamUnavailable("the upstream connection was lost")
        return self._smtp


CLOSE_WAIT = 5.0  # seconds a closing upstream may take to answer close_notify


async def _until_closed(transport: asyncio.BaseTransport) -> None:
    """Return once the socket under ``transport`` is closed; abort it after CLOSE_WAIT.

    ``quit()`` and ``close()`` only begin closing: over TLS the socket stays
    open until the server answers close_notify. A relay that stopped without
    waiting left that socket to the garbage collector once its loop was gone.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or await _socket_closed(sock, CLOSE_WAIT):
        return
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    await _socket_closed(sock, 1.0)


async def _socket_closed(sock: socket.socket, wait: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while sock.fileno() != -1:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _command(call: object) -> Reply:
    """Await an aiosmtplib command; refusals become Replies, failures raise."""
    try:
        response = await call  # type: ignore[misc]
    except aiosmtplib.SMTPResponseException as exc:
        return Reply(exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise UpstreamUnavailable(str(exc)) from exc
    return Reply(response.code, response.message)


async def _send_data(
    smtp: aiosmtplib.SMTP, content: Sequence[Segment], wait: float
) -> SMTPResponse:
    """DATA, then ``content`` as :func:`data_chunks` encodes it, then the reply.

    Instead of ``SMTP.data``, whose line-ending normalisation and dot-stuffing
    regexes cost ~1.5 ms per 50 KB message and hold the event loop over a second for a
    35 MB one (every other session waits), and which make three copies of it.
    Each chunk waits for the transport to drain below its high-water mark
    before the next is made, so a slow upstream never gets the whole message
    queued in the transport's buffer (one more copy of it in memory).
    """
    start = await smtp.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # Wait for the reply from now on: aiosmtplib drops what arrives while no
    # reply is awaited, and the sleeps below let the loop run mid-upload.
    reply_task = asyncio.ensure_future(protocol.read_response(timeout=wait))
    try:
        await asyncio.sleep(0)  # the reader is now waiting
        for chunk in data_chunks(content):
            protocol.write(chunk)
            await asyncio.sleep(0)  # let other sessions run between megabytes
            if not await _drained(protocol, reply_task):
                break  # the upstream answered (or timed out) before the end
        reply = await reply_task
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()  # what SMTP.data does: the connection is out of step
        raise
    finally:
        if reply_task.done() and not reply_task.cancelled():
            reply_task.exception()  # retrieved: never "exception was never retrieved"
        reply_task.cancel()
    if reply.code != 250:
        raise aiosmtplib.SMTPDataError(reply.code, reply.message)
    return reply


async def _drained(protocol: SMTPProtocol, reply_task: asyncio.Future[SMTPResponse]) -> bool:
    """Wait until the transport's buffer is below its high-water mark again
    (aiosmtplib's FlowControlMixin); False if the reply came first (an early
    refusal, the connection lost, or the reply timeout)."""
    transport = cast(asyncio.WriteTransport | None, protocol.transport)  # uvloop's: no subclass
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
        return True
    drain = asyncio.ensure_future(protocol._drain_helper())
    waiting: list[asyncio.Future[Any]] = [drain, reply_task]
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        drain.cancel()
    if drain.done() and not drain.cancelled() and drain.exception() is not None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    return not reply_task.done()


_BARE_LINE_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))")  # aiosmtplib's LINE_ENDINGS_REGEX
DATA_CHUNK = 1 << 20


def data_chunks(content: Iterable[Segment], size: int = DATA_CHUNK) -> Iterator[bytes]:
    """The DATA content on the wire: the same bytes ``aiosmtplib`` sends for
    ``b"".join(content)``, made ``size`` bytes at a time from the segments.

    Lone CR and LF become CRLF (only when a block has one: three counts in C
    tell), a final CRLF is added if missing, a dot starting a line is doubled
    (RFC 5321 4.5.2), then the ``.`` line. Each block of at most ``size``
    bytes is copied out of its segment, normalised and stuffed on its own, so
    the whole message is never copied and no pass over it holds the event
    loop: ``\r\n.`` cannot overlap itself, so a boundary only needs the last
    two bytes sent before, and a block ending in CR keeps that CR for the next
    one (it may be the first half of a CRLF). Blocks smaller than ``size``
    (headers, a rewritten part) are gathered into one chunk.
    """
    before = b"\r\n"  # the last two bytes written; the content starts at a line start
    carry = b""  # a CR that ended the previous block
    sent = 0
    pending: list[bytes] = []
    pending_size = 0
    for block in _blocks(content, size):
        if carry:
            block, carry = carry + block, b""
        if block.endswith(b"\r"):
            block, carry = block[:-1], b"\r"
        if not block:
            continue
        out = _encode_block(block, before)
        before = (before + out)[-2:]
        sent += len(out)
        pending.append(out)
        pending_size += len(out)
        if pending_size >= size:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if carry:  # a lone CR at the very end: a line end of its own
        pending.append(b"\r\n")
        before, sent = b"\r\n", sent + 2
    if not sent or before != b"\r\n":
        pending.append(b"\r\n")
    pending.append(b".\r\n")
    yield b"".join(pending)


def _blocks(content: Iterable[Segment], size: int) -> Iterator[bytes]:
    """The bytes of ``content`` in order, at most ``size`` at a time."""
    for segment in content:
        if len(segment) <= size:
            yield bytes(segment) if isinstance(segment, memoryview) else segment
            continue
        view = memoryview(segment)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


def _encode_block(block: bytes, before: bytes) -> bytes:
    """One block (never ending in CR) normalised and dot-stuffed."""
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        block = _BARE_LINE_END.sub(b"\r\n", block)
    out = block.replace(b"\r\n.", b"\r\n..")
    if before.endswith(b"\r\n") and block.startswith(b"."):
        out = b"." + out
    return out


async def probe(settings: Settings) -> Capabilities | None:
    """Connect once without logging in, to learn what the upstream advertises."""
    target = settings.upstream_target
    if target.is_sink:
        return Capabilities(smtputf8=True)
    conn = SmtpUpstream(settings, target)
    try:
        await asyncio.wait_for(conn._open(), PROBE_TIMEOUT)
    except (UpstreamUnavailable, TimeoutError):
        return None
    finally:
        await conn.close()
    return conn.capabilities


_sequence = count(1)
PROBE_TIMEOUT = 5.0


class MaildirSink:
    """Dev-mode upstream: each delivered copy becomes a file in a Maildir.

    Like a local MTA, each recipient gets its own file starting with
    ``Return-Path:`` and ``Delivered-To:`` lines; files are written in ``tmp``
    and renamed into ``new`` so a reader never sees half a message. The sink
    has no accounts (dev mode checks AUTH against local users instead).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.capabilities = Capabilities(smtputf8=True)
        self._sender: str | None = None
        self._recipients: list[str] = []

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply:
        return Reply(535, "5.7.8 The Maildir sink has no accounts")

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        self._sender, self._recipients = sender, []
        return Reply(250, "2.1.0 Ok")

    async def rcpt(self, recipient: str) -> Reply:
        if self._sender is None:
            return Reply(503, "5.5.1 Error: need MAIL command")
        self._recipients.append(recipient)
        return Reply(250, "2.1.5 Ok")

    async def data(self, content: Sequence[Segment]) -> Reply:
        sender, recipients = self._sender, self._recipients
        self._sender, self._recipients = None, []
        if sender is None or not recipients:
            return Reply(503, "5.5.1 Error: need RCPT command")
        try:
            names = await asyncio.to_thread(self._write, sender, recipients, content)
        except OSError as exc:
            log.error("cannot write to the Maildir %s: %s", self.path, exc)
            return Reply(451, "4.3.0 Cannot write to the Maildir sink")
        return Reply(250, f"2.0.0 Ok: delivered to {self.path} as {names[0]}")

    def _write(self, sender: str, recipients: list[str], content: Sequence[Segment]) -> list[str]:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        names = []
        for recipient in recipients:
            name = (
                f"{time.time_ns()}.P{os.getpid()}Q{next(_sequence)}"
                f"R{os.urandom(4).hex()}.{socket.gethostname()}"
            )
            head = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
            tmp = self.path / "tmp" / name
            with tmp.open("wb") as handle:
                handle.write(head)
                handle.writelines(content)
            tmp.rename(self.path / "new" / name)
            names.append(name)
        return names

    async def rset(self) -> None:
        self._sender, self._recipients = None, []

    async def close(self) -> None:
        return None
