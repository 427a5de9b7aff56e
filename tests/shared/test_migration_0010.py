"""Migration 0010 adds where the INBOX watcher left off, keeping existing connections."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, text

from shared import db
from tests.conftest import ann_connected_at


def test_0010_up_keeps_rows_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = ann_connected_at(url, "0009")
    db.upgrade(url, "0010")
    with engine.begin() as conn:
        row = conn.execute(
            text("SELECT address, inbox_uidvalidity, inbox_last_uid FROM mailbox_connections")
        ).one()
    assert tuple(row) == ("ann@example.com", 0, 0)
    command.downgrade(db.alembic_config(url), "0009")
    columns = {c["name"] for c in inspect(engine).get_columns("mailbox_connections")}
    assert "inbox_last_uid" not in columns
    assert "address" in columns
    engine.dispose()
