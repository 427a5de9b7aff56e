"""users.session_version: dashboard sessions revocable on the server

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 12:30:00.000000

A dashboard session cookie carries the user's session version from when it
was made; the dashboard compares it on each request. Signing out, a new
password or shared.users.end_sessions raise the version, so every cookie of
that user stops working at once (before, a cookie kept working for its whole
12 hours after sign-out). Existing users start at 0; sessions made before this
migration carry no version and are signed out once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("session_version", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("session_version")
