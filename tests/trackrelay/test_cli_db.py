"""``trackrelay db rebuild-state``, run as the CLI would run it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.support.seedrows import add_message, event, write_events
from trackrelay.cli import main


@pytest.mark.parametrize(
    ("args", "said"),
    [([], "every table at once"), (["--slice", "2"], "2 slice(s) of at most 2 messages")],
)
def test_rebuild_state_counts_everything_again(
    args: list[str],
    said: str,
    database_url: str,
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRACKRELAY_DATABASE_URL", database_url)
    monkeypatch.setenv("TRACKRELAY_VAR_DIR", str(tmp_path / "var"))
    messages = [add_message(engine) for _ in range(3)]
    write_events(engine, [event(m, verdict="human") for m in messages])
    with engine.begin() as conn:  # state gone wrong (a restore, a bug)
        conn.execute(text("UPDATE messages SET opens = 0"))
        conn.execute(text("UPDATE recipients SET first_open_at = NULL"))
        conn.execute(text("DELETE FROM daily_stats"))
        conn.execute(text("DELETE FROM senders"))
    assert main(["db", "rebuild-state", *args]) == 0
    assert said in capsys.readouterr().out
    with engine.connect() as conn:
        assert conn.execute(text("SELECT sum(opens) FROM messages")).scalar_one() == 3
        assert conn.execute(text("SELECT count(first_open_at) FROM recipients")).scalar_one() == 3
        day = conn.execute(text("SELECT sent, opened, opens_human FROM daily_stats")).one()
        assert tuple(day) == (3, 3, 3)
        assert conn.execute(text("SELECT messages FROM senders")).scalar_one() == 3


def test_rebuild_state_refuses_a_slice_of_nothing(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRACKRELAY_DATABASE_URL", database_url)
    monkeypatch.setenv("TRACKRELAY_VAR_DIR", str(tmp_path / "var"))
    assert main(["db", "rebuild-state", "--slice", "0"]) != 0
    assert "--slice" in capsys.readouterr().err
