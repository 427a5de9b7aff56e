"""scale state: per-recipient and per-message state, daily rollups, senders, 64-bit event ids

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 12:20:00.000000

Issue 13: a page must not cost more because more mail was ever sent, so the
figures the readers filter and draw are columns kept by the writers
(shared/eventstate.py) in the same transaction as the events:

* ``events``: ``id`` 64-bit on PostgreSQL (SQLite's INTEGER PRIMARY KEY is
  the rowid, 64-bit already); ``kind`` widened to 16 characters for the
  answers (reply, auto_reply, bounce, complaint); ``bounce_type``,
  ``status_code``, ``diagnostic``.
* ``recipients`` and ``messages``: counters, first/last times and answers;
  ``messages.sender_key`` (the lower-cased envelope sender) with
  ``ix_messages_sender_key_created``; ``recipients.address_key`` (the
  lower-cased address) with ``ix_recipients_address_key`` for erasure.
* ``daily_stats`` (per sender per day of the message) and ``senders``.

Existing rows are backfilled here, in this migration's transaction, by the
SQL of shared/eventstate.py's whole-table ``rebuild`` as it was when this
migration was written (frozen below, not imported: a later change to
eventstate, or a column a later migration adds, must not change what this
step did). On a fresh table every state column holds its default, so the
backfill is one aggregate over the events per table, an INSERT for each
rollup, and no "no event left" clearing. tests/shared/test_migration_0004.py
checks that it still equals ``trackrelay db rebuild-state`` at head.

Locks on a large PostgreSQL database: the new columns have constant defaults
(no rewrite since PostgreSQL 11) and widening a varchar rewrites nothing, but
``events.id`` to bigint rewrites ``events`` under an exclusive lock (about a
minute per 10 million events): run it in a quiet hour. The indexes are built
``CONCURRENTLY`` after the backfill commits.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sqlmodel.sql.sqltypes.UTCDateTime
_COUNTERS = ("opens", "machine_opens", "self_opens", "clicks", "machine_clicks", "self_clicks")
_TIMES = ("first_open_at", "last_open_at", "first_click_at", "last_click_at")
_RECIPIENT_ANSWERS = ("replied_at", "auto_replied_at", "bounced_at", "complained_at")
_MESSAGE_ANSWERS = ("replies", "auto_replies", "bounces", "complaints")
_DAILY = (
    "sent",
    "track_opens",
    "opened",
    "track_clicks",
    "clicked",
    "human_opens",
    "machine_opens",
    "replied",
    "bounced",
    "opens_human",
    "opens_proxy",
    "opens_machine",
    "opens_scanner",
    "opens_self",
    "opens_unknown",
)


def _count(name: str) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.Integer(), nullable=False, server_default="0")


def _text(name: str, length: int) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        name, sqlmodel.sql.sqltypes.AutoString(length=length), nullable=False, server_default=""
    )


def _events_up(postgres: bool) -> None:
    with op.batch_alter_table("events") as batch:
        if postgres:
            batch.alter_column("id", type_=sa.BigInteger(), existing_nullable=False)
        batch.alter_column(
            "kind",
            type_=sqlmodel.sql.sqltypes.AutoString(length=16),
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=8),
            existing_nullable=False,
        )
        batch.add_column(_text("bounce_type", 8))
        batch.add_column(_text("status_code", 16))
        batch.add_column(sa.Column("diagnostic", sa.Text(), nullable=False, server_default=""))
    if postgres:
        op.execute("ALTER SEQUENCE IF EXISTS events_id_seq AS bigint")


def _tables_up() -> None:
    op.create_table(
        "daily_stats",
        sa.Column("sender_key", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        *(_count(name) for name in _DAILY),
        sa.PrimaryKeyConstraint("sender_key", "day"),
    )
    op.create_table(
        "senders",
        sa.Column("sender_key", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        _count("messages"),
        sa.Column("last_at", _TIME(), nullable=True),
        sa.PrimaryKeyConstraint("sender_key"),
    )


def _columns_up() -> None:
    # Plain ADD COLUMN on both databases (SQLite needs no table copy for these).
    for name in _COUNTERS:
        op.add_column("recipients", _count(name))
    for name in (*_TIMES, *_RECIPIENT_ANSWERS):
        op.add_column("recipients", sa.Column(name, _TIME(), nullable=True))
    op.add_column("recipients", _text("bounce_type", 8))
    op.add_column("recipients", _text("address_key", 320))
    op.add_column("messages", _text("sender_key", 320))
    for name in (*_COUNTERS, *_MESSAGE_ANSWERS):
        op.add_column("messages", _count(name))
    for name in (*_TIMES, "first_reply_at"):
        op.add_column("messages", sa.Column(name, _TIME(), nullable=True))


def _lower(table: str, column: str, key: str, postgres: bool) -> None:
    """``key = lower(column)`` in SQL, then Python's ``lower()`` where they may differ
    (non-ASCII text: SQLite's lower() knows only ASCII)."""
    conn = op.get_bind()
    conn.execute(sa.text(f"UPDATE {table} SET {key} = lower({column})"))  # noqa: S608
    unusual = f"{column} ~ '[^ -~]'" if postgres else f"{column} GLOB '*[^ -~]*'"
    rows = conn.execute(sa.text(f"SELECT id, {column} FROM {table} WHERE {unusual}")).all()  # noqa: S608
    for id_, value in rows:
        conn.execute(
            sa.text(f"UPDATE {table} SET {key} = :key WHERE id = :id"),  # noqa: S608
            {"key": value.lower(), "id": id_},
        )


# --- the backfill: eventstate.rebuild's SQL of 2026-12-03, frozen ---

_HUMAN, _PROXY, _MACHINE, _SCANNER, _SELF = "human", "proxy", "machine", "scanner", "self"
_VERDICTS = (_HUMAN, _PROXY, _MACHINE, _SCANNER, _SELF, "unknown")
_COUNTED = (_HUMAN, _PROXY)
_AUTOMATED = (_MACHINE, _SCANNER)
#: answer kind -> (recipient column, message counter)
_ANSWERS = {
    "reply": ("replied_at", "replies"),
    "auto_reply": ("auto_replied_at", "auto_replies"),
    "bounce": ("bounced_at", "bounces"),
    "complaint": ("complained_at", "complaints"),
}


def _in(verdicts: Sequence[str]) -> str:
    return f"verdict IN ({', '.join(repr(v) for v in verdicts)})"


def _hits() -> list[str]:
    """COUNTERS, then the first/last times of counted opens and clicks."""
    out = []
    for kind, noun in (("open", "opens"), ("click", "clicks")):
        for verdicts, name in (
            (_COUNTED, noun),
            (_AUTOMATED, f"machine_{noun}"),
            ((_SELF,), f"self_{noun}"),
        ):
            when = f"kind = '{kind}' AND {_in(verdicts)}"
            out.append(f"sum(CASE WHEN {when} THEN 1 ELSE 0 END) AS {name}")
    for kind in ("open", "click"):
        when = f"CASE WHEN kind = '{kind}' AND {_in(_COUNTED)} THEN occurred_at END"
        out += [f"min({when}) AS first_{kind}_at", f"max({when}) AS last_{kind}_at"]
    return out


def _recipient_figures() -> list[str]:
    out = _hits()
    out += [
        f"min(CASE WHEN kind = '{kind}' THEN occurred_at END) AS {column}"
        for kind, (column, _) in _ANSWERS.items()
    ]
    out.append(
        "coalesce(min(CASE WHEN kind = 'bounce' AND bounce_type <> '' THEN bounce_type END),"
        " '') AS bounce_type"
    )
    return out


def _message_figures() -> list[str]:
    """Hits; recipients who answered so (a message-level answer counting as one when no
    recipient has); the first reply."""
    out = _hits()
    for kind, (_, counter) in _ANSWERS.items():
        named = (
            f"count(DISTINCT CASE WHEN kind = '{kind}' AND recipient_position > 0"
            " THEN recipient_position END)"
        )
        out.append(
            f"CASE WHEN {named} > 0 THEN {named}"
            f" ELSE max(CASE WHEN kind = '{kind}' THEN 1 ELSE 0 END) END AS {counter}"
        )
    out.append("min(CASE WHEN kind = 'reply' THEN occurred_at END) AS first_reply_at")
    return out


def _names(figures: list[str]) -> list[str]:
    return [f.rsplit(" AS ", 1)[1] for f in figures]


def _set(table: str, figures: list[str], group: str, match: str) -> str:
    names = _names(figures)
    return (
        f"UPDATE {table} SET {', '.join(f'{c} = a.{c}' for c in names)}"  # noqa: S608
        f" FROM (SELECT {group}, {', '.join(figures)} FROM events GROUP BY {group}) AS a"
        f" WHERE {match}"
    )


def _backfill(postgres: bool) -> None:
    """The state of the mail already stored, counted from its events."""
    day = "CAST((m.created_at AT TIME ZONE 'UTC') AS date)" if postgres else "date(m.created_at)"
    verdicts = ", ".join(
        f"sum(CASE WHEN verdict = '{v}' THEN 1 ELSE 0 END) AS {v}" for v in _VERDICTS
    )
    daily = [
        "count(*)",
        "sum(CASE WHEN m.track_opens THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.track_opens AND m.opens > 0 THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.track_clicks THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.track_clicks AND m.clicks > 0 THEN 1 ELSE 0 END)",
        "sum(m.opens)",
        "sum(m.machine_opens)",
        "sum(CASE WHEN m.replies > 0 THEN 1 ELSE 0 END)",
        "sum(CASE WHEN m.bounces > 0 THEN 1 ELSE 0 END)",
        *(f"coalesce(sum(v.{v}), 0)" for v in _VERDICTS),
    ]
    statements = [
        _set(
            "recipients",
            _recipient_figures(),
            "message_id, recipient_position",
            "recipients.message_id = a.message_id AND recipients.position = a.recipient_position",
        ),
        _set("messages", _message_figures(), "message_id", "messages.id = a.message_id"),
        f"INSERT INTO daily_stats (sender_key, day, {', '.join(_DAILY)})"  # noqa: S608
        f" SELECT m.sender_key, {day}, {', '.join(daily)} FROM messages AS m"
        f" LEFT JOIN (SELECT message_id, {verdicts} FROM events WHERE kind = 'open'"
        " GROUP BY message_id) AS v ON v.message_id = m.id"
        f" GROUP BY m.sender_key, {day}",
        "INSERT INTO senders (sender_key, messages, last_at)"
        " SELECT sender_key, count(*), max(created_at) FROM messages GROUP BY sender_key",
    ]
    conn = op.get_bind()
    for sql in statements:
        conn.execute(sa.text(sql))


def _indexes_up(postgres: bool) -> None:
    concurrently = {"postgresql_concurrently": True} if postgres else {}
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_messages_sender_key_created",
            "messages",
            ["sender_key", "created_at", "id"],
            **concurrently,
        )
        op.create_index("ix_recipients_address_key", "recipients", ["address_key"], **concurrently)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    _events_up(postgres)
    _columns_up()
    _tables_up()
    _lower("messages", "sender", "sender_key", postgres)
    _lower("recipients", "address", "address_key", postgres)
    _backfill(postgres)
    _indexes_up(postgres)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.drop_index("ix_recipients_address_key", table_name="recipients")
    op.drop_index("ix_messages_sender_key_created", table_name="messages")
    op.drop_table("senders")
    op.drop_table("daily_stats")
    with op.batch_alter_table("messages") as batch:
        for name in ("sender_key", *_COUNTERS, *_MESSAGE_ANSWERS, *_TIMES, "first_reply_at"):
            batch.drop_column(name)
    with op.batch_alter_table("recipients") as batch:
        for name in ("address_key", *_COUNTERS, *_TIMES, *_RECIPIENT_ANSWERS, "bounce_type"):
            batch.drop_column(name)
    with op.batch_alter_table("events") as batch:
        for name in ("bounce_type", "status_code", "diagnostic"):
            batch.drop_column(name)
        batch.alter_column(
            "kind",
            type_=sqlmodel.sql.sqltypes.AutoString(length=8),
            existing_type=sqlmodel.sql.sqltypes.AutoString(length=16),
            existing_nullable=False,
        )
        if postgres:
            batch.alter_column("id", type_=sa.Integer(), existing_nullable=False)
