"""Migration 0003 respells stored addresses and domains as shared/addresses.py does."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text

from shared import consent, db, policies

NOW = "2026-11-30 12:00:00+00:00"


def test_unicode_spellings_become_idna_and_duplicates_merge(empty_url: str) -> None:
    db.upgrade(empty_url, "0002")
    engine = db.make_engine(empty_url)
    rows = {
        "INSERT INTO users (id, username, password_hash, role, created_at)"
        " VALUES (1, 'ann', 'x', 'sender', :now)": [{}],
        "INSERT INTO user_addresses (user_id, address) VALUES (1, :a)": [
            {"a": "@bücher.example"},
            {"a": "@xn--bcher-kva.example"},  # the same domain, already canonical
            {"a": "ann@straße.example"},
            {"a": "bob@example.com"},
        ],
        "INSERT INTO consents (address, source, created_at) VALUES (:a, 'cli', :now)": [
            {"a": "jörg@bücher.example"},
            {"a": "ana@bücher.example"},
            {"a": "ana@xn--bcher-kva.example"},
        ],
        "INSERT INTO consent_modes (domain, mode, updated_at) VALUES (:d, :m, :now)": [
            {"d": "*", "m": "opt-out"},
            {"d": "xn--bcher-kva.example", "m": "opt-out"},
            {"d": "bücher.example", "m": "opt-in"},  # the stricter one wins
            {"d": "straße.example", "m": "opt-in"},
        ],
        "INSERT INTO suppressions (address, source, created_at) VALUES (:a, 'public', :now)": [
            {"a": "zoë@bücher.example"},
            {"a": "not an address"},  # left as it is
        ],
    }
    with engine.begin() as conn:
        for statement, values in rows.items():
            for value in values:
                conn.execute(text(statement), {"now": NOW, **value})

    command.upgrade(db.alembic_config(empty_url), "head")

    with engine.connect() as conn:
        users = conn.execute(text("SELECT address FROM user_addresses")).scalars().all()
        modes = dict(conn.execute(text("SELECT domain, mode FROM consent_modes")).all())
    assert sorted(users) == [
        "@xn--bcher-kva.example",
        "ann@xn--strae-oqa.example",
        "bob@example.com",
    ]
    assert modes == {
        "*": "opt-out",
        "xn--bcher-kva.example": "opt-in",
        "xn--strae-oqa.example": "opt-in",
    }
    assert [c.address for c in consent.list_consents(engine)] == [
        "ana@xn--bcher-kva.example",
        "jörg@xn--bcher-kva.example",
    ]
    assert [s.address for s in policies.list_suppressions(engine)] == [
        "not an address",
        "zoë@xn--bcher-kva.example",
    ]
    # what the relay asks, in either spelling
    snapshot = policies.load_snapshot(engine)
    assert snapshot.consent_allows("Jörg@Bücher.example")
    assert not snapshot.consent_allows("ben@xn--bcher-kva.example")
    assert snapshot.is_suppressed("zoë@bücher.example")
    engine.dispose()
