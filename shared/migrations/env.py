"""Alembic environment: migrations run against the URL set by shared.db."""

from __future__ import annotations

import logging

from alembic import context
from sqlmodel import SQLModel

from shared import models  # noqa: F401  (registers the tables)
from shared.db import include_object, make_engine

log = logging.getLogger("alembic.env")
target_metadata = SQLModel.metadata


def run_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                include_object=include_object,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations()
