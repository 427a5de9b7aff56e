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
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from relay.answerstore import AnswerWriter, item
from relay.peers import Peers
from shared.answers import classify, parse
from shared.config import Settings
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

    def __init__(self, writer: AnswerWriter, max_size: int) -> None:
        self.writer = writer
        self.max_size = max_size  # TRACKRELAY_INTAKE_MAX_SIZE: more is refused with 552
        self.counts = IntakeCounters()

    def size_limit(self) -> int:
        """SIZE, and what DATA accepts (only the first :data:`READ_BYTES` are read)."""
        return self.max_size

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


class Intake:
    """The intake's parts: its writer, its handler and who may connect.

    relay/server.py listens for it (``RelayServer._listen``, the one way every
    listener is opened, limited and stopped), starts its writer before the port
    opens and stops it once the port's last session ended.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.writer = AnswerWriter(settings, engine)
        self.handler = IntakeHandler(self.writer, settings.intake_max_size)
        self.peers = Peers.of("intake", settings.intake_network_list, serves="the intake networks")

    @property
    def counts(self) -> IntakeCounters:
        return self.handler.counts

    @property
    def unmatched(self) -> int:
        """Copies that left nothing: nothing recognised, or no message of ours named."""
        return self.handler.counts.unrecognised + self.writer.store.unmatched
