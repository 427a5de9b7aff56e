"""mailbox connections: app passwords (``method``, ``login``)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 15:15:00.000000

A connection is ``oauth`` (``grant`` holds the sealed token set, as before) or
``password`` (``grant`` holds the sealed app password, ``login`` the user name
at the provider). Existing connections are ``oauth``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("method", sa.String(length=8), nullable=False, server_default="oauth")
        )
        batch_op.add_column(
            sa.Column("login", sa.String(length=320), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.drop_column("login")
        batch_op.drop_column("method")
