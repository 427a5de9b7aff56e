"""Turn what happened into outbox rows, in the caller's transaction.

An event must never be committed without its notifications, nor a
notification sent for an event that was rolled back: so every ``enqueue_*``
function takes the caller's open ``Session`` (or ``Connection``) and only
inserts; the caller commits. A worker (shared/outbox_worker.py) delivers the rows.

Event types (payloads are documented in the README):

* ``message.sent``            a relayed message (one per message)
* ``delivery.failed``         recipients the upstream refused (one per message)
* ``message.opened``          the first human or proxy open per recipient
* ``message.machine_opened``  the first machine open per recipient (Apple MPP...)
* ``link.clicked``            every click judged human, proxy or unknown
* ``message.replied``, ``message.auto_replied``, ``message.bounced``,
  ``message.complained``      every answer the intake matched (relay/answerstore.py),
                              keyed by its event; the sender's mail for replies and
                              hard bounces
* ``mailbox.disconnected``    a mailbox connection broke (its grant was revoked or expired)

What is "first" is decided once, in shared/notable.py, for webhooks, mail and
the dashboards' live feed alike.

Each row has an idempotency key: ``message.opened`` and
``message.machine_opened`` are keyed by message and recipient, so a second
receiver replica that sees another "first" open cannot announce it twice; the
other events are keyed by what they announce. Inserts skip keys already
present (``ON CONFLICT DO NOTHING``), so a replayed batch adds nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlmodel import Session, col

from shared.db import insert_ignoring
from shared.isotime import iso
from shared.models import Link, Message, OutboxItem, Policy, Recipient, WebhookEndpoint
from shared.models import utcnow as _utcnow
from shared.notable import CLICK, FIRST_MACHINE_OPEN, FIRST_OPEN, mark
from shared.policies import lookup_key, resolve

log = logging.getLogger(__name__)

MESSAGE_SENT = "message.sent"
DELIVERY_FAILED = "delivery.failed"
MESSAGE_OPENED = "message.opened"
MESSAGE_MACHINE_OPENED = "message.machine_opened"
LINK_CLICKED = "link.clicked"
WEBHOOK_TEST = "webhook.test"
# --- answers (issue 15) ---
MESSAGE_REPLIED = "message.replied"
MESSAGE_AUTO_REPLIED = "message.auto_replied"
MESSAGE_BOUNCED = "message.bounced"
MESSAGE_COMPLAINED = "message.complained"
ANSWERED = {
    "reply": MESSAGE_REPLIED,
    "auto_reply": MESSAGE_AUTO_REPLIED,
    "bounce": MESSAGE_BOUNCED,
    "complaint": MESSAGE_COMPLAINED,
}
MAILBOX_DISCONNECTED = "mailbox.disconnected"
EVENT_TYPES = (
    MESSAGE_SENT,
    MESSAGE_OPENED,
    MESSAGE_MACHINE_OPENED,
    LINK_CLICKED,
    DELIVERY_FAILED,
    *ANSWERED.values(),
    MAILBOX_DISCONNECTED,
)

Conn = Session | Connection
EventDict = Mapping[str, Any]
#: An event row as the receiver's writer has it; :func:`enqueue_for_events` marks it.
EventRow = dict[str, Any]
#: The active webhook endpoints: (id, comma-separated event types).
Endpoints = list[tuple[int, str]]
#: A message or recipient as a model object or as its column values.
MessageLike = Message | Mapping[str, Any]
RecipientLike = Recipient | Mapping[str, Any]


@dataclass(frozen=True)
class Notification:
    """One announcement, before it is fanned out to destinations."""

    event_type: str
    key: str
    message_id: int | None
    recipient: str
    data: dict[str, Any]
    sender: str = ""  # MAIL FROM of the message, for the sender's email notification


def payload(event_type: str, key: str, data: Mapping[str, Any], created_at: datetime) -> str:
    """The JSON body delivered for one notification (stable key order)."""
    body = {"id": key, "type": event_type, "created_at": iso(created_at), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def wants(event_types: str, event_type: str) -> bool:
    names = {n.strip() for n in event_types.split(",") if n.strip()}
    return "*" in names or event_type in names


# --- what the relay calls (relay/record.py, same transaction as the message rows) ---


def enqueue_messages_sent(
    conn: Conn, sent: Iterable[tuple[MessageLike, Sequence[RecipientLike]]]
) -> int:
    """Announce relayed messages; also ``delivery.failed`` where a recipient was refused.

    ``sent`` pairs each message with every envelope recipient and its outcome
    (``status`` ``accepted``/``refused``). One call per group commit of the
    relay's record writer: the active endpoints are read once and the rows go
    in one insert; returns the number of outbox rows inserted.

    Messages and recipients may be model objects or their column values (the
    rows the relay inserts with SQLAlchemy Core, ``created_at`` a datetime):
    the payloads are the same either way.
    """
    notes = [note for message, rcpts in sent for note in sent_notifications(message, rcpts)]
    return fan_out(conn, notes)


def sent_notifications(
    message: MessageLike, recipients: Sequence[RecipientLike]
) -> list[Notification]:
    """``message.sent`` for a relayed message; ``delivery.failed`` if a recipient was refused."""
    about = message_data(message)
    data = {"message": about, "recipients": [recipient_data(r) for r in recipients]}
    mid = int(about["id"])
    notes = [Notification(MESSAGE_SENT, f"{MESSAGE_SENT}:{mid}", mid, "", data)]
    refused = [r for r in recipients if _getter(r)("status") != "accepted"]
    if refused:
        notes.append(_delivery_failed(about, refused))
    return notes


def _delivery_failed(about: dict[str, Any], refused: Sequence[RecipientLike]) -> Notification:
    mid = int(about["id"])
    data = {"message": dict(about), "recipients": [recipient_data(r) for r in refused]}
    return Notification(DELIVERY_FAILED, f"{DELIVERY_FAILED}:{mid}", mid, "", data)


# --- what shared/mailbox.py calls when a connection breaks (same transaction) ---


def enqueue_mailbox_disconnected(
    conn: Conn, connection: Mapping[str, Any], *, notify_email: bool = False
) -> int:
    """Announce that a mailbox connection broke: ``connection`` has its ``id``,
    ``address``, ``provider``, ``user``, ``reason`` and ``broken_at`` (ISO time);
    keyed by connection and time, so each break is announced once. ``notify_email``
    (pass ``bool(settings.notify_from)``) also mails the connection's address."""
    key = f"{MAILBOX_DISCONNECTED}:{connection['id']}:{connection['broken_at']}"
    note = Notification(MAILBOX_DISCONNECTED, key, None, "", {"connection": dict(connection)})
    rows = fan_out(conn, [note])
    if notify_email:
        mail = _row("email", str(connection["address"]), None, note, f"notify.{key}", _utcnow())
        rows += insert_rows(conn, [mail])
    return rows


# --- what the receiver calls after writing a batch of events ---


def enqueue_for_events(
    conn: Conn, events: Sequence[EventRow], *, notify_email: bool = False
) -> int:
    """Outbox rows for a batch of events already written in ``conn``'s transaction.

    First it decides what is notable (:func:`shared.notable.mark`, one query
    for the batch) and leaves the answer on each row, ``row["notable"]``: the
    writer reports those rows to the receiver's live feed, which reads nothing
    else. ``notify_email`` also queues the sender's notification mail where
    the sender's policy has ``notify`` on (pass ``bool(settings.notify_from)``).
    """
    conn = connection_of(conn)
    notable = mark(conn, events)
    if not notable:
        return 0
    endpoints = active_endpoints(conn)
    if not endpoints and not notify_email:
        return 0  # nobody to tell: no need to read the messages
    context = _Context.load(conn, notable)
    notes = [_notification(context, event) for event in notable]
    rows = fan_out(conn, notes, endpoints)
    if notify_email:
        rows += _email_notifications(conn, notes)
    return rows


@dataclass
class _Context:
    messages: dict[int, Message]
    recipients: dict[tuple[int, int], Recipient]
    counts: dict[int, int]
    links: dict[tuple[int, int], str]

    @classmethod
    def load(cls, conn: Connection, events: Sequence[EventDict]) -> _Context:
        ids = sorted({int(e["message_id"]) for e in events})
        messages = {m.id: m for m in _load(conn, Message, Message.id.in_(ids))}  # type: ignore[attr-defined]
        recipients = {
            (r.message_id, r.position): r
            for r in _load(conn, Recipient, Recipient.message_id.in_(ids))  # type: ignore[attr-defined]
        }
        counts: dict[int, int] = {}
        for mid, _ in recipients:
            counts[mid] = counts.get(mid, 0) + 1
        links = {
            (link.message_id, link.position): link.url
            for link in _load(conn, Link, Link.message_id.in_(ids))  # type: ignore[attr-defined]
        }
        return cls(messages, recipients, counts, links)

    def recipient(self, message_id: int, position: int) -> Recipient | None:
        if position == 0 and self.counts.get(message_id) == 1:
            position = 1  # a message-level token of a one-recipient message is about that one
        return self.recipients.get((message_id, position))


def connection_of(conn: Conn) -> Connection:
    """The Connection of ``conn``'s transaction; pending ORM objects are flushed first."""
    if isinstance(conn, Session):
        conn.flush()
        return conn.connection()
    return conn


def _load(conn: Connection, model: Any, where: Any) -> list[Any]:
    table = model.__table__
    return [model(**row._mapping) for row in conn.execute(select(table).where(where))]


#: What each notable kind is announced as (shared/notable.py decides the kind).
ANNOUNCED = {
    FIRST_OPEN: MESSAGE_OPENED,
    FIRST_MACHINE_OPEN: MESSAGE_MACHINE_OPENED,
    CLICK: LINK_CLICKED,
    **ANSWERED,
}


def _notification(context: _Context, event: EventDict) -> Notification:
    """The announcement of one notable event (marked by :func:`shared.notable.mark`)."""
    event_type = ANNOUNCED[event["notable"]]
    mid, position = int(event["message_id"]), int(event.get("recipient_position", 0))
    message = context.messages.get(mid)
    recipient = context.recipient(mid, position)
    data: dict[str, Any] = {
        "message": message_data(message) if message else {"id": str(mid)},
        "recipient": recipient_data(recipient) if recipient else None,
        "event": event_data(event),
    }
    address = recipient.address if recipient else ""
    sender = message.sender if message else ""
    if event_type == LINK_CLICKED:
        link_position = int(event.get("link_position", 0))
        url = event.get("url") or context.links.get((mid, link_position))
        data["link"] = {"position": link_position, "url": url}
        key = f"{LINK_CLICKED}:{event['event_key']}"
    elif event_type in ANSWERED.values():  # each answer once, by its event
        key = f"{event_type}:{event['event_key']}"
        if recipient is None:
            data["recipient"] = None  # someone else answered (or the report named nobody)
    else:  # one per recipient copy: a replica that saw another "first" adds nothing
        key = f"{event_type}:{mid}:{position}"
    return Notification(event_type, key, mid, address, data, sender)


# --- fan-out to destinations ---


_ACTIVE_ENDPOINTS = select(col(WebhookEndpoint.id), col(WebhookEndpoint.event_types)).where(
    col(WebhookEndpoint.active).is_(True)
)


def active_endpoints(conn: Connection) -> Endpoints:
    """(id, event types) of every endpoint that is not paused."""
    return [(id_ or 0, event_types) for id_, event_types in conn.execute(_ACTIVE_ENDPOINTS)]


def fan_out(conn: Conn, notes: Sequence[Notification], endpoints: Endpoints | None = None) -> int:
    """Insert one outbox row per active webhook endpoint that wants each note.

    ``endpoints``: the active endpoints' (id, event types), if the caller read them.
    """
    if not notes:
        return 0
    conn = connection_of(conn)
    if endpoints is None:
        endpoints = active_endpoints(conn)
    now = _utcnow()
    rows = [
        _row("webhook", str(endpoint_id), endpoint_id, note, note.key, now)
        for note in notes
        for endpoint_id, event_types in endpoints
        if wants(event_types, note.event_type)
    ]
    return insert_rows(conn, rows)


def _email_notifications(conn: Connection, notes: Sequence[Notification]) -> int:
    """The sender's mail on the first open and the first click per recipient, on a
    reply and on a hard bounce."""
    now = _utcnow()
    rows = []
    wanted: dict[str, bool] = {}  # sender -> policy says notify (asked once per batch)
    for note in notes:
        what = _mailed(note)
        if not what or not note.sender:
            continue
        if note.sender not in wanted:
            wanted[note.sender] = sender_wants_mail(conn, note.sender)
        if not wanted[note.sender]:
            continue
        position = (note.data.get("recipient") or {}).get("position", 0)
        key = f"notify.{what}:{note.message_id}:{position}"
        if what in ("reply", "bounce"):
            key = f"notify.{what}:{note.data['event']['id']}"
        rows.append(_row("email", note.sender, None, note, key, now))
    return insert_rows(conn, rows)


def _mailed(note: Notification) -> str:
    """What the sender's notification mail says of ``note`` ("" for none)."""
    if note.event_type == MESSAGE_OPENED:
        return "open"
    if note.event_type == LINK_CLICKED:
        return "click"
    if note.event_type == MESSAGE_REPLIED:
        return "reply"
    if note.event_type == MESSAGE_BOUNCED and note.data["event"].get("bounce_type") == "hard":
        return "bounce"
    return ""


def _row(
    channel: str, target: str, endpoint_id: int | None, note: Notification, key: str, now: datetime
) -> dict[str, Any]:
    """An outbox row announcing ``note`` to one destination."""
    return {
        "channel": channel,
        "target": target,
        "endpoint_id": endpoint_id,
        "event_type": note.event_type,
        "idempotency_key": key,
        "message_id": note.message_id,
        "recipient": note.recipient,
        "payload": payload(note.event_type, key, note.data, now),
        "created_at": now,
        "next_attempt_at": now,
    }


def sender_wants_mail(conn: Conn, sender: str) -> bool:
    """The policy that applies to ``sender`` (shared/policies.py rules) has notify on."""
    exact, domain = lookup_key(sender)
    table = Policy.__table__  # type: ignore[attr-defined]
    rows = connection_of(conn).execute(
        select(table).where(table.c.pattern.in_((exact, domain, "*")))
    )
    return resolve({row.pattern: Policy(**row._mapping) for row in rows}, sender).notify


def insert_rows(conn: Conn, rows: list[dict[str, Any]]) -> int:
    """Insert outbox rows, skipping (channel, target, key) already present."""
    if not rows:
        return 0
    conn = connection_of(conn)
    table = OutboxItem.__table__  # type: ignore[attr-defined]
    statement = insert_ignoring(table, None, conn.dialect.name).returning(table.c.id)
    # One executemany ("insertmanyvalues": a multi-row INSERT); RETURNING tells
    # which rows were not skipped, on both databases.
    inserted = len(conn.execute(statement, rows).all())
    if inserted:
        log.debug("queued %d outbox rows", inserted)
    return inserted


# --- payload pieces ---


def message_data(message: MessageLike) -> dict[str, Any]:
    m = _getter(message)
    return {
        "id": str(m("id")),
        "sender": m("sender"),
        "from": m("from_header"),
        "subject": m("subject"),
        "message_id_header": m("message_id_header"),
        "sent_at": iso(m("created_at")),
        "status": m("status"),
        "track_opens": m("track_opens"),
        "track_clicks": m("track_clicks"),
        "listener": m("listener"),
    }


def recipient_data(recipient: RecipientLike) -> dict[str, Any]:
    r = _getter(recipient)
    return {
        "position": r("position"),
        "address": r("address"),
        "tracked": r("tracked"),
        "status": r("status"),
        "reply_code": r("reply_code"),
        "reply_text": r("reply_text"),
    }


def _getter(row: Message | Recipient | Mapping[str, Any]) -> Callable[[str], Any]:
    """Read a field of a model object or of its column values alike."""
    if isinstance(row, Mapping):
        return row.__getitem__
    return lambda name: getattr(row, name)


def event_data(event: EventDict) -> dict[str, Any]:
    reasons = event.get("reasons") or []
    if isinstance(reasons, str):
        reasons = [r.strip() for r in reasons.split(",") if r.strip()]
    data = {
        "id": event["event_key"],
        "kind": event.get("kind"),
        "occurred_at": iso(event.get("occurred_at")),
        "verdict": event.get("verdict", "unknown"),
        "reasons": list(reasons),
        "ip": event.get("ip", ""),
        "user_agent": event.get("user_agent", ""),
    }
    if event.get("kind") == "bounce":
        data["bounce_type"] = event.get("bounce_type", "")
        data["status"] = event.get("status_code", "")
        data["diagnostic"] = event.get("diagnostic", "")
    return data
