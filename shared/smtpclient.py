"""The one SMTP client of trackrelay: the relay's upstream, the dashboard's
mailbox sign-in and the notification mail all connect through it.

Why it is careful, and why there is only one:

* aiosmtplib has no pooling and, with its default ``start_tls=None``, would log
  in over plaintext to a server that does not offer STARTTLS. We always ask for
  TLS (``start_tls=True`` or ``use_tls=True``); only the explicit ``smtp://``
  upstream is plaintext, and ``shared.config.parse_upstream`` allows that to
  loopback dev sinks only.
* ``login()`` (and ``aiosmtplib.send(username=...)``, which calls it) tries
  every mechanism the server offers, multiplying failed attempts on the user's
  real account. :meth:`SmtpClient.authenticate` makes exactly ONE attempt with
  one mechanism: PLAIN or LOGIN with a password, or SASL XOAUTH2 or
  OAUTHBEARER (RFC 7628) with an OAuth access token (a mailbox connection).
* aiosmtplib raises on refusals and joins multi-line replies with ``\\n``;
  every outcome becomes a :class:`Reply` whose :attr:`Reply.line` rebuilds a
  proper multi-line SMTP reply for a client. A server that cannot be reached,
  or drops the connection mid-command, raises :class:`UpstreamUnavailable`
  (a relay answers :data:`UNAVAILABLE`, 451 4.4.1: the client retries).
* ``quit()`` and ``close()`` only begin closing a TLS connection;
  :meth:`SmtpClient.close` returns once the socket is closed, so nothing is
  left to the garbage collector after the event loop is gone.

Refusals (4xx/5xx replies) are values, not exceptions: callers decide what a
refusal means (a relay passes it to its client, a notification is retried or
not by its code).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from shared.config import Settings, Upstream

log = logging.getLogger(__name__)

OAUTH_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")  # the password is an OAuth access token
CLOSE_WAIT = 5.0  # seconds a closing server may take to answer close_notify
QUIT_WAIT = 5.0  # seconds QUIT may take before the connection is just closed


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
        """The reply as a client must see it: ``554-first`` ... ``554 last``."""
        lines = [_printable(part) for part in self.text.split("\n")] or [""]
        head = [f"{self.code}-{part}" for part in lines[:-1]]
        return "\r\n".join([*head, f"{self.code} {lines[-1]}".rstrip()])

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.text.splitlines())}"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text.strip("\r"))


UNAVAILABLE = Reply(451, "4.4.1 Upstream server unavailable, try again later")


class UpstreamUnavailable(Exception):
    """The server cannot be reached or dropped the connection mid-command.

    ``reply`` is the server's refusal when it answered the greeting or EHLO
    with an error (it is up, but will not talk to us now).
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass
class Capabilities:
    """What the server advertises in its EHLO reply."""

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


async def command(call: Awaitable[aiosmtplib.SMTPResponse]) -> Reply:
    """Await an aiosmtplib command; refusals become Replies, failures raise."""
    try:
        response = await call
    except aiosmtplib.SMTPResponseException as exc:
        return Reply(exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise UpstreamUnavailable(str(exc)) from exc
    return Reply(response.code, response.message)


class SmtpClient:
    """One connection to one SMTP server, TLS as :class:`Upstream` says.

    Made unconnected; :meth:`connect` opens it (greeting and EHLO). After
    :meth:`close`, or a lost connection, make a new one.
    """

    def __init__(
        self, settings: Settings, target: Upstream, client_cert: tuple[Path, Path] | None = None
    ) -> None:
        """``client_cert``: (certificate, key) presented to a server that asks for one
        (the gateway's return path: an Exchange Online inbound connector can identify
        the relay by it)."""
        self.target = target
        cert, key = (str(client_cert[0]), str(client_cert[1])) if client_cert else (None, None)
        self.capabilities = Capabilities()
        self.smtp = aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            local_hostname=settings.smtp_hostname or None,
            timeout=settings.upstream_timeout,
            use_tls=target.implicit_tls,
            start_tls=target.starttls,  # True or False, never None (see module doc)
            validate_certs=settings.upstream_verify_tls,
            client_cert=cert,
            client_key=key,
        )

    @property
    def is_connected(self) -> bool:
        return self.smtp.is_connected

    async def connect(self) -> Capabilities:
        """Open the connection (TLS first), say EHLO, learn the capabilities."""
        smtp = self.smtp
        try:
            await smtp.connect()
            await smtp.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            log.warning("upstream %s unavailable: %s", self.target, exc)
            reply = None
            if isinstance(exc, aiosmtplib.SMTPResponseException):
                reply = Reply(exc.code, exc.message)
            raise UpstreamUnavailable(str(exc), reply) from exc
        except BaseException:
            # Cancelled between connect and EHLO (a probe timing out, a client
            # leaving during AUTH or MAIL): nothing else holds this connection.
            smtp.close()
            raise
        self.capabilities = Capabilities.from_extensions(
            smtp.esmtp_extensions, smtp.server_auth_methods
        )
        return self.capabilities

    async def authenticate(self, mechanism: str, username: bytes, password: bytes) -> Reply:
        """ONE authentication attempt (aiosmtplib's login() would try them all).

        ``mechanism`` is used when the server offers it (or offers nothing);
        otherwise PLAIN if offered, else LOGIN: still one attempt.
        """
        offered = self.capabilities.auth
        if mechanism in OAUTH_MECHANISMS:
            return await self._authenticate_bearer(mechanism, username, password)
        if mechanism not in offered and offered:
            mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN"
        method = self.smtp.auth_plain if mechanism == "PLAIN" else self.smtp.auth_login
        return await command(method(username, password))

    async def _authenticate_bearer(self, mechanism: str, username: bytes, token: bytes) -> Reply:
        """ONE XOAUTH2 or OAUTHBEARER attempt: the one asked for when offered (or
        nothing is), else the other one when offered.

        A refused token is answered with a 334 carrying the server's JSON error;
        the client ends the exchange (an empty line for XOAUTH2, ``^A`` for
        OAUTHBEARER, RFC 7628 3.2.3) and gets the final 535.
        """
        offered = self.capabilities.auth
        if offered and mechanism not in offered:
            other = next(m for m in OAUTH_MECHANISMS if m != mechanism)
            mechanism = other if other in offered else mechanism
        if mechanism == "XOAUTH2":
            return await command(self.smtp.auth_xoauth2(username, token))
        return await command(self._oauthbearer(username, token))

    async def _oauthbearer(self, username: bytes, token: bytes) -> aiosmtplib.SMTPResponse:
        user = username.replace(b"=", b"=3D").replace(b",", b"=2C")  # RFC 5801 saslname
        host, port = self.target.host.encode(), str(self.target.port).encode()
        message = (
            b"n,a=" + user + b",\x01host=" + host + b"\x01port=" + port
            + b"\x01auth=Bearer " + token + b"\x01\x01"
        )  # fmt: skip
        response = await self.smtp.execute_command(
            b"AUTH", b"OAUTHBEARER", base64.b64encode(message)
        )
        if response.code == 334:  # the error challenge: end the exchange
            response = await self.smtp.execute_command(base64.b64encode(b"\x01"))
        if response.code != 235:
            raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)
        return response

    async def mail(self, sender: str, options: Sequence[str]) -> Reply:
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        return await command(self.smtp.mail(sender, options=list(options), encoding=encoding))

    async def rcpt(self, recipient: str) -> Reply:
        encoding = "ascii" if recipient.isascii() else "utf-8"
        return await command(self.smtp.rcpt(recipient, encoding=encoding))

    async def rset(self) -> None:
        """End the transaction; a connection that cannot is closed."""
        if self.smtp.is_connected:
            try:
                await self.smtp.rset()
            except (aiosmtplib.SMTPException, OSError):
                self.smtp.close()

    async def send_message(self, message: EmailMessage) -> Reply:
        """One whole transaction for a message we composed (envelope from its
        headers, flattened by aiosmtplib); the first refusal, or the DATA reply."""
        try:
            errors, text = await self.smtp.send_message(message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return Reply(first.code, first.message)
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        if errors:
            code, refusal = next(iter(errors.values()))
            return Reply(code, refusal)
        return Reply(250, text)

    def abort(self) -> None:
        """Drop the connection at once (it is out of step with the server)."""
        self.smtp.close()

    async def close(self) -> None:
        """QUIT (or just close) and return once the socket is closed."""
        smtp = self.smtp
        if not smtp.is_connected:
            return
        transport = smtp.transport
        try:
            await asyncio.wait_for(smtp.quit(), timeout=QUIT_WAIT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()
        if transport is not None:
            await _until_closed(transport)


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
