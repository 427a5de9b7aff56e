"""Migration 0009 adds mailbox_connections, cascading with its user, and takes it away."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import Engine, inspect, text

from shared import db


def ann_connected_at_0009(url: str) -> Engine:
    """The schema at 0009 with user ann and her mailbox connection; its engine."""
    db.upgrade(url, "0009")
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
    return engine


def test_0009_up_cascade_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = ann_connected_at_0009(url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE id = 1"))
        assert conn.execute(text("SELECT count(*) FROM mailbox_connections")).scalar() == 0
    command.downgrade(db.alembic_config(url), "0008")
    assert "mailbox_connections" not in inspect(engine).get_table_names()
    engine.dispose()
