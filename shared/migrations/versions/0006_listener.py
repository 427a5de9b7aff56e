"""messages.listener: which listener a message came through

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:30:00.000000

``submission`` (STARTTLS), ``implicit_tls``, ``plain`` or ``gateway`` (the
organisation's MTA); rows relayed before this revision keep ``''`` (not
known). A plain ADD COLUMN with a constant default: no table rewrite on
PostgreSQL 11+, and SQLite's ALTER TABLE ADD COLUMN needs no batch copy.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column("listener", sa.String(length=16), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("listener")
