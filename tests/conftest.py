"""Fixtures shared by the whole suite.

Database tests take the ``engine`` (or ``database_url``) fixture and run twice:
on a fresh SQLite file and on PostgreSQL when ``TRACKRELAY_TEST_DATABASE_URL``
is set (``.ci/run`` sets it). Each test run creates its own PostgreSQL database
(``trackrelay_test_<random>``), so concurrent runs never collide; tables are
emptied between tests.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from shared import db
from shared.config import Settings, load_settings

PG_URL = os.environ.get("TRACKRELAY_TEST_DATABASE_URL", "")
TEST_SECRET = "test-secret-key-0123456789abcdef"
# Fixtures that live beside what they set up: the recording upstream SMTP server
# (upstream, tls_pair), db_engine and processes (relay), outage (database down).
pytest_plugins = [
    "tests.support.oauth_server",  # oauth_server: the mailbox provider (first: upstream uses it)
    "tests.support.dovecot",  # dovecot: a real IMAP mailbox (before upstream: it files there)
    "tests.support.upstream",
    "tests.support.relaykit",
    "tests.support.imapkit",  # anns_mailbox: the servers behind a mailbox connection
    "tests.support.receiverkit",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that runs on PostgreSQL ``postgres``, so ``-m "not postgres"``
    (``make test-fast``) leaves PostgreSQL out: the ``database_url`` fixture's
    "postgresql" param and every test parametrised with it (directly, as
    tests/e2e/test_scaleout.py does, or through a fixture of its own)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "postgresql" in callspec.params.values():
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def _no_trackrelay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in the developer's environment must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("TRACKRELAY_") and not name.startswith("TRACKRELAY_TEST_"):
            monkeypatch.delenv(name)


@contextlib.contextmanager
def new_pg_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own, with no schema, dropped on the way out; its URL."""
    if not PG_URL:
        pytest.skip("TRACKRELAY_TEST_DATABASE_URL is not set")
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    with new_pg_database("trackrelay_test") as url:
        db.upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema yet, for a migration's test (the shared PostgreSQL
    one is already at head)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with new_pg_database("trackrelay_m") as url:
        yield url


def ann_connected_at(url: str, revision: str, last_error: str = "") -> Engine:
    """The schema at REVISION (0009 or later) with user ann and her mailbox connection,
    in the columns 0009 made (later ones take their defaults); its engine. For the
    tests of the migrations that change mailbox_connections."""
    db.upgrade(url, revision)
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, created_at)"
                " VALUES (1, 'ann', 'x', 'sender', '2026-12-03 12:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO mailbox_connections (user_id, address, provider, grant, scopes,"
                " state, reason, sent, last_error, lease_owner, created_at) VALUES"
                " (1, 'ann@example.com', 'test', 'v1.x.y', '', 'ok', '', 'clean', :last_error,"
                " '', '2026-12-03 12:00:00')"
            ),
            {"last_error": last_error},
        )
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'trackrelay.db'}"
        db.upgrade(url)
        yield url
        return
    url = request.getfixturevalue("pg_database")
    yield url
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a test: everything under tmp_path, fixed secret."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "var_dir": tmp_path / "var",
            "secret_key": TEST_SECRET,
            "database_url": f"sqlite:///{tmp_path / 'var' / 'trackrelay.db'}",
        }
        values.update(overrides)
        return load_settings(**values)

    return make
