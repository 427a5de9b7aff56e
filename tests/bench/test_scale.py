"""The scale benchmark (bench/scale.py, bench/scaleseed.py) at a tiny size: the
seeded rows keep issue 13's distribution and every constraint, and one
measurement pass runs against the real receiver. No time is asserted."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from bench import run, scale, scaleseed
from shared import db
from shared.models import Event, Message
from tests.conftest import PG_URL

N = 200
HEAVIEST = 60


def scalar(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())


def test_seed_keeps_the_distribution_and_every_reference(engine: Engine) -> None:
    seeded = scaleseed.seed(engine, N, heaviest=HEAVIEST)

    assert seeded.counts == {
        table: scalar(engine, f"SELECT count(*) FROM {table}")
        for table in ("messages", "recipients", "links", "events")
    }
    assert seeded.counts["messages"] == N
    assert 2.5 <= seeded.counts["recipients"] / N <= 3.5
    assert 6.5 <= seeded.counts["links"] / N <= 9.5
    assert scalar(engine, "SELECT count(DISTINCT event_key) FROM events") == seeded.counts["events"]
    # the heavy sender owns exactly 2 % of the mail; a sender user sees it
    heavy = f"SELECT count(*) FROM messages WHERE sender = '{scaleseed.HEAVY_SENDER}'"
    assert scalar(engine, heavy) == N * 2 // 100
    sparse = f"SELECT count(*) FROM messages WHERE sender = '{scaleseed.SPARSE_SENDER}'"
    assert scalar(engine, sparse) == 1
    assert 100 < scalar(engine, "SELECT count(DISTINCT sender) FROM messages") <= N
    # what the searches find: some invoices, some of them the heavy sender's
    invoices = "SELECT count(*) FROM messages WHERE subject LIKE 'Invoice %'"
    assert scalar(engine, invoices) == 3  # messages 37, 100 and 137
    assert scalar(engine, f"{invoices} AND sender = '{scaleseed.HEAVY_SENDER}'") == 1
    assert (
        scalar(
            engine,
            "SELECT count(*) FROM user_addresses a JOIN users u ON u.id = a.user_id "
            f"WHERE u.username = '{scaleseed.SENDER}' AND a.address = '{scaleseed.HEAVY_SENDER}'",
        )
        == 1
    )
    # every event's message, recipient and (for a click) link exists
    orphans = (
        "SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM recipients r "
        "WHERE r.message_id = e.message_id AND r.position = e.recipient_position) "
        "OR (e.kind = 'click') <> (e.link_position > 0) "
        "OR (e.kind = 'click' AND NOT EXISTS (SELECT 1 FROM links l "
        "WHERE l.message_id = e.message_id AND l.position = e.link_position))"
    )
    assert scalar(engine, orphans) == 0
    for table in ("recipients", "links"):
        lost = f"SELECT count(*) FROM {table} t LEFT JOIN messages m ON m.id = t.message_id "
        assert scalar(engine, lost + "WHERE m.id IS NULL") == 0
    # one heaviest message, the heavy sender's; the heaviest recipient is the most frequent
    assert (
        scalar(engine, f"SELECT count(*) FROM events WHERE message_id = {seeded.heaviest_id}")
        == HEAVIEST
    )
    assert scalar(engine, f"SELECT count(*) FROM messages WHERE id = {seeded.heaviest_id} "
                  f"AND sender = '{scaleseed.HEAVY_SENDER}'") == 1  # fmt: skip
    most = scalar(
        engine, "SELECT count(*) FROM recipients GROUP BY address ORDER BY count(*) DESC LIMIT 1"
    )
    held = f"SELECT count(*) FROM recipients WHERE address = '{seeded.heaviest_recipient}'"
    assert scalar(engine, held) == most
    # a year, nothing in the future; events after their message
    created = Message.__table__.c.created_at  # type: ignore[attr-defined]
    occurred = Event.__table__.c.occurred_at  # type: ignore[attr-defined]
    with engine.connect() as conn:
        first, last = conn.execute(select(func.min(created), func.max(created))).one()
        latest = conn.execute(select(func.max(occurred))).scalar_one()
    assert timedelta(days=365) * (1 - 2 / N) < last - first <= timedelta(days=365)
    assert latest <= datetime.now(UTC)
    early = (
        "SELECT count(*) FROM events e JOIN messages m ON m.id = e.message_id "
        "WHERE e.occurred_at < m.created_at"
    )
    assert scalar(engine, early) == 0
    refused = "SELECT count(*) FROM recipients WHERE status = 'refused' AND reply_code <> 550"
    assert scalar(engine, refused) == 0


def _where(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite"
    if not PG_URL:
        pytest.skip("TRACKRELAY_TEST_DATABASE_URL is not set")
    name = f"trackrelay_scale_{secrets.token_hex(4)}"
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest) -> str:
    return _where(request)


def test_one_measurement_pass_runs_and_renders(where: str, tmp_path: Path) -> None:
    options = scale.Options(where, repeat=1, heaviest=HEAVIEST, csv_budget=60, echo=False)
    result = scale.measure(N, options)

    for viewer in scale.VIEWERS:
        calls = result[viewer]
        assert "messages page 50" in calls
        assert "overview by week" in calls
        assert "API events (100 after the middle)" in calls
        assert all(call["statuses"] == [200] for call in calls.values()), calls
    assert "heaviest message API" in result["admin"]
    csv = result["csv"]
    assert csv["admin messages"]["rows"] == N
    assert csv["admin events"]["rows"] == result["counts"]["events"]
    assert csv["sender messages"]["rows"] == N * 2 // 100
    assert csv["sparse messages"]["rows"] == 1  # the 25th of every 5,000
    assert all(c["status"] == 200 and c["rss_after_mb"] > 0 for c in csv.values())
    r = result["retention"]
    assert not any(r["purge_idle_counts"].values())
    assert abs(r["purge_counts"]["messages"] - N // 10) <= 1
    assert r["erase_counts"]["recipients"] > 0
    assert r["purge_probe"]["probe_failures"] == r["erase_probe"]["probe_failures"] == 0

    stored = scale.store(result, tmp_path / "scale.json")
    markdown = scale.render(stored)
    assert "| admin | messages last page |" in markdown
    assert "erase heaviest recipient" in markdown
    assert " met " in markdown or "not met" in markdown
    # the database made for the run is gone
    if where != "sqlite":
        admin = db.make_engine(make_url(where).set(database="postgres"))
        name = make_url(where).database
        assert scalar(admin, f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == 0
        admin.dispose()


def test_a_run_of_some_parts_keeps_what_the_others_measured(tmp_path: Path) -> None:
    options = scale.Options(
        "sqlite", repeat=1, heaviest=HEAVIEST, echo=False, only=("sparse",), calls=("API events",)
    )
    result = scale.measure(N, options)
    assert set(result["sparse"]) == {"API events (first 100)", "API events (100 after the middle)"}
    assert not {"admin", "sender", "csv", "retention"} & result.keys()
    path = tmp_path / "scale.json"
    scale.store({**result, "csv": {"earlier": {"rows": 1}}, "sparse": {}}, path)
    stored = scale.store(result, path)
    kept = stored["runs"][f"sqlite {N}"]
    assert kept["csv"] == {"earlier": {"rows": 1}}
    assert kept["sparse"] == result["sparse"]


def test_the_suite_runs_scale_only_when_named_and_never_quick(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run.main(["--list"]) == 0
    assert "scale (optional: only when named)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run.main(["--quick", "scale"])
    assert "cannot run with --quick" in capsys.readouterr().err


def test_the_derived_state_is_counted_after_seeding(engine: Engine) -> None:
    """Migration 0004's columns: the keys filled by the seeder, the rest by rebuild."""
    assert scaleseed.seed(engine, N, heaviest=HEAVIEST).state_seconds > 0

    assert scalar(engine, "SELECT count(*) FROM messages WHERE sender_key <> lower(sender)") == 0
    assert scalar(engine, "SELECT count(*) FROM recipients WHERE address_key <> address") == 0
    senders = scalar(engine, "SELECT count(DISTINCT sender) FROM messages")
    assert scalar(engine, "SELECT count(*) FROM senders") == senders
    counted = "verdict IN ('human', 'proxy')"
    opens = f"SELECT count(*) FROM events WHERE kind = 'open' AND {counted}"
    assert scalar(engine, "SELECT sum(opens) FROM messages") == scalar(engine, opens)
    sent = scalar(engine, "SELECT sum(sent) FROM daily_stats")
    assert sent == N
