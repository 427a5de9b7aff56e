"""Migration 0011 adds the app-password columns; existing connections are OAuth ones."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, text

from shared import db


def test_0011_up_keeps_rows_as_oauth_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url, "0010")
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
                " (1, 'ann@example.com', 'test', 'v1.x.y', '', 'ok', '', 'clean', '', '',"
                " '2026-12-03 12:00:00')"
            )
        )
    db.upgrade(url, "0011")
    with engine.begin() as conn:
        row = conn.execute(text("SELECT address, method, login FROM mailbox_connections")).one()
    assert tuple(row) == ("ann@example.com", "oauth", "")
    command.downgrade(db.alembic_config(url), "0010")
    columns = {c["name"] for c in inspect(engine).get_columns("mailbox_connections")}
    assert "method" not in columns
    assert "login" not in columns
    assert "inbox_last_uid" in columns
    engine.dispose()
