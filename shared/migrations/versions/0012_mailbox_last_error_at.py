"""mailbox connections: when the last error happened (``last_error_at``)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 16:10:00.000000

``last_error`` said what went wrong at a connection's last use that did not
break it (a provider away, the relay's client refused); ``last_error_at``
says when, for ``trackrelay mailbox list`` and the Mailbox page. Existing
rows have none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_error_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("mailbox_connections", schema=None) as batch_op:
        batch_op.drop_column("last_error_at")
