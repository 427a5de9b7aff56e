"""Engines, sessions and migrations. Nothing else in trackrelay makes engines.

SQLite (the embedded default) runs in WAL mode so the receiver's batch writer
and the dashboard's readers do not block each other; PostgreSQL is used through
psycopg 3. The code is synchronous SQLAlchemy: async callers run it with
``asyncio.to_thread`` so the event loop never waits on the database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlmodel import Session

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.sql.dml import Insert

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
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


def impatient_engine(engine: Engine, lock_timeout: float) -> Engine:
    """An engine for a writer that must not wait long for SQLite's write lock.

    SQLite: a second engine on the same file whose connections wait at most
    ``lock_timeout`` s for a lock, set once when each connection opens (the
    driver's ``timeout``), instead of the 30 s every other user of the file
    keeps. PostgreSQL (row locks, no file lock) and in-memory SQLite:
    ``engine`` itself. The caller disposes what it got if it is not ``engine``.
    """
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return engine
    return make_engine(url, connect_args={"check_same_thread": False, "timeout": lock_timeout})


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


def insert_ignoring(table: Table, key: str | None, dialect: str) -> Insert:
    """``INSERT ... ON CONFLICT (key) DO NOTHING`` for SQLite and PostgreSQL.

    For rows several processes may add at once (two receivers, the CLI beside
    the dashboard), or that a replay adds again: the later insert does nothing
    instead of failing on the unique key, and waits for the first where
    PostgreSQL must. ``key`` None: any unique constraint (``ON CONFLICT DO
    NOTHING``), for a key of several columns.

    The one owner of the clause: a Core statement here, for inserts of dicts
    (``executemany``, "insertmanyvalues"); the same clause as SQL text in
    :func:`insert_ignoring_sql`, for the one writer that measured a Core
    statement slower than its insert.
    """
    keys = None if key is None else [key]
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql  # on demand: the relay may never need it

        return postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    raise ValueError(f"unsupported database: {dialect}")


def insert_ignoring_sql(
    table: str, columns: Sequence[str], source: str, key: str, returning: str = ""
) -> str:
    """:func:`insert_ignoring` as SQL text: ``INSERT INTO table (columns) source ON
    CONFLICT (key) DO NOTHING [RETURNING returning]``; the same on both databases.

    ``source`` is ``VALUES (...), ...`` or a ``SELECT``, with the driver's
    placeholders. Only for the receiver's event writer, the hot path of every
    hit (receiver/eventrows.py, whose methods say what was measured): it builds
    its few statements once and executes them with ``exec_driver_sql``; on
    SQLite one multi-row VALUES gives up the GIL once where ``executemany``
    gives it up per row, and on PostgreSQL one ``unnest`` of column arrays
    replaces a statement with thousands of placeholders parsed per batch.
    Everything else uses :func:`insert_ignoring`. Only constants go in: no
    value is ever formatted into the text.
    """
    sql = f"INSERT INTO {table} ({', '.join(columns)}) {source} ON CONFLICT ({key}) DO NOTHING"
    return f"{sql} RETURNING {returning}" if returning else sql


def upsert_adding_sql(
    table: str,
    columns: Sequence[str],
    source: str,
    keys: Sequence[str],
    add: Sequence[str] = (),
    latest: Sequence[str] = (),
    assign: Sequence[str] = (),
) -> str:
    """``INSERT INTO table (columns) source ON CONFLICT (keys) DO UPDATE``: counters
    in ``add`` are summed, times in ``latest`` keep the later, ``assign`` take the new
    value; the same on both databases.

    The one owner of the rollup upsert (shared/eventstate.py's daily stats, the
    relay's senders): several writers add to one row at once, and the database
    serialises them on the row instead of one overwriting the other. ``source``
    is ``VALUES (...), ...`` or a ``SELECT`` with a WHERE clause (SQLite reads
    ``ON CONFLICT`` after a bare join as the join's ``ON``). Only constants go
    in: no value is ever formatted into the text.
    """
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in add]
    sets += [
        f"{c} = CASE WHEN {table}.{c} IS NULL OR excluded.{c} > {table}.{c}"
        f" THEN excluded.{c} ELSE {table}.{c} END"
        for c in latest
    ]
    sets += [f"{c} = excluded.{c}" for c in assign]
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) {source}"
        f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)}"
    )


def alembic_config(url: str) -> Config:
    from alembic.config import Config  # imported on demand: Alembic and Mako cost ~10 MB RSS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _not_alembic_chatter(record: logging.LogRecord) -> bool:
    """Alembic says "Context impl SQLiteImpl." and "Will assume ... DDL." at every
    start; only the "Running upgrade" lines tell an operator something."""
    return not record.getMessage().startswith(("Context impl ", "Will assume "))


logging.getLogger("alembic.runtime.migration").addFilter(_not_alembic_chatter)
# Alembic 1.16+ also announces each of its own plugins ("setup plugin ...") at
# INFO on every start: nothing an operator can act on.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to the newest migration (or to ``revision``)."""
    if make_url(url).get_backend_name() == "sqlite":
        make_engine(url).dispose()  # creates the directory
    from alembic import command

    command.upgrade(alembic_config(url), revision)
