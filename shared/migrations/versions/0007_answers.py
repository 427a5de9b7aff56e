"""answers: find a message by its Message-ID header

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-03 12:40:00.000000

Issue 15: a reply, an auto-reply, a bounce or a complaint names the
Message-ID of the message it is about, and the intake writer
(relay/answerstore.py) finds the message by it: an index on
``messages.message_id_header``. On an expression, the first 200 characters,
so that a client's absurdly long Message-ID can never make a message record
too large for a B-tree entry (PostgreSQL refuses index rows over ~2.7 kB,
which would set the record aside); the query compares both the prefix (the
index) and the whole value. Built ``CONCURRENTLY`` on PostgreSQL.

(In the answers branch it follows 0004, which it merged; the lead re-chains.)
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_messages_message_id_prefix"
EXPRESSION = "substr(message_id_header, 1, 200)"
ON = f"({EXPRESSION})"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON messages {ON}")
    else:
        op.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON messages {ON}")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
