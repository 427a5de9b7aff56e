"""The search: literal, over subjects and recipients, on PostgreSQL through the trigram indexes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql

from receiver import readmodel
from receiver.readmodel import scope
from shared.db import make_engine
from shared.models import Message
from tests.receiver.readmodel.conftest import ADMIN, BULK, add_many
from tests.support.seedrows import add_message, event, write_events


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


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_postgresql_plans_the_search_on_the_trigram_indexes(database_url: str) -> None:
    """A plan check, not a time (SQLite has no trigram index: the documented scan)."""
    engine = make_engine(database_url)
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


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # emptied afterwards
def test_postgresql_asks_the_trigram_index_for_an_address_local_part(database_url: str) -> None:
    """The domain's trigrams, in most addresses, stay out of the index condition."""
    engine = make_engine(database_url)
    add_many(engine, 30)
    selection = readmodel.Selection(text="R1-5@Client.example")
    query = select(Message.id).where(*readmodel.selected(ADMIN, selection))  # type: ignore[call-overload]
    compiled = query.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE messages; ANALYZE recipients")
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = [row[0] for row in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)]
    engine.dispose()
    asked = [line for line in plan if "Index Cond: (lower(" in line]
    assert any("ix_recipients_address_trgm" in line for line in plan), plan
    assert asked, plan
    assert all("%r1-5@%" in line for line in asked), plan
    assert any("r1-5@client.example" in line for line in plan if "Filter" in line), plan


def _answered(engine: Engine) -> dict[str, int]:
    """Five messages: replied, auto-replied only, bounced (one of two, hard), opened
    ten days ago and not answered, opened an hour ago and not answered."""
    old = datetime.now(UTC) - timedelta(days=10)
    recent = datetime.now(UTC) - timedelta(hours=1)
    m = {
        name: add_message(engine, subject=name, created_at=at)
        for name, at in (
            ("replied", old), ("auto", old), ("bounced", old), ("old_open", old),
            ("new_open", recent),
        )
    }  # fmt: skip
    bounce = {**event(m["bounced"], "bounce", verdict="unknown"), "bounce_type": "hard"}
    write_events(
        engine,
        [
            event(m["replied"], "open"),
            event(m["replied"], "reply", recipient=2, verdict="unknown"),
            event(m["auto"], "open"),
            event(m["auto"], "auto_reply", verdict="unknown"),
            bounce,
            event(m["old_open"], "open"),
            event(m["new_open"], "open", at=recent + timedelta(minutes=5)),
        ],
    )
    return {name: message.id for name, message in m.items()}


def _ids(engine: Engine, **selection: Any) -> set[int]:
    """The ids of the subjects _answered() wrote (the plan test above leaves rows)."""
    page = readmodel.messages_page(engine, ADMIN, readmodel.Selection(**selection), 200)
    return {r.message.id for r in page.rows if not r.message.subject.startswith("Report")}


def test_replied_bounced_and_the_follow_up_list_read_the_state_columns(engine: Engine) -> None:
    ids = _answered(engine)
    assert _ids(engine, replied=True) == {ids["replied"]}
    # An out-of-office is no reply: that message is still "not replied".
    assert _ids(engine, replied=False) == set(ids.values()) - {ids["replied"]}
    assert _ids(engine, bounced=True) == {ids["bounced"]}
    assert ids["bounced"] not in _ids(engine, bounced=False)
    # Opened, no reply, sent more than three days ago: the one the sales person calls.
    assert _ids(engine, follow_up_days=3) == {ids["auto"], ids["old_open"]}
    assert _ids(engine, follow_up_days=90) == set()
    page = readmodel.messages_page(engine, ADMIN, readmodel.Selection(bounced=True), 50)
    [row] = page.rows
    assert (row.answers.bounces, row.answers.bounce_type, row.answers.replies) == (1, "hard", 0)
    [replied] = readmodel.messages_page(engine, ADMIN, readmodel.Selection(replied=True), 5).rows
    assert (replied.answers.replies, replied.answers.auto_replies) == (1, 0)
    assert replied.answers.first_reply is not None


def test_the_answer_filters_never_read_the_events_table(engine: Engine) -> None:
    selection = readmodel.Selection(replied=False, bounced=True, follow_up_days=3)
    query = select(Message.id).where(*readmodel.selected(ADMIN, selection))  # type: ignore[call-overload]
    assert "events" not in str(query.compile()).lower()


def test_the_index_is_asked_for_the_local_part_of_an_address() -> None:
    assert scope.indexed_part("r0@client0.example") == "r0@"
    assert scope.indexed_part("Ann.Lee@x") == "Ann.Lee@"
    assert scope.indexed_part("@client0.example") == "@client0.example"  # a domain: all of it
    assert scope.indexed_part("a@b.example") == "a@b.example"  # one character: no trigram
    assert scope.indexed_part("invoice 42") == "invoice 42"


#: Addresses around ``r0@client0.example``: itself in two spellings, strings that
#: hold it, and ones that share its local part or its domain but do not hold it.
_AROUND = (
    "r0@client0.example", "R0@Client0.Example", "xr0@client0.example",
    "r0@client0.example.org", "r0@client1.example", "r10@client0.example",
    "ar0@client0.examples", "r0@other.test", "bob@client0.example", "r0_x@client0.example",
)  # fmt: skip


def test_the_narrowed_search_finds_what_the_whole_pattern_finds(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same messages whether the index is asked for the local part or the whole
    text, on both databases: the whole text is checked on every row found."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    by_address: dict[str, set[int]] = {}
    bulk: set[int] = set()
    for n, address in enumerate(_AROUND):
        m = add_message(
            engine,
            sender="news@bulk.example" if n % 2 else "alice@example.com",
            recipients=(address, f"other{n}@client0.example"),
            subject="Re: mail for r0@client0.example" if n == 7 else f"Newsletter {n}",
            created_at=start + timedelta(minutes=n),
        )
        by_address.setdefault(address.lower(), set()).add(m.id)
        bulk |= {m.id} if n % 2 else set()

    def holding(text: str) -> set[int]:
        return {i for a, ids in by_address.items() if text in a for i in ids}

    texts = {  # text -> the messages that hold it (the subject of n = 7 quotes one)
        "r0@client0.example": holding("r0@client0.example") | by_address["r0@other.test"],
        "R0@CLIENT0.EXAMPLE.ORG": by_address["r0@client0.example.org"],
        "r0@": holding("r0@"),
        "r0_x@client0": by_address["r0_x@client0.example"],  # "_" is literal
        "r0%@client0": set(),
        "@client1.example": by_address["r0@client1.example"],
    }
    assert len(texts["r0@client0.example"]) == 6
    for viewer in (ADMIN, BULK):
        for text, ids in texts.items():
            selection = readmodel.Selection(text=text)
            narrowed = readmodel.messages_page(engine, viewer, selection, 50)
            with monkeypatch.context() as m:
                m.setattr(scope, "indexed_part", lambda t: t)
                whole = readmodel.messages_page(engine, viewer, selection, 50)
            found = [r.message.id for r in narrowed.rows]
            assert found == [r.message.id for r in whole.rows], text
            assert narrowed.total == whole.total == len(found)
            assert set(found) == (ids if viewer is ADMIN else ids & bulk), (viewer, text)
