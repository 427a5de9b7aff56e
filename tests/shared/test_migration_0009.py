"""Migration 0009 adds mailbox_connections, cascading with its user, and takes it away."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, text

from shared import db
from tests.conftest import ann_connected_at


def test_0009_up_cascade_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = ann_connected_at(url, "0009")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE id = 1"))
        assert conn.execute(text("SELECT count(*) FROM mailbox_connections")).scalar() == 0
    command.downgrade(db.alembic_config(url), "0008")
    assert "mailbox_connections" not in inspect(engine).get_table_names()
    engine.dispose()
