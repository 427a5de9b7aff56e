"""Migration 0011 adds the app-password columns; existing connections are OAuth ones."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, text

from shared import db
from tests.conftest import ann_connected_at


def test_0011_up_keeps_rows_as_oauth_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = ann_connected_at(url, "0010")
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
