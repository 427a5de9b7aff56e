"""The relay's aiosmtpd handler: AUTH, MAIL, RCPT and DATA as short lists of steps.

Transparency is the rule: MAIL and RCPT are forwarded to the upstream as they
arrive, so each refusal reaches the client verbatim; DATA is answered with the
upstream's own reply, never 250 before the upstream accepted; an unreachable
upstream gives 451 4.4.1 (the client keeps the mail and retries).

Never an open relay: MAIL needs AUTH, or a client address in the trusted
networks (530 5.7.0 otherwise). The gateway listener (relay/gateway.py) is
this handler with its own answer to who may send (the organisation's domains)
and its own return path.

Bcc commands (relay/policy.py): a RCPT at ``TRACKRELAY_COMMAND_DOMAIN`` is
answered here (250, or 550 5.1.1 for an unknown command), forwarded to no
upstream, kept in the session and handed to the pipeline with the message.

DATA is three steps, each owned elsewhere: prepare (relay/track.py runs the
steps of relay/pipeline.py and is the one place that fails open) -> deliver
(relay/deliver.py) -> record (relay/record.py). Every hook returns the reply
string the client gets.

Hook names are case-sensitive in aiosmtpd and a misspelt one is silently
skipped (the server still answers 250): the end-to-end tests assert on the
bytes the upstream received, which is what catches that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Coroutine
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from sqlalchemy import Engine

from relay import mailboxes, sentfolder, upstream
from relay.auth import Credentials, FailureLimiter, read_login, read_plain
from relay.deliver import deliver
from relay.headers import addr_specs, top_fields
from relay.policy import COMMANDS, command_of
from relay.prepared import Prepared, Submission, recorded_listener
from relay.record import Recorder
from relay.smtp import RelaySession
from relay.track import Tracker
from relay.upstream import UNAVAILABLE, Capabilities, Reply, UpstreamUnavailable
from shared import users
from shared.config import Settings, Upstream
from shared.tokens import new_message_id

log = logging.getLogger(__name__)

AUTH_OK = Reply(235, "2.7.0 Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8 Authentication credentials invalid")
AUTH_LIMITED = Reply(454, "4.7.0 Too many failed authentications, try again later")
AUTH_UNAVAILABLE = Reply(454, "4.7.0 Cannot check credentials now, try again later")
NEED_AUTH = "530 5.7.0 Authentication required"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
NOT_UTF8 = "553 5.6.7 Non-ASCII address needs SMTPUTF8"
NO_AUTH_HERE = "504 5.5.4 AUTH is not offered here"
UTF8_UNSUPPORTED = "555 5.6.7 SMTPUTF8 is not supported by the upstream server"
CONTROL_CHARACTER = "553 5.1.3 Address or parameter contains a control character"
NOT_VALID_UTF8 = "553 5.6.7 Address or parameter is not valid UTF-8"
# Room left below the upstream's SIZE for what tracking adds (pixel, longer links).
GROWTH_FRACTION = 20


class RelayHandler:
    """One instance per relay; per-connection state lives in RelaySession."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        tracker: Tracker | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.tracker = tracker or Tracker(settings, engine)
        self.recorder = recorder or Recorder(settings, engine)
        self.offers_auth = settings.auth_mode != "none"  # the gateway: never
        self.max_recipients: int | None = settings.max_recipients
        self.capabilities = Capabilities(smtputf8=settings.upstream_target.is_sink)
        self.limiter = FailureLimiter(
            settings.auth_failures_per_ip,
            settings.auth_failures_per_user,
            settings.auth_failure_window,
        )
        self._networks = settings.networks
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sent = sentfolder.Cleaner(settings, engine)  # relay/server.py stop()s it

    # --- what we advertise ---

    def size_limit(self) -> int:
        """SIZE: our maximum, lowered below the upstream's when it announces one."""
        limit = self.settings.max_message_size
        if self.capabilities.size:
            room = self.capabilities.size - self.capabilities.size // GROWTH_FRACTION
            limit = min(limit, room)
        return limit

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must set it itself
        server.data_size_limit = self.size_limit()
        lines = []
        for line in responses:
            keyword = line[4:].split(" ", 1)[0].upper()
            if keyword == "SIZE":
                line = f"250-SIZE {server.data_size_limit}"
            elif (keyword == "SMTPUTF8" and not self.capabilities.smtputf8) or (
                keyword == "AUTH" and not self.offers_auth
            ):
                continue
            lines.append(line)
        return lines

    # --- AUTH ---

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._authenticate(server, "PLAIN", await read_plain(server, args))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._authenticate(server, "LOGIN", await read_login(server, args))

    async def _authenticate(
        self, server: SMTP, mechanism: str, credentials: Credentials | None
    ) -> AuthResult:
        session = server.session
        assert isinstance(session, RelaySession)
        if credentials is None:
            return AuthResult(success=False, handled=True)  # the error was sent
        if not self.offers_auth:
            return AuthResult(success=False, handled=False, message=NO_AUTH_HERE)
        username = credentials[0].decode("utf-8", "replace")
        if self.limiter.blocked(session.client_ip, username):
            log.warning(
                "AUTH refused for %r from %s: too many failures", username, session.client_ip
            )
            return AuthResult(success=False, handled=False, message=AUTH_LIMITED.line)
        reply = await self._verify(session, mechanism, credentials)
        if reply.ok:
            session.auth_user = username
            log.info("AUTH %s as %r from %s: %s", mechanism, username, session.client_ip, reply)
            return AuthResult(success=True, message=reply.line, auth_data=username)
        if reply.code >= 500:
            self.limiter.failed(session.client_ip, username)
        log.info("AUTH %s as %r from %s failed: %s", mechanism, username, session.client_ip, reply)
        return AuthResult(success=False, handled=False, message=reply.line)

    async def _verify(
        self, session: RelaySession, mechanism: str, credentials: Credentials
    ) -> Reply:
        """Passthrough: ONE AUTH at the upstream; local (or a dev sink): our users."""
        if self.settings.auth_mode == "passthrough" and not self.settings.upstream_target.is_sink:
            connection = session.upstream or upstream.connect(self.settings)
            session.upstream = connection
            try:
                reply = await connection.authenticate(mechanism, *credentials)
            except UpstreamUnavailable:
                return AUTH_UNAVAILABLE
            self.capabilities = connection.capabilities
            return reply
        username, password = (c.decode("utf-8", "surrogateescape") for c in credentials)
        user = await asyncio.to_thread(users.authenticate, self.engine, username, password)
        if user is None or user.id is None:
            return AUTH_INVALID
        session.addresses = await asyncio.to_thread(users.user_addresses, self.engine, user.id)
        return AUTH_OK

    # --- MAIL / RCPT / RSET ---

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        assert isinstance(session, RelaySession)
        refusal = _unsendable(address, options) or self.refuse_sender(session, address)
        if refusal is not None:
            return refusal
        if not address.isascii() and "SMTPUTF8" not in options:
            return NOT_UTF8
        if "SMTPUTF8" in options and not self.capabilities.smtputf8:
            return UTF8_UNSUPPORTED
        session.refused = []
        session.overshoot = 0
        session.commands = []
        reply = await self._mail(session, _envelope_sender(address), self._options(options))
        if reply.ok:
            envelope.mail_from = address  # a hook that answers must fill the envelope
            envelope.mail_options.extend(options)
        return reply.line

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        assert isinstance(session, RelaySession)
        if problem := _unsendable(address, options):
            return problem
        command = command_of(address, self.settings.command_domain)
        if command is not None:
            return self._command(session, address, command)
        if self.max_recipients is not None and len(envelope.rcpt_tos) >= self.max_recipients:
            session.overshoot += 1  # free for the command budget (relay/smtp.py)
            return TOO_MANY_RCPTS
        if not address.isascii() and not envelope.smtp_utf8:
            return NOT_UTF8
        assert session.upstream is not None  # MAIL opened it
        try:
            reply = await session.upstream.rcpt(address)
        except UpstreamUnavailable:
            return UNAVAILABLE.line
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        else:
            session.refused.append((address, reply))
        return reply.line

    def _command(self, session: RelaySession, address: str, command: str) -> str:
        """A Bcc command: kept for the pipeline, forwarded nowhere (relay/policy.py)."""
        domain = self.settings.command_domain
        if command not in COMMANDS:
            known = ", ".join(f"{name}@{domain}" for name in COMMANDS)
            return f"550 5.1.1 <{address}>: not a trackrelay command (the commands are {known})"
        if address not in session.commands:
            session.commands.append(address)
        return f"250 2.1.5 <{address}>: trackrelay command accepted (not forwarded)"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(session, RelaySession):
            session.commands = []
            if session.upstream is not None:
                await session.upstream.rset()
        return "250 OK"

    def handle_CLOSE(self, server: SMTP, session: Session) -> None:
        """The client left (or STARTTLS replaced the session): QUIT upstream."""
        if isinstance(session, RelaySession) and session.upstream is not None:
            self.spawn(session.upstream.close())
            session.upstream = None

    # --- DATA: the pipeline ---

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(session, RelaySession)
        if refusal := self._foreign_from(session, envelope.original_content or b""):
            if session.upstream is not None:
                await session.upstream.rset()
            return refusal
        submission = Submission(
            message_id=new_message_id(),
            sender=_envelope_sender(envelope.mail_from or ""),
            recipients=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            auth_user=session.auth_user,
            client_ip=session.client_ip,
            listener=recorded_listener(session.listener),
            commands=tuple(session.commands),
        )
        # Shielded: a client that disconnects cannot cancel a delivery half done.
        relay = self.spawn(self._relay(session, submission, list(envelope.mail_options)))
        return await asyncio.shield(relay)

    async def _relay(
        self, session: RelaySession, submission: Submission, options: list[str]
    ) -> str:
        """prepare (relay/track.py: the pipeline, failing open) -> deliver -> record."""
        prepared = await self.prepare(submission)
        if session.upstream is None:
            # The client left while the message was prepared (handle_CLOSE closed
            # the upstream): nothing was sent and the client got no 250, so it
            # still has the message and sends it again.
            log.warning(
                "message %d not relayed: the client left before it was sent",
                submission.message_id,
            )
            return UNAVAILABLE.line
        delivery = await deliver(
            session.upstream, submission, prepared, self._options(options), session.refused
        )
        if delivery.status == "failed" and delivery.reply.code < 500:
            # transient: the client keeps the message and retries
            log.warning("message %d not relayed: %s", submission.message_id, delivery.reply)
            return delivery.reply.line
        if prepared.record:
            await self.recorder.record(prepared, delivery)
            if delivery.status != "failed":
                self._clean_sent(session, submission, prepared)
        return delivery.reply.line

    def _clean_sent(self, session: RelaySession, sub: Submission, prepared: Prepared) -> None:
        """Sent through a mailbox: its Sent folder keeps the original (relay/sentfolder.py)."""
        through = getattr(session.upstream, "mailbox", None)
        job = sentfolder.job(through, sub.data, prepared)
        if job is not None:
            self.spawn(self.sent.clean(job))

    async def prepare(self, submission: Submission) -> Prepared:
        """The copies to send (the gateway adds its stamp around this)."""
        return await self.tracker.prepare(submission)

    # --- helpers ---

    def refuse_sender(self, session: RelaySession, address: str) -> str | None:
        """Why this session may not send as ``address`` (None: it may): AUTH or a
        trusted network, and in local mode an address of the user's."""
        if not (session.authenticated or self.trusted(session.client_ip)):
            log.warning("MAIL without AUTH from %s refused (not trusted)", session.client_ip)
            return NEED_AUTH
        if not self._may_send_as(session, address):
            return f"553 5.7.1 <{address}>: sender address not owned by user {session.auth_user}"
        return None

    def trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def _may_send_as(self, session: RelaySession, address: str) -> bool:
        """Local mode: MAIL FROM must be one of the user's addresses (or null)."""
        if self.settings.auth_mode != "local" or not session.authenticated:
            return True
        return address == "<>" or users.may_send_as(session.addresses, address)

    def _foreign_from(self, session: RelaySession, data: bytes) -> str | None:
        """Local mode with TRACKRELAY_LOCAL_CHECK_FROM_HEADER: every From: address must
        be one the user may send as, like MAIL FROM (the shared upstream account would
        send anything); the refusal, or None."""
        if not (self.settings.local_check_from_header and self.settings.auth_mode == "local"):
            return None
        if not session.authenticated:
            return None  # a trusted network, not a user
        for field in top_fields(data)[0]:
            if field.name != "from":
                continue
            for address in addr_specs(field):
                if not (address and users.may_send_as(session.addresses, address)):
                    log.warning(
                        "message refused: From %r is not user %r's", address, session.auth_user
                    )
                    shown = "".join(c if c.isprintable() else "?" for c in address)
                    return (
                        f"553 5.7.1 From: <{shown}> is not an address user "
                        f"{session.auth_user} may send as"
                    )
        return None

    def _options(self, options: list[str]) -> list[str]:
        """MAIL parameters for the upstream: never the client's SIZE (aiosmtplib sends none,
        and tracking changes the size); BODY only when the upstream knows 8BITMIME."""
        kept = []
        for option in options:
            name = option.split("=", 1)[0].upper()
            if name == "SIZE" or (name == "BODY" and not self.capabilities.eightbitmime):
                continue
            kept.append(option)
        return kept

    def connect_upstream(self) -> upstream.Connection:
        """A new session's way to the upstream (with the smarthost login, if any)."""
        login = None
        if self.settings.upstream_user:
            password = self.settings.upstream_password.get_secret_value()
            login = (self.settings.upstream_user.encode(), password.encode())
        return upstream.connect(self.settings, login=login)

    async def _mail(self, session: RelaySession, sender: str, options: list[str]) -> Reply:
        # local mode: a connected address goes out through its mailbox (relay/mailboxes.py)
        try:
            route = await mailboxes.find(self.settings, self.engine, session.auth_user, sender)
        except UpstreamUnavailable as exc:  # no way to say which way: the client retries
            return exc.reply or UNAVAILABLE
        through = route.id if route is not None else None
        if session.upstream is not None and getattr(session.upstream, "mailbox", None) != through:
            await session.upstream.close()  # the last message went out another way
            session.upstream = None
        if session.upstream is None and route is not None:
            session.upstream = mailboxes.connect(self.settings, self.engine, route)
        if session.upstream is None:
            session.upstream = self.connect_upstream()
        try:
            reply = await session.upstream.mail(sender, options)
        except UpstreamUnavailable as exc:
            if route is not None:  # 454 (broken) or 451 naming the provider
                return await mailboxes.failed(self.settings, self.engine, route, exc)
            return UNAVAILABLE
        self.capabilities = session.upstream.capabilities
        return reply

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if its client leaves; stop() waits for it.

        The relay's one owner of background tasks: each one's outcome is read when
        it ends, so an exception is logged here (once, with its traceback), never
        left to asyncio's "Task exception was never retrieved"."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error(
                "background task %s failed: %s",
                getattr(task.get_coro(), "__qualname__", task.get_name()),
                error,
                exc_info=error,
            )

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def probe_upstream(self, target: Upstream | None = None) -> None:
        """Learn the upstream's SIZE / SMTPUTF8 before the first client says EHLO."""
        capabilities = await upstream.probe(self.settings, target)
        if capabilities is None:
            where = target or self.settings.upstream_target
            log.warning("upstream %s not reachable at start", where)
        else:
            self.capabilities = capabilities


def _unsendable(address: str, options: list[str]) -> str | None:
    """Why an address or parameter cannot go upstream: aiosmtplib refuses control
    characters (ValueError) and aiosmtpd hands invalid UTF-8 over as surrogates
    (UnicodeEncodeError), each of which aiosmtpd answered with a 500 quoting the
    exception, and logged with a traceback."""
    for text in (address, *options):
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            return CONTROL_CHARACTER
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return NOT_VALID_UTF8
    return None


def _envelope_sender(address: str) -> str:
    """aiosmtpd hands the null sender over as '<>'; aiosmtplib wants ''."""
    return "" if address == "<>" else address
