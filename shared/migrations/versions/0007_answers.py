"""answers: find a message by its Message-ID header

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 12:40:00.000000

Issue 15: a reply, an auto-reply, a bounce or a complaint names the
Message-ID of the message it is about, and the intake writer
(relay/answerstore.py) finds the message by it: an index on
``messages.message_id_header``. The relay records at most
``MAX_MESSAGE_ID_BYTES`` (900) bytes of it (relay/prepared.py), so an index
entry stays below PostgreSQL's B-tree limit (~2.7 kB) whatever a client
sends. Built ``CONCURRENTLY`` on PostgreSQL.

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_messages_message_id_header"


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # Rows recorded before the cap: cut to it, so the index can be built.
        op.execute(
            "UPDATE messages SET message_id_header = left(message_id_header, 900)"
            " WHERE octet_length(message_id_header) > 900"
        )
    concurrently = {"postgresql_concurrently": True} if postgres else {}
    with op.get_context().autocommit_block():
        op.create_index(INDEX, "messages", ["message_id_header"], **concurrently)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="messages")
