"""Rows as the relay (messages, recipients, links) and the receiver (events) write them;
a mailbox connection's row read (``row_of``) and its grant replaced (``seal_grant``)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, text, update
from sqlmodel import Session

from shared import eventstate, mailbox
from shared.config import Settings
from shared.db import session_scope
from shared.models import Event, Link, MailboxConnection, Message, Recipient
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
        listener="submission",
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


def settle(engine: Engine) -> None:
    """What the writers keep beside rows a test wrote directly: every message's
    ``sender_key``, then the state columns and rollups (shared/eventstate.py)."""
    with engine.begin() as conn:
        rows = conn.execute(select(Message.id, Message.sender, Message.sender_key))  # type: ignore[call-overload]
        for mid, sender, key in rows.all():
            if key != sender.lower():
                conn.execute(
                    update(Message).where(Message.id == mid).values(sender_key=sender.lower())  # type: ignore[arg-type]
                )
    eventstate.rebuild(engine)


#: Every state column and rollup shared/eventstate.py keeps, in a stable order.
STATE = {
    "messages": "SELECT id, sender_key, opens, machine_opens, self_opens, clicks, machine_clicks,"
    " self_clicks, first_open_at, last_open_at, first_click_at, last_click_at, replies,"
    " auto_replies, bounces, complaints, first_reply_at FROM messages ORDER BY id",
    "recipients": "SELECT message_id, position, address_key, opens, machine_opens, self_opens,"
    " clicks, machine_clicks, self_clicks, first_open_at, last_open_at, first_click_at,"
    " last_click_at, replied_at, auto_replied_at, bounced_at, complained_at, bounce_type"
    " FROM recipients ORDER BY message_id, position",
    "daily_stats": "SELECT * FROM daily_stats ORDER BY sender_key, day",
    "senders": "SELECT * FROM senders ORDER BY sender_key",
}


def state(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """What :data:`STATE` reads, row by row: to compare with a rebuild's."""
    with engine.connect() as conn:
        return {
            table: [dict(row._mapping) for row in conn.execute(text(sql))]
            for table, sql in STATE.items()
        }


def row_of(engine: Engine, connection_id: int) -> MailboxConnection:
    """Mailbox connection CONNECTION_ID as stored now."""
    with Session(engine) as session:
        row = session.get(MailboxConnection, connection_id)
        assert row is not None
        return row


def seal_grant(
    engine: Engine, settings: Settings, connection_id: int, address: str, grant: dict[str, Any]
) -> None:
    """Connection CONNECTION_ID's grant replaced by GRANT, sealed for ADDRESS as the
    relay seals one: an app password revoked since, a token stored before a rule."""
    with Session(engine) as session:
        row = session.get(MailboxConnection, connection_id)
        assert row is not None
        row.grant = mailbox.seal(settings, address, grant)
        session.add(row)
        session.commit()
