"""What goes into the tracking pipeline and what comes out of it, as plain data.

The handler hands a :class:`Submission` (one client DATA) to the Tracker and
gets a :class:`Prepared` back: the :class:`Copy` objects to send upstream, the
message's record and its tracked links. The recorder (relay/record.py) turns
the record into journal-ready JSON and rows.

Why plain dataclasses and not the SQLModel ``Message``: building a SQLModel
table object costs ~150 us (``__setattr__`` per field, SQLAlchemy attribute
events), ~30 us even through ``model_construct`` and SQLAlchemy's class
manager, and nothing here needs an ORM object: the recorder inserts rows with
Core. :class:`MessageRecord` has the fields of ``shared.models.Message`` in
its order with its defaults, and :meth:`MessageRecord.as_json` is what
``Message.model_dump(mode="json")`` gave, so journal lines and the rows stored
are the same as before (tests/test_track.py checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.header import decode_header, make_header
from typing import Any, NamedTuple

from relay.headers import Field, Segment, first
from shared.models import utcnow


@dataclass(frozen=True)
class Submission:
    message_id: int
    sender: str
    recipients: list[str]
    data: bytes
    auth_user: str
    client_ip: str
    listener: str = ""  # as the record names it: recorded_listener()
    commands: tuple[str, ...] = ()  # Bcc commands (relay/policy.py), never recipients


@dataclass
class Copy:
    """One upstream transaction: its recipients and its bytes, as segments
    (views of the received message, and the few bytes tracking made new)."""

    recipients: list[str]
    segments: list[Segment]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def data(self) -> bytes:
        """The copy as one bytes object: a new copy of all of it (for tests and
        small uses; delivery writes :attr:`segments`)."""
        return b"".join(self.segments)


class LinkRow(NamedTuple):
    """A row of the ``links`` table (plain data: the recorder inserts it with Core)."""

    message_id: int
    position: int
    url: str


@dataclass
class MessageRecord:
    """The ``messages`` row of one relayed message: the fields of shared.models.Message
    but those its writers keep (shared/eventstate.py ``MESSAGE_KEPT``)."""

    id: int
    created_at: datetime = field(default_factory=utcnow)
    sender: str = ""  # MAIL FROM ('' = null sender)
    from_header: str = ""
    subject: str = ""
    message_id_header: str = ""
    auth_user: str = ""
    client_ip: str = ""
    size_in: int = 0
    size_out: int = 0
    track_opens: bool = False
    track_clicks: bool = False
    per_recipient: bool = False
    decision: str = ""  # JSON: what was decided and why
    parts_modified: str = ""  # JSON: one object per rewritten part
    status: str = "sent"  # delivery: 'sent' (all accepted), 'partial', 'failed'
    upstream_reply: str = ""
    listener: str = ""  # submission, implicit_tls, plain, gateway

    def as_json(self) -> dict[str, Any]:
        """The record as JSON-ready data, as pydantic's JSON mode wrote it."""
        values = dict(vars(self))  # field order: __init__ sets them in order
        stamp = self.created_at.isoformat()
        values["created_at"] = stamp[:-6] + "Z" if stamp.endswith("+00:00") else stamp
        return values


@dataclass
class Prepared:
    copies: list[Copy]
    message: MessageRecord
    links: list[LinkRow]
    tracked_recipients: set[str]
    record: bool = True  # False: passed on unchanged, already recorded (a gateway stamp)


def message_record(sub: Submission, fields: list[Field]) -> MessageRecord:
    """The record of ``sub`` before any decision: envelope, headers, sizes."""

    def header(name: str) -> str:
        f = first(fields, name)
        return decoded(f.value) if f else ""

    return MessageRecord(
        id=sub.message_id,
        sender=sub.sender.strip("<>"),
        from_header=header("from"),
        subject=header("subject"),
        message_id_header=capped(header("message-id"), MAX_MESSAGE_ID_BYTES),
        auth_user=sub.auth_user,
        client_ip=sub.client_ip,
        size_in=len(sub.data),
        size_out=len(sub.data),
        listener=sub.listener,
    )


#: The listeners as the record (and the API, the dashboard, webhooks) names them.
RECORDED_LISTENERS = {"smtp": "submission", "smtps": "implicit_tls"}


def recorded_listener(listener: str) -> str:
    """``smtp`` -> ``submission``, ``smtps`` -> ``implicit_tls``; others as they are."""
    return RECORDED_LISTENERS.get(listener, listener)


#: The most of a Message-ID recorded (bytes of UTF-8): the column is indexed
#: (migration 0007) and a PostgreSQL B-tree entry holds ~2.7 kB at most.
MAX_MESSAGE_ID_BYTES = 900


def capped(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` bytes of UTF-8 (never inside a character)."""
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return value
    return data[:limit].decode("utf-8", "ignore")


def decoded(value: str) -> str:
    """A header value with its RFC 2047 encoded words decoded (as it was, if broken)."""
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value
