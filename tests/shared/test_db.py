"""shared/db.py: migrations at start say what they did and nothing else; the one
``ON CONFLICT DO NOTHING`` (a Core statement and its SQL text) and the rollups'
``DO UPDATE`` on both databases."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from shared import db
from shared.models import Event, Sender
from tests.support.paths import ROOT


def test_upgrade_logs_only_the_migrations_it_ran(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with caplog.at_level(logging.INFO):
        db.upgrade(url)
    assert [r.getMessage() for r in caplog.records][:1] == [
        "Running upgrade  -> 0001, initial schema"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        db.upgrade(url)  # every later start: already up to date, nothing to say
    assert caplog.records == []


EVENTS = Event.__table__  # type: ignore[attr-defined]
SENDERS = Sender.__table__  # type: ignore[attr-defined]


def _event(key: str) -> dict[str, object]:
    return {"event_key": key, "message_id": 1, "kind": "open", "user_agent": "", "reasons": ""}


def _keys(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT event_key FROM events ORDER BY id").scalars())


@pytest.mark.parametrize("key", ["event_key", None])
def test_insert_ignoring_skips_a_stored_key(engine: Engine, key: str | None) -> None:
    statement = db.insert_ignoring(EVENTS, key, engine.dialect.name)
    with engine.begin() as conn:
        conn.execute(statement, [_event("a"), _event("b")])
    with engine.begin() as conn:
        added = conn.execute(statement.returning(EVENTS.c.event_key), [_event("b"), _event("c")])
        assert [row.event_key for row in added] == ["c"]
    assert _keys(engine) == ["a", "b", "c"]


def test_insert_ignoring_sql_is_the_same_statement_as_text(engine: Engine) -> None:
    marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    columns = tuple(c.name for c in EVENTS.columns if c.name != "id")
    row = f"({', '.join([marker] * len(columns))})"
    sql = db.insert_ignoring_sql(
        "events", columns, f"VALUES {row}, {row}", "event_key", returning="event_key"
    )
    every = {"recipient_position": 0, "link_position": 0, "ip": "", "method": "GET"}
    every |= {"occurred_at": "2026-01-01 00:00:00+00:00", "verdict": "human"}
    every |= {"bounce_type": "", "status_code": "", "diagnostic": ""}
    values = tuple({**every, **_event(key)}[c] for key in ("a", "b") for c in columns)
    with engine.begin() as conn:
        assert sorted(conn.exec_driver_sql(sql, values).scalars()) == ["a", "b"]
    with engine.begin() as conn:
        assert list(conn.exec_driver_sql(sql, values).scalars()) == []
    assert _keys(engine) == ["a", "b"]


def test_a_fresh_process_logs_no_alembic_plugin_lines(tmp_path: Path) -> None:
    """Alembic announces its plugins once per process, at import: a new process
    (as `trackrelay serve` is) must not print them at every start."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    script = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        f"from shared import db; db.upgrade({url!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "Running upgrade  -> 0001" in done.stderr
    assert "setup plugin" not in done.stderr


def test_upsert_adding_sql_adds_counters_and_keeps_the_later_time(engine: Engine) -> None:
    marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    sql = db.upsert_adding_sql(
        "senders",
        ("sender_key", "messages", "last_at"),
        f"VALUES ({marker}, {marker}, {marker})",
        ("sender_key",),
        add=("messages",),
        latest=("last_at",),
    )
    early = datetime(2026, 1, 1, tzinfo=UTC)
    late = datetime(2026, 2, 1, tzinfo=UTC)
    as_stored = SENDERS.c.last_at.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
    for count, when in ((2, late), (3, early)):
        with engine.begin() as conn:
            at = as_stored(when) if as_stored else when
            conn.exec_driver_sql(sql, ("ann@example.com", count, at))
    with engine.connect() as conn:
        row = conn.execute(select(SENDERS.c.messages, SENDERS.c.last_at)).one()
    assert row.messages == 5
    assert row.last_at == late
