"""Migration 0006: messages.listener, '' for the rows relayed before it; and back down."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from shared import db


def test_listener_is_added_empty_for_old_rows_and_removed_again(database_url: str) -> None:
    config = db.alembic_config(database_url)
    command.downgrade(config, "0005")
    engine = db.make_engine(database_url)
    try:
        assert "listener" not in {c["name"] for c in inspect(engine).get_columns("messages")}
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO messages (id, created_at, sender, from_header, subject,"
                    " message_id_header, auth_user, client_ip, size_in, size_out, track_opens,"
                    " track_clicks, per_recipient, decision, parts_modified, status,"
                    " upstream_reply) VALUES (7, CURRENT_TIMESTAMP, 'a@x', '', '', '', '', '',"
                    " 0, 0, false, false, false, '', '', 'sent', '')"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT listener FROM messages WHERE id = 7")).scalar() == ""
        columns = {c["name"]: c for c in inspect(engine).get_columns("messages")}
        assert not columns["listener"]["nullable"]
    finally:
        engine.dispose()
