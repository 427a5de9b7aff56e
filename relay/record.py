"""Write what was relayed: the Message, one Recipient row each, the Links.

The write runs off the event loop (``asyncio.to_thread``) after the upstream
has answered. A database failure must never turn a delivered message into an
error for the client (who would retry and deliver it twice): it is logged
loudly and the client still gets the upstream's reply.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from relay.track import Prepared
from relay.upstream import Reply
from shared.db import session_scope
from shared.models import Recipient
from shared.outbox import enqueue_message_sent

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    """How one client DATA ended: a reply per recipient and the client's reply."""

    replies: dict[str, Reply]  # every recipient of the message, in RCPT order
    refused_at_rcpt: list[tuple[str, Reply]]  # refused before DATA (client saw it)
    reply: Reply  # what the client gets

    @property
    def status(self) -> str:
        accepted = sum(r.ok for r in self.replies.values())
        if accepted == len(self.replies) and not self.refused_at_rcpt:
            return "sent"
        return "partial" if accepted else "failed"


async def record(engine: Engine, prepared: Prepared, delivery: Delivery) -> None:
    """Log one INFO line and store the rows; never raises."""
    message = prepared.message
    log.info(
        "relayed message %d from <%s> to %d recipient(s), %d bytes: %s (%s)",
        message.id,
        message.sender,
        len(delivery.replies),
        message.size_out,
        delivery.reply,
        delivery.status,
    )
    try:
        await asyncio.to_thread(_write, engine, prepared, delivery)
    except Exception:
        log.exception(
            "DATABASE WRITE FAILED for relayed message %d (mail was delivered)", message.id
        )


def _write(engine: Engine, prepared: Prepared, delivery: Delivery) -> None:
    message = prepared.message
    message.status = delivery.status
    message.upstream_reply = str(delivery.reply)
    outcomes = [*delivery.replies.items(), *delivery.refused_at_rcpt]
    recipients = [
        Recipient(
            message_id=message.id,
            position=position,
            address=address,
            tracked=address in prepared.tracked_recipients,
            status="accepted" if reply.ok else "refused",
            reply_code=reply.code,
            reply_text=reply.text,
        )
        for position, (address, reply) in enumerate(outcomes, start=1)
    ]
    with session_scope(engine) as session:
        session.add(message)
        session.add_all(recipients)
        session.add_all(prepared.links)
        session.flush()
        # message.sent / delivery.failed webhooks commit with the message.
        enqueue_message_sent(session, message, recipients)
