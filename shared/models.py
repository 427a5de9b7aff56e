"""The database tables (SQLModel). Schema changes go through Alembic migrations.

Message ids are random 63-bit values minted by the relay before sending, so a
message can be signed into tokens without a database round-trip. Events carry
``message_id`` without a foreign key: a pixel can be loaded before the relay's
record of its message is written (the relay journals records while the
database is down), and retention may purge a message whose tokens still work.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import BigInteger, Column, Date, Index, Integer, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC now: sqlmodel's UTCDateTime columns refuse naive datetimes."""
    return datetime.now(UTC)


class User(SQLModel, table=True):
    """A person: relay user (local auth mode) and/or dashboard user.

    ``role`` is ``admin`` (everything) or ``sender`` (only mail from the
    addresses in :class:`UserAddress`). ``password_hash`` is stdlib scrypt.
    """

    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(index=True, unique=True, max_length=255)
    password_hash: str = Field(max_length=512)
    role: str = Field(default="sender", max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    # Dashboard sessions carry the value they were made with; raising it (sign-out,
    # a new password, shared.users.end_sessions) ends every session of the user.
    session_version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class UserAddress(SQLModel, table=True):
    """An address a user may send as (``a@b.c``) or a whole domain (``@b.c``)."""

    __tablename__ = "user_addresses"
    __table_args__ = (UniqueConstraint("user_id", "address"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True, ondelete="CASCADE")
    address: str = Field(index=True, max_length=320)


class Message(SQLModel, table=True):
    """One message relayed (one client DATA), tracked or not."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_sender_key_created", "sender_key", "created_at", "id"),)

    id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    sender: str = Field(default="", index=True, max_length=320)  # MAIL FROM ('' = null sender)
    from_header: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    subject: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # indexed: answers find their message by it (issue 15, migration 0007)
    message_id_header: str = Field(
        default="", sa_column=Column(Text, nullable=False, default="", index=True)
    )
    auth_user: str = Field(default="", max_length=320)
    client_ip: str = Field(default="", max_length=64)
    size_in: int = 0
    size_out: int = 0
    # tracking decision
    track_opens: bool = False
    track_clicks: bool = False
    per_recipient: bool = False
    decision: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    parts_modified: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # delivery: 'sent' (all accepted), 'partial', 'failed'
    status: str = Field(default="sent", max_length=16)
    upstream_reply: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # the listener it came through: submission, implicit_tls, plain, gateway ('' = before 0006)
    listener: str = Field(default="", max_length=16)
    # --- issue 13: state kept by the writers (shared/eventstate.py; migration 0004) ---
    sender_key: str = Field(default="", max_length=320)  # lower-cased sender (Python's lower())
    opens: int = 0  # counted opens (shared/verdicts.py COUNTED)
    machine_opens: int = 0  # AUTOMATED opens
    self_opens: int = 0
    clicks: int = 0  # counted clicks
    machine_clicks: int = 0
    self_clicks: int = 0
    first_open_at: datetime | None = None  # of counted opens and clicks
    last_open_at: datetime | None = None
    first_click_at: datetime | None = None
    last_click_at: datetime | None = None
    replies: int = 0  # recipients who replied (a message-level answer counts as one)
    auto_replies: int = 0
    bounces: int = 0
    complaints: int = 0
    first_reply_at: datetime | None = None


class Recipient(SQLModel, table=True):
    """One envelope recipient of a message, with its own delivery outcome.

    ``position`` (1-based, in RCPT order) is what per-recipient tokens carry;
    message-level tokens carry 0.
    """

    __tablename__ = "recipients"
    __table_args__ = (UniqueConstraint("message_id", "position"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(sa_column=Column(BigInteger, index=True, nullable=False))
    position: int
    address: str = Field(index=True, max_length=320)
    tracked: bool = False
    status: str = Field(default="accepted", max_length=16)  # accepted | refused
    reply_code: int = 250
    reply_text: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # --- issue 13: state kept by the writers (shared/eventstate.py; migration 0004) ---
    # lower-cased address (Python's lower()): erasure finds a recipient by it
    address_key: str = Field(default="", index=True, max_length=320)
    opens: int = 0  # counted opens (shared/verdicts.py COUNTED)
    machine_opens: int = 0  # AUTOMATED opens
    self_opens: int = 0
    clicks: int = 0  # counted clicks
    machine_clicks: int = 0
    self_clicks: int = 0
    first_open_at: datetime | None = None  # of counted opens and clicks
    last_open_at: datetime | None = None
    first_click_at: datetime | None = None
    last_click_at: datetime | None = None
    replied_at: datetime | None = None  # the first of each answer
    auto_replied_at: datetime | None = None
    bounced_at: datetime | None = None
    complained_at: datetime | None = None
    bounce_type: str = Field(default="", max_length=8)  # hard | soft ('hard' wins)


class Link(SQLModel, table=True):
    """A link rewritten in a message; ``position`` is what click tokens carry."""

    __tablename__ = "links"
    __table_args__ = (UniqueConstraint("message_id", "position"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(sa_column=Column(BigInteger, index=True, nullable=False))
    position: int
    url: str = Field(sa_column=Column(Text, nullable=False))


class Event(SQLModel, table=True):
    """A pixel load or a click, with the receiver's verdict.

    ``recipient_position`` is 0 for message-level tokens; ``link_position`` is 0
    for opens. ``ip`` is truncated (/24, /48) unless configured otherwise.
    ``event_key`` is unique: the journal replays with the same key, so a
    replay after a crash never writes a hit twice.
    """

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_message_kind", "message_id", "kind"),)

    # 64-bit on PostgreSQL; SQLite keeps INTEGER PRIMARY KEY (the rowid, 64-bit already)
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    event_key: str = Field(unique=True, max_length=64)
    message_id: int = Field(sa_column=Column(BigInteger, nullable=False))
    recipient_position: int = 0
    link_position: int = 0
    kind: str = Field(max_length=16)  # open | click | reply | auto_reply | bounce | complaint
    occurred_at: datetime = Field(default_factory=utcnow, index=True)
    ip: str = Field(default="", max_length=64)
    user_agent: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    method: str = Field(default="GET", max_length=8)
    verdict: str = Field(default="unknown", max_length=16)
    reasons: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # answers (issue 15): a bounce's type and what the report said
    bounce_type: str = Field(default="", max_length=8)  # hard | soft
    status_code: str = Field(default="", max_length=16)
    diagnostic: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))


# A message's timeline, latest first, a page at a time (receiver/readmodel/detail.py; 0005).
_events = Event.__table__  # type: ignore[attr-defined]
Index("ix_events_message_time", _events.c.message_id, _events.c.occurred_at, _events.c.id)


class Policy(SQLModel, table=True):
    """Per-sender tracking policy; ``pattern`` is ``a@b.c``, ``@b.c`` or ``*``.

    ``mode``: ``header`` (track when the message asks), ``always``, ``never``.
    ``allow_*`` are ceilings: what may be tracked at most.
    """

    __tablename__ = "policies"

    id: int | None = Field(default=None, primary_key=True)
    pattern: str = Field(unique=True, max_length=320)
    mode: str = Field(default="header", max_length=16)
    allow_opens: bool = True
    allow_clicks: bool = True
    allow_text_links: bool = False
    per_recipient: bool = True
    recipient_cap: int = 20
    notify: bool = False
    updated_at: datetime = Field(default_factory=utcnow)


class _AddressList(SQLModel):
    """A row of a list of recipient addresses: who put it there (``source``) and when.

    The suppression list and the consents have this one shape (each its own
    table); an address is on a list once.
    """

    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(unique=True, max_length=320)
    source: str = Field(default="cli", max_length=16)
    created_at: datetime = Field(default_factory=utcnow)


class Suppression(_AddressList, table=True):
    """A recipient never tracked ("stop tracking me", CLI, dashboard)."""

    __tablename__ = "suppressions"


# --- issue 6: webhooks, API tokens, consent (migration 0002) ---


class WebhookEndpoint(SQLModel, table=True):
    """A URL that receives signed JSON events.

    ``event_types`` is a comma-separated list of event type names, or ``*``.
    ``secret`` signs each delivery (HMAC-SHA256); it must be readable, not
    hashed, because the relay computes signatures with it.
    """

    __tablename__ = "webhook_endpoints"

    id: int | None = Field(default=None, primary_key=True)
    url: str = Field(sa_column=Column(Text, nullable=False))
    secret: str = Field(max_length=128)
    event_types: str = Field(default="*", sa_column=Column(Text, nullable=False, default="*"))
    description: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class OutboxItem(SQLModel, table=True):
    """One notification to deliver: one row per destination per event.

    Rows are inserted in the same transaction as what they announce, so an
    event is never committed without its notifications. ``channel`` is
    ``webhook`` (``endpoint_id`` set, ``target`` its id) or ``email``
    (``target`` the address notified). ``status``: pending -> delivering ->
    delivered | failed; a ``delivering`` row whose ``locked_until`` passed is
    claimed again (its worker died), which makes delivery at-least-once; the
    ``idempotency_key`` travels in the payload and a header so receivers can
    drop the repeat. ``recipient`` is the tracked recipient the event is
    about, so erasure can find the row.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("channel", "target", "idempotency_key"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(default="webhook", max_length=16)
    target: str = Field(max_length=320)
    endpoint_id: int | None = Field(
        default=None, foreign_key="webhook_endpoints.id", index=True, ondelete="CASCADE"
    )
    event_type: str = Field(max_length=64)
    idempotency_key: str = Field(max_length=128)
    message_id: int | None = Field(default=None, sa_column=Column(BigInteger, index=True))
    recipient: str = Field(default="", index=True, max_length=320)
    payload: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow, index=True)
    next_attempt_at: datetime = Field(default_factory=utcnow)
    locked_until: datetime | None = None
    delivered_at: datetime | None = None
    last_error: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))


class DeliveryAttempt(SQLModel, table=True):
    """The delivery log: one row per attempt (shown in the dashboard)."""

    __tablename__ = "delivery_attempts"

    id: int | None = Field(default=None, primary_key=True)
    outbox_id: int = Field(foreign_key="outbox.id", index=True, ondelete="CASCADE")
    attempt: int
    started_at: datetime = Field(default_factory=utcnow, index=True)
    status: str = Field(max_length=16)  # ok | error
    reply_code: int | None = None
    latency_ms: int = 0
    error: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))


class ApiToken(SQLModel, table=True):
    """A bearer token for the JSON API, acting with its user's role.

    Only the SHA-256 of the token is stored (tokens are long random strings,
    so a fast hash is enough); ``prefix`` is shown in lists to tell them apart.
    """

    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255)
    token_hash: str = Field(unique=True, max_length=64)
    prefix: str = Field(max_length=16)
    user_id: int = Field(foreign_key="users.id", index=True, ondelete="CASCADE")
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class Consent(_AddressList, table=True):
    """A recipient who agreed to be tracked (needed in opt-in mode)."""

    __tablename__ = "consents"

    source: str = Field(default="cli", max_length=64)  # free text: an API client may name itself


class ConsentMode(SQLModel, table=True):
    """``opt-out`` (track unless suppressed) or ``opt-in`` per recipient domain.

    ``domain`` ``*`` is the global default; without a row the mode is opt-out.
    """

    __tablename__ = "consent_modes"

    domain: str = Field(primary_key=True, max_length=255)
    mode: str = Field(default="opt-out", max_length=8)
    updated_at: datetime = Field(default_factory=utcnow)


# --- issue 13: rollups kept by the writers (shared/eventstate.py; migration 0004) ---


class DailyStats(SQLModel, table=True):
    """Per sender and UTC day of the MESSAGE's ``created_at``: what the overview draws.

    ``sent``/``track_*`` are added by the relay's record, the rest by
    shared/eventstate.py with the events. ``opened``/``clicked``/``replied``/
    ``bounced`` count messages (tracked for opens / clicks for the first two)
    with at least one counted hit or answer; ``human_opens``/``machine_opens``
    count hits (COUNTED / AUTOMATED opens), ``opens_<verdict>`` opens by
    verdict. Counts with no recipient in them: purge and erase keep them.
    """

    __tablename__ = "daily_stats"

    sender_key: str = Field(primary_key=True, max_length=320)
    day: date = Field(sa_column=Column(Date, primary_key=True))
    sent: int = 0
    track_opens: int = 0
    opened: int = 0
    track_clicks: int = 0
    clicked: int = 0
    human_opens: int = 0
    machine_opens: int = 0
    replied: int = 0
    bounced: int = 0
    opens_human: int = 0
    opens_proxy: int = 0
    opens_machine: int = 0
    opens_scanner: int = 0
    opens_self: int = 0
    opens_unknown: int = 0


class Sender(SQLModel, table=True):
    """Every envelope sender (lower-cased) ever recorded: the sender menu reads this."""

    __tablename__ = "senders"

    sender_key: str = Field(primary_key=True, max_length=320)
    messages: int = 0
    last_at: datetime | None = None


# --- issue 16: mailbox connections (migration 0009; owner: shared/mailbox.py) ---


class MailboxConnection(SQLModel, table=True):
    """A relay user's address tied to an upstream mailbox account through an OAuth grant.

    ``grant`` is the token set (access and refresh token, expiry) encrypted
    with a key derived from TRACKRELAY_SECRET_KEY; nothing else here is
    secret. ``state`` is ``ok`` or ``broken`` (``reason`` says why: a revoked
    grant, an expired refresh token). ``lease_until``/``lease_owner``: the one
    process refreshing the grant now; the others wait for its result.
    ``sent``: ``clean`` (leave one pristine copy in the Sent folder) or ``leave``.
    ``method``: ``oauth`` (``grant`` is the token set) or ``password`` (``grant``
    is the sealed app password; ``login`` is the user name at the provider).
    """

    __tablename__ = "mailbox_connections"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True, ondelete="CASCADE")
    address: str = Field(unique=True, max_length=320)
    provider: str = Field(max_length=64)
    grant: str = Field(sa_column=Column(Text, nullable=False))
    scopes: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    state: str = Field(default="ok", max_length=16)
    reason: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    sent: str = Field(default="clean", max_length=8)
    expires_at: datetime | None = None
    last_refresh_at: datetime | None = None
    last_error: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    last_error_at: datetime | None = None  # when last_error happened; migration 0012
    lease_until: datetime | None = None
    lease_owner: str = Field(default="", max_length=64)
    # where the INBOX watcher (relay/inboxwatch.py) left off; migration 0010
    inbox_uidvalidity: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    inbox_last_uid: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default="0")
    )
    # an app-password connection (shared/mailbox.py store_password); migration 0011
    method: str = Field(
        default="oauth", sa_column=Column(String(8), nullable=False, server_default="oauth")
    )
    login: str = Field(default="", sa_column=Column(String(320), nullable=False, server_default=""))
    created_at: datetime = Field(default_factory=utcnow)
