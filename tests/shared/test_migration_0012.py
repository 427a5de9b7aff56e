"""Migration 0012 adds ``last_error_at`` to mailbox connections; existing rows have none."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, text

from shared import db


def test_0012_up_keeps_rows_without_a_time_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url, "0011")
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, created_at)"
                " VALUES (1, 'ann', 'x', 'sender', '2026-12-03 12:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO mailbox_connections (user_id, address, provider, grant, scopes,"
                " state, reason, sent, last_error, lease_owner, created_at) VALUES"
                " (1, 'ann@example.com', 'test', 'v1.x.y', '', 'ok', '', 'clean', 'away', '',"
                " '2026-12-03 12:00:00')"
            )
        )
    db.upgrade(url, "0012")
    with engine.begin() as conn:
        row = conn.execute(text("SELECT last_error, last_error_at FROM mailbox_connections")).one()
    assert tuple(row) == ("away", None)
    command.downgrade(db.alembic_config(url), "0011")
    columns = {c["name"] for c in inspect(engine).get_columns("mailbox_connections")}
    assert "last_error_at" not in columns
    assert "method" in columns
    engine.dispose()
