"""Rows as the relay (messages, recipients, links) and the receiver (events) write them."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from shared import eventstate
from shared.db import session_scope
from shared.models import Event, Link, Message, Recipient
from shared.tokens import new_message_id

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def add_message(
    engine: Engine,
    sender: str = "alice@example.com",
    recipients: tuple[str, ...] = ("bob@client.test", "carol@other.test"),
    subject: str = "Quarterly numbers",
    created_at: datetime = T0,
    tracked: bool = True,
    refused: tuple[str, ...] = (),
    links: tuple[str, ...] = ("https://example.com/report",),
) -> Message:
    message = Message(
        id=new_message_id(),
        created_at=created_at,
        sender=sender,
        sender_key=sender.lower(),
        from_header=f"Alice <{sender}>",
        subject=subject,
        message_id_header=f"<{secrets.token_hex(6)}@example.com>",
        track_opens=tracked,
        track_clicks=tracked,
        per_recipient=True,
        status="partial" if refused else "sent",
    )
    with session_scope(engine) as session:
        session.add(message)
        for position, address in enumerate(recipients, 1):
            bad = address in refused
            session.add(
                Recipient(
                    message_id=message.id,
                    position=position,
                    address=address,
                    address_key=address.lower(),
                    tracked=tracked,
                    status="refused" if bad else "accepted",
                    reply_code=550 if bad else 250,
                    reply_text="5.1.1 no such user" if bad else "OK",
                )
            )
        for position, url in enumerate(links, 1):
            session.add(Link(message_id=message.id, position=position, url=url))
        session.flush()
        eventstate.recorded(session.connection(), [message.id])
    return message


def event(
    message: Message,
    kind: str = "open",
    recipient: int = 1,
    verdict: str = "human",
    at: datetime | None = None,
    link: int = 0,
) -> dict[str, Any]:
    return {
        "event_key": secrets.token_hex(16),
        "message_id": message.id,
        "recipient_position": recipient,
        "link_position": link if kind == "click" else 0,
        "kind": kind,
        "occurred_at": at or message.created_at + timedelta(hours=1),
        "ip": "198.51.100.0",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0",
        "method": "GET",
        "verdict": verdict,
        "reasons": "ua:browser",
    }


def write_events(engine: Engine, events: list[dict[str, Any]]) -> None:
    """Insert events the way the receiver's batch writer does (with the state they change)."""
    with session_scope(engine) as session:
        for item in events:
            session.add(Event(**item))
        session.flush()
        eventstate.apply(session.connection(), map(facts, events))


def facts(item: dict[str, Any]) -> eventstate.Facts:
    """What shared/eventstate.py counts of one event row."""
    return (
        item["message_id"],
        item.get("recipient_position", 0),
        item["kind"],
        item.get("verdict", "unknown"),
        item["occurred_at"],
        item.get("bounce_type", ""),
    )
