"""mailbox connections: OAuth grants tying a relay user's address to a mailbox

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:40:00.000000

One new table (shared/models.py MailboxConnection, owned by
shared/mailbox.py); rows go with their user (ON DELETE CASCADE).
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "mailbox_connections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("address", sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        sa.Column("provider", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("grant", sa.Text(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("sent", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_refresh_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("lease_until", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("lease_owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("address"),
    )
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_mailbox_connections_user_id"), ["user_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mailbox_connections_user_id"))
    op.drop_table("mailbox_connections")
