"""Migration 0007: the index answers find their message by."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect

from shared import db


def _indexes(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return {i["name"] or "" for i in inspect(engine).get_indexes("messages")}
    finally:
        engine.dispose()


def test_the_message_id_index_comes_and_goes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    assert "ix_messages_message_id_header" in _indexes(url)
    config = db.alembic_config(url)
    command.downgrade(config, "0006")
    assert "ix_messages_message_id_header" not in _indexes(url)
    command.upgrade(config, "head")
    assert "ix_messages_message_id_header" in _indexes(url)
