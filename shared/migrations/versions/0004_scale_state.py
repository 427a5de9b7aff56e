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

Existing rows are backfilled here by shared/eventstate.py's ``rebuild`` (the
one owner of what the columns mean), in this migration's transaction.

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
    from shared import eventstate  # the owner of what the state columns mean

    postgres = op.get_bind().dialect.name == "postgresql"
    _events_up(postgres)
    _columns_up()
    _tables_up()
    _lower("messages", "sender", "sender_key", postgres)
    _lower("recipients", "address", "address_key", postgres)
    eventstate.rebuild_connection(op.get_bind())
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
