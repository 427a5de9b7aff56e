"""Engines, sessions and migrations. Nothing else in trackrelay makes engines.

SQLite (the embedded default) runs in WAL mode so the receiver's batch writer
and the dashboard's readers do not block each other; PostgreSQL is used through
psycopg 3. The code is synchronous SQLAlchemy: async callers run it with
``asyncio.to_thread`` so the event loop never waits on the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets its directory created and WAL mode."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def insert_ignoring(table: Table, key: str, dialect: str) -> Insert:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` for SQLite and PostgreSQL.

    For rows several processes may add at once (two receivers, the CLI beside
    the dashboard): the later insert does nothing instead of failing on the
    unique key, and waits for the first where PostgreSQL must.
    """
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])
    raise ValueError(f"unsupported database: {dialect}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _not_alembic_chatter(record: logging.LogRecord) -> bool:
    """Alembic says "Context impl SQLiteImpl." and "Will assume ... DDL." at every
    start; only the "Running upgrade" lines tell an operator something."""
    return not record.getMessage().startswith(("Context impl ", "Will assume "))


logging.getLogger("alembic.runtime.migration").addFilter(_not_alembic_chatter)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to the newest migration (or to ``revision``)."""
    if make_url(url).get_backend_name() == "sqlite":
        make_engine(url).dispose()  # creates the directory
    command.upgrade(alembic_config(url), revision)
