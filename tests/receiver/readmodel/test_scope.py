"""The search: literal, over subjects and recipients, on PostgreSQL through the trigram indexes."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql

from receiver import readmodel
from shared.db import make_engine
from shared.models import Message
from tests.receiver.readmodel.conftest import ADMIN, BULK, add_many


def test_search_finds_subjects_and_recipients_in_one_query(engine: Engine) -> None:
    ids = add_many(engine, 40)  # subjects Report 00001 ... Report 00040
    by_subject = readmodel.messages_page(engine, ADMIN, readmodel.Selection(text="report 0003"), 50)
    assert {r.message.subject for r in by_subject.rows} == {f"Report {n:05}" for n in range(30, 40)}
    target = ids[5]
    by_recipient = readmodel.messages_page(
        engine, ADMIN, readmodel.Selection(text=f"R2-{target}@"), 50
    )
    assert [r.message.id for r in by_recipient.rows] == [target]
    mine = readmodel.messages_page(engine, BULK, readmodel.Selection(text="report"), 50)
    assert mine.total == 20  # the sender's scope still applies
    literal = readmodel.messages_page(engine, ADMIN, readmodel.Selection(text="report_0"), 50)
    assert literal.rows == []


@pytest.mark.postgres
def test_postgresql_plans_the_search_on_the_trigram_indexes(pg_database: str) -> None:
    """A plan check, not a time (SQLite has no trigram index: the documented scan)."""
    engine = make_engine(pg_database)
    add_many(engine, 30)
    query = select(Message.id).where(*readmodel.selected(ADMIN, readmodel.Selection(text="0001")))  # type: ignore[call-overload]
    compiled = query.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE messages; ANALYZE recipients")
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            row[0] for row in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
        )
    engine.dispose()
    assert "ix_messages_subject_trgm" in plan, plan
    assert "ix_recipients_address_trgm" in plan, plan
