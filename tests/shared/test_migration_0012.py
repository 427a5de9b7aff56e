"""Migration 0012 adds ``last_error_at`` to mailbox connections; existing rows have none."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect, text

from shared import db
from tests.conftest import ann_connected_at


def test_0012_up_keeps_rows_without_a_time_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = ann_connected_at(url, "0011", last_error="away")
    db.upgrade(url, "0012")
    with engine.begin() as conn:
        row = conn.execute(text("SELECT last_error, last_error_at FROM mailbox_connections")).one()
    assert tuple(row) == ("away", None)
    command.downgrade(db.alembic_config(url), "0011")
    columns = {c["name"] for c in inspect(engine).get_columns("mailbox_connections")}
    assert "last_error_at" not in columns
    assert "method" in columns
    engine.dispose()
