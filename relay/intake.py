"""The intake listener: copies of incoming mail in, answers (replies, auto-replies,
bounces, complaints) out, nothing ever delivered.

The organisation's mail system sends this port a *copy* of incoming mail
(Microsoft 365 "Bcc the message to", Google Workspace "Also deliver to",
Postfix ``recipient_bcc_maps``; the README says how). For each copy:

1. relay/peers.py admits only ``TRACKRELAY_INTAKE_NETWORKS`` (``554 5.7.1``
   before the greeting otherwise); STARTTLS is offered, never AUTH;
2. any MAIL FROM, the null sender of a bounce included, and any RCPT are
   accepted: the copy's envelope is not ours to judge;
3. DATA: up to ``TRACKRELAY_INTAKE_MAX_SIZE`` is accepted (more: ``552``),
   and only its first :data:`READ_BYTES` are read, where the header fields
   and the report parts are (a bounce puts its report before the returned
   message; a reply's body is never looked at);
4. shared/answers.py classifies it; findings go to relay/answerstore.py,
   which matches them to a message and a recipient and stores them, or
   journals them while the database is away, and only then is the reply
   ``250``. A copy that says nothing about our mail (most copies: ordinary
   mail) leaves nothing but a count (:class:`IntakeCounters`, in /metrics
   under ``serve``, and one INFO line per :data:`LOG_EVERY`).

Nothing is delivered anywhere, and no body of a reply is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from relay.answerstore import AnswerWriter, item
from relay.limits import SessionLimits
from relay.peers import Peers
from relay.smtp import RelaySMTP
from shared.answers import classify, parse
from shared.config import Settings, SettingsError
from shared.models import utcnow

log = logging.getLogger(__name__)

#: Bytes of a copy that are read: header fields and report parts come first.
READ_BYTES = 256 * 1024
#: Copies larger than this are parsed off the event loop.
OFFLOAD_BYTES = 64 * 1024
#: One INFO line per this many copies that matched nothing.
LOG_EVERY = 100

OK = "250 2.0.0 OK: copy received"


@dataclass
class IntakeCounters:
    """For /metrics: copies received, answers among them, and those that matched nothing."""

    copies: int = 0
    answers: int = 0  # copies with findings, handed to the writer
    unrecognised: int = 0  # copies the classifier found nothing in


class IntakeHandler:
    """aiosmtpd hooks of the intake (every hook returns its reply string)."""

    def __init__(self, writer: AnswerWriter) -> None:
        self.writer = writer
        self.counts = IntakeCounters()

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address  # the null sender of a bounce too
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or b""
        self.counts.copies += 1
        head = data[:READ_BYTES]
        if len(head) > OFFLOAD_BYTES:  # parsing a large copy would hold the event loop
            message = await asyncio.to_thread(parse, head)
            findings = await asyncio.to_thread(classify, message)
        else:
            message = parse(head)
            findings = classify(message)
        if not findings:
            self.counts.unrecognised += 1
            self._log_unmatched()
            return OK
        self.counts.answers += 1
        await self.writer.put(item(copy_key(message, head), utcnow(), findings))
        return OK

    def _log_unmatched(self) -> None:
        unmatched = self.counts.unrecognised + self.writer.store.unmatched
        if unmatched % LOG_EVERY == 0:
            log.info(
                "intake: %d of %d copies said nothing about mail we sent",
                unmatched,
                self.counts.copies,
            )


def copy_key(message: Any, head: bytes) -> str:
    """What identifies one copy: its Message-ID, else a hash of its header block."""
    own = str(message.get("Message-ID", "") or "").strip()
    if own:
        return own[:200]
    end = head.find(b"\r\n\r\n")
    block = head if end < 0 else head[:end]
    return "sha256:" + hashlib.sha256(block).hexdigest()


class IntakeListener:
    """The intake's server: its own writer and handler, one listening socket."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        tls_context: ssl.SSLContext,
        sock: socket.socket | None = None,
        limits: SessionLimits | None = None,
    ) -> None:
        self.settings = settings
        self.limits = limits  # the relay's, shared by every listener (relay/limits.py)
        self.writer = AnswerWriter(settings, engine)
        self.handler = IntakeHandler(self.writer)
        self.peers = Peers.of("intake", settings.intake_network_list, serves="the intake networks")
        self.tls_context = tls_context
        self.port = 0
        self._sock = sock
        self._server: asyncio.Server | None = None
        self._connections: set[RelaySMTP] = set()

    @property
    def counts(self) -> IntakeCounters:
        return self.handler.counts

    @property
    def unmatched(self) -> int:
        """Copies that left nothing: nothing recognised, or no message of ours named."""
        return self.handler.counts.unrecognised + self.writer.store.unmatched

    async def start(self) -> None:
        assert self.settings.intake_port is not None
        await self.writer.start()  # replays what a previous run journaled
        loop = asyncio.get_running_loop()
        try:
            if self._sock is not None:
                server = await loop.create_server(self._protocol, sock=self._sock)
            else:
                server = await loop.create_server(
                    self._protocol, self.settings.host, self.settings.intake_port
                )
        except OSError as exc:
            await self.writer.stop()
            where = f"{self.settings.host}:{self.settings.intake_port}"
            message = f"TRACKRELAY_INTAKE_PORT: cannot listen on {where}: {exc}"
            raise SettingsError(message) from None
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    def _protocol(self) -> RelaySMTP:
        settings = self.settings
        return RelaySMTP(
            self.handler,
            listener="intake",
            peers=self.peers,
            on_open=self._connections.add,
            on_close=self._connections.discard,
            hostname=settings.smtp_hostname,
            ident="trackrelay intake",
            tls_context=self.tls_context,
            data_size_limit=settings.intake_max_size,
            enable_SMTPUTF8=True,
            timeout=settings.idle_timeout,
            data_timeout=settings.data_timeout,
            command_limit=settings.max_commands_without_mail,
            limits=self.limits,
            greeting_timeout=min(settings.greeting_timeout, settings.idle_timeout),
            loop=asyncio.get_running_loop(),
        )

    async def stop(self, grace: float = 10) -> None:
        """Stop accepting, let copies in flight finish, then write what is queued."""
        if self._server is not None:
            self._server.close()
        for protocol in list(self._connections):
            protocol.begin_shutdown()
        for _ in range(int(grace * 10)):
            if not self._connections:
                break
            await asyncio.sleep(0.1)
        for protocol in list(self._connections):
            protocol.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self.writer.stop()
