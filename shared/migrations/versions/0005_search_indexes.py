"""read indexes: pg_trgm GIN indexes for the search, events by message and time

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 12:30:00.000000

The messages list's text search is ``lower(column) LIKE '%text%'`` over the
subject and every recipient address (receiver/readmodel/scope.py). A B-tree
cannot serve a pattern that starts with ``%``; a trigram GIN index can
(``gin_trgm_ops`` supports LIKE for patterns with three or more characters
between the wildcards). PostgreSQL only: the extension is created if missing
(pg_trgm is a trusted extension since PostgreSQL 13, so the database owner may
create it) and each index is built ``CONCURRENTLY`` in an autocommit block,
so a large table is not locked against writes while it is built. SQLite has
no trigram index: this migration does nothing there and the search scans
(the documented slower path, README "The dashboard").

``ix_events_message_time`` (message_id, occurred_at, id), on both databases,
serves a message's timeline a page at a time, latest first
(receiver/readmodel/detail.py): without it the page of a message with 50,000
events sorts all of them.

The trigram indexes are expression indexes outside the models (shared/models.py):
migration-owned, as ``shared/migrations/env.py`` tells autogenerate.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_messages_subject_trgm": ("messages", "subject"),
    "ix_recipients_address_trgm": ("recipients", "address"),
}


TIMELINE = ("ix_events_message_time", "events", ["message_id", "occurred_at", "id"])


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(*TIMELINE)
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    with op.get_context().autocommit_block():
        for name, (table, column) in INDEXES.items():
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} "
                f"ON {table} USING gin (lower({column}) gin_trgm_ops)"
            )
        op.create_index(*TIMELINE, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(TIMELINE[0], table_name="events")
        return
    with op.get_context().autocommit_block():
        for name in (*INDEXES, TIMELINE[0]):
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
