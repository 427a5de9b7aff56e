"""aiosmtpd's SMTP protocol, with the fixes a relay in front of a real server needs.

Verified on aiosmtpd 1.4.6, and why each override exists (every private part
of aiosmtpd it needs is reached through relay/aiosmtpd_adapter.py, and only
there):

* DATA is read line by line with a debug log call per line: the relay reads
  it in chunks (relay/datareader.py), with the same rules.
* Every timeout that closes a session says so first: ``421 4.4.2 <host>
  Timeout, closing transmission channel`` (RFC 5321 3.8 and 4.5.3.2) after the
  greeting or idle timeout (:meth:`RelaySMTP.timed_out`; aiosmtpd closes
  without a word), the DATA timeout's own 421 below.
* The idle timeout resets per command only, so a slow upload is cut. Here
  every received chunk resets it, and it is suspended while ``handle_DATA``
  forwards the message upstream: a timeout there would cancel the handler
  after the upstream may have accepted, and the client's retry would deliver
  the message twice. What follows the final dot is bounded by the upstream's
  own timeouts instead (``TRACKRELAY_UPSTREAM_TIMEOUT`` per command,
  ``TRACKRELAY_UPSTREAM_DATA_TIMEOUT`` for its reply to the dot, then 451),
  never by the upload's ``data_timeout``.
* Per-line resets alone would let a slowloris client hold a session forever
  by dribbling one line at a time: one DATA upload may take at most
  ``data_timeout`` seconds in all (``TRACKRELAY_DATA_TIMEOUT``), then the
  client gets 421 and is disconnected; nothing was sent upstream.
* Sessions carry relay state (:class:`RelaySession`); the handler hears when a
  session ends (``handle_CLOSE``), also when STARTTLS replaces the session.
  The server hears of a connection when it is made (``on_open``): on an
  implicit-TLS listener a failed handshake never reaches the protocol, so
  counting protocols as they are created would keep those forever.
* Graceful shutdown: :meth:`RelaySMTP.begin_shutdown` answers 421 to idle
  sessions at once and to busy ones when their transaction ends.
* A listener may restrict who can connect (``peers``, relay/peers.py): the
  plain port serves trusted networks only, the gateway its MTA's networks and
  TLS client names. The address is checked before the greeting, the client
  certificate once TLS is up (implicit TLS: before the greeting too;
  STARTTLS: the first command after the handshake gets the 554).
* Session limits (relay/limits.py) are checked once per connection, when it
  is made (after the handshake on implicit TLS; STARTTLS's new session is the
  same connection), and a refused one is greeted with the 421 instead of 220.
  Until its first valid command a connection has ``greeting_timeout`` seconds
  (``TRACKRELAY_GREETING_TIMEOUT``), not the idle timeout: a silent
  connection holds a slot for 30 s, not 300.
* A client looping NOOP, RSET, VRFY, EHLO, refused MAILs... keeps a session
  (and a slot of the upstream's) forever, since every valid command resets
  the idle timeout. After ``command_limit`` commands that moved no mail it
  gets 421 and is disconnected (``TRACKRELAY_MAX_COMMANDS_WITHOUT_MAIL``).
  A message handed over (DATA with recipients) restores the budget, and an
  accepted MAIL or a RCPT the upstream answered costs nothing, so a session
  may send any number of messages. aiosmtpd's ``command_call_limit`` counts
  each command per session and never forgives: a client that sends RSET
  after each message (PHPMailer's keep-alive does) would be cut after N
  messages. Unknown commands are aiosmtpd's: the fifth gets 502 and a close.
* A RCPT refused for being past ``TRACKRELAY_MAX_RECIPIENTS`` (452) costs
  nothing either, up to :data:`OVERSHOOT` per transaction: RFC 5321
  4.5.3.1.10 has the client send DATA for the accepted recipients and the
  rest in a later transaction, so a list of 2,000 must not end the session
  (and its hundred accepted recipients) at RCPT 197. Past :data:`OVERSHOOT`
  (Postfix's ``smtpd_recipient_overshoot_limit`` idea) they count again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, Session

from relay.aiosmtpd_adapter import AdaptedSession, AdaptedSMTP, Command
from relay.datareader import DataTooBig, DataTooLong, read_data
from relay.limits import SessionLimits
from relay.peers import Peers

if TYPE_CHECKING:
    from relay.upstream import Connection
    from shared.smtpclient import Reply

log = logging.getLogger(__name__)

SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, try again later\r\n"
DATA_TIMEOUT_REPLY = "421 4.4.2 Message upload took too long, closing connection"
TIMEOUT_REPLY = "421 4.4.2 {host} Timeout, closing transmission channel"  # RFC 5321 3.8
COMMAND_LIMIT_REPLY = "421 4.7.0 Too many commands without sending mail, closing connection"
OVERSHOOT = 10_000  # RCPTs past the recipient limit that cost no command, per transaction


class RelaySession(AdaptedSession):
    """An aiosmtpd session plus what the relay keeps for one client connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.listener = ""
        self.upstream: Connection | None = None  # opened on demand
        self.auth_user = ""
        self.addresses: list[str] = []  # local mode: what the user may send as
        self.refused: list[tuple[str, Reply]] = []  # RCPTs the upstream refused (address, Reply)
        self.overshoot = 0  # RCPTs of this transaction refused past the recipient limit
        self.commands: list[str] = []  # Bcc commands of this transaction (relay/policy.py)

    @property
    def client_ip(self) -> str:
        peer = self.peer
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class RelaySMTP(AdaptedSMTP):
    """The relay's SMTP protocol: one instance per client connection."""

    def __init__(
        self,
        handler: Any,
        *,
        listener: str,
        peers: Peers | None = None,
        on_open: Callable[[RelaySMTP], None] | None = None,
        on_close: Callable[[RelaySMTP], None] | None = None,
        data_timeout: float | None = None,
        command_limit: int | None = None,
        limits: SessionLimits | None = None,
        greeting_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.listener = listener
        self.greeting_timeout = greeting_timeout
        self._limits = limits
        self._counted_ip: str | None = None  # counted by limits, released at the end
        self._refusal: str | None = None  # the 421 to greet with, over a limit
        self.data_timeout = data_timeout
        self.command_limit = command_limit
        self._idle_commands = 0  # commands since the last message that moved no mail
        self._peers = peers
        self._on_open = on_open
        self._on_close = on_close
        self._in_data = False
        self._busy = False
        self._draining = False
        # Wrap every command so shutdown can close a session between transactions.
        self.wrap_commands(self._tracked)

    # --- sessions ---

    def new_session(self) -> RelaySession:
        session = RelaySession(self.loop)
        session.listener = self.listener
        return session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        previous = self.session
        super().connection_made(transport)
        if previous is not None and previous is not self.session:
            self._session_ended(previous)  # STARTTLS starts a new session (RFC 3207 4.2)
            refusal = self._refuse_certificate()
            if refusal is not None:  # the client's next command (EHLO) reads it
                self.write_now(f"{refusal}\r\n".encode())
                transport.close()
        elif previous is None:
            self._first_contact()  # implicit TLS: only now, after a successful handshake

    def _first_contact(self) -> None:
        assert isinstance(self.session, RelaySession)
        if self._limits is not None:
            ip = self.session.client_ip
            self._refusal = self._limits.admit(ip, self.listener)
            self._counted_ip = None if self._refusal else ip
        if self.greeting_timeout is not None:
            self.reset_timeout(self.greeting_timeout)
        if self._on_open is not None:
            self._on_open(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._limits is not None and self._counted_ip is not None:
            self._limits.release(self._counted_ip)
            self._counted_ip = None
        if self.session is not None:
            self._session_ended(self.session)
        if self._on_close is not None:
            self._on_close(self)

    def _session_ended(self, session: Session) -> None:
        hook = getattr(self.event_handler, "handle_CLOSE", None)
        if hook is not None:
            hook(self, session)

    async def serve_client(self) -> None:
        assert self.session is not None
        refusal = self._refusal  # over a session limit (logged by relay/limits.py)
        if refusal is None and self._peers is not None:
            refusal = self._peers.refuse_address(self._client_ip())
            if refusal is None and self.transport is not None:
                refusal = self._refuse_certificate()  # implicit TLS: the handshake is done
        if refusal is not None:
            await self.push(refusal)
            assert self.transport is not None
            self.transport.close()
            return
        await super().serve_client()

    def _client_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def _refuse_certificate(self) -> str | None:
        """The listener's refusal of this TLS client's certificate (None: accepted, or
        no TLS yet, or no names to check)."""
        if self._peers is None or self.transport is None:
            return None
        tls = self.transport.get_extra_info("ssl_object")
        if tls is None:
            return None
        return self._peers.refuse_certificate(self._client_ip(), tls.getpeercert())

    # --- idle timeout ---

    def timed_out(self) -> None:
        """The greeting or idle timeout fired (also between lines of DATA): 421 first,
        then the close (RFC 5321 3.8), unless the transport is closing already."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            log.info("%s: silent for too long: disconnected", self._client_ip() or "?")
            self.write_now(f"{TIMEOUT_REPLY.format(host=self.hostname)}\r\n".encode())
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_data and b"\n" in data:
            self.reset_timeout()  # a line arrived: the upload is slow, not idle
        super().data_received(data)

    # --- shutdown ---

    def _tracked(self, name: str, method: Command) -> Command:
        @functools.wraps(method)
        async def run(arg: str) -> None:
            limit = self.command_limit
            if limit is not None and self._idle_commands >= limit and name != "QUIT":
                await self._over_command_limit()
                return
            before = self._progress()
            self._busy = True
            try:
                await method(arg)
            finally:
                self._busy = False
            self._count(name, before)
            if self._draining:
                self._close_if_idle()

        return run

    # --- command limit ---

    def _progress(self) -> tuple[bool, int, int, int]:
        session, envelope = self.session, self.envelope
        refused = overshoot = 0
        if isinstance(session, RelaySession):
            refused, overshoot = len(session.refused), min(session.overshoot, OVERSHOOT)
        if envelope is None:
            return False, 0, refused, overshoot
        return envelope.mail_from is not None, len(envelope.rcpt_tos), refused, overshoot

    def _count(self, name: str, before: tuple[bool, int, int, int]) -> None:
        if name == "DATA" and before[1]:
            self._idle_commands = 0  # a message was handed over
        elif name in ("MAIL", "RCPT") and self._progress() != before:
            pass  # an accepted MAIL; a RCPT accepted, answered upstream, or past the limit
        elif name != "QUIT":
            self._idle_commands += 1

    async def _over_command_limit(self) -> None:
        log.warning(
            "%s: %d commands without sending mail: disconnected",
            self.session.peer if self.session else "?",
            self.command_limit,
        )
        await self.push(COMMAND_LIMIT_REPLY)
        assert self.transport is not None
        self.transport.close()

    @property
    def in_transaction(self) -> bool:
        return self._busy or (self.envelope is not None and self.envelope.mail_from is not None)

    def begin_shutdown(self) -> None:
        """Stop this session after its transaction in flight (421 to the client)."""
        self._draining = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.transport is None or self.transport.is_closing() or self.in_transaction:
            return
        self.write_now(SHUTDOWN_REPLY)
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- DATA ---

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            content = await asyncio.wait_for(
                read_data(
                    self.reader, size_limit=self.data_size_limit, on_too_big=self._reply_too_big
                ),
                self.data_timeout,
            )
        except TimeoutError:
            log.warning(
                "%s: DATA upload took over %ss: disconnected", self.session, self.data_timeout
            )
            await self.push(DATA_TIMEOUT_REPLY)
            await self._abandon_transaction()
            assert self.transport is not None
            self.transport.close()
            return
        except DataTooLong:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            await self._abandon_transaction()
            return
        except DataTooBig:
            await self._abandon_transaction()
            return
        finally:
            self._in_data = False
        self.envelope.content = self.envelope.original_content = content
        self.suspend_timeout()  # never time out while the upstream is being written to
        try:
            status = await self.call_hook("DATA")
        finally:
            self.resume_timeout()
        self.end_transaction()
        await self.push("250 OK" if status is MISSING else status)

    async def _reply_too_big(self) -> None:
        await self.push("552 5.3.4 Message size exceeds fixed maximum message size")

    async def _abandon_transaction(self) -> None:
        """The client's DATA was refused here: end the upstream transaction too."""
        self.end_transaction()
        await self.call_hook("RSET")
