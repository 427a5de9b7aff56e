"""Migration 0002 creates exactly the tables the models describe, and goes back down."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from shared import db

NEW_TABLES = {
    "webhook_endpoints",
    "outbox",
    "delivery_attempts",
    "api_tokens",
    "consents",
    "consent_modes",
}


def test_models_match_the_migrations(database_url: str) -> None:
    engine = db.make_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": db.include_object})
        diff = compare_metadata(context, SQLModel.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_0001_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    config = db.alembic_config(url)
    command.downgrade(config, "0001")
    engine = db.make_engine(url)
    assert not NEW_TABLES & set(inspect(engine).get_table_names())
    command.upgrade(config, "head")
    assert set(inspect(engine).get_table_names()) >= NEW_TABLES
    engine.dispose()
