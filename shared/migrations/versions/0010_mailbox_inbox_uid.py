"""mailbox connections: where the INBOX watcher left off (UIDVALIDITY and last UID)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 13:30:00.000000

relay/inboxwatch.py reads each connection's INBOX from the UID after
``inbox_last_uid``; a new ``inbox_uidvalidity`` (the mailbox was recreated)
starts again from the UIDs that arrive after it is seen.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("inbox_uidvalidity", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("inbox_last_uid", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.drop_column("inbox_last_uid")
        batch_op.drop_column("inbox_uidvalidity")
