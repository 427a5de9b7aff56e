"""Passthrough mode: people sign in to the dashboard with their mail account.

The upstream is the real recording SMTP server of tests/support/upstream.py (TLS,
AUTH for USER/PASSWORD only, every attempt counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine
from sqlmodel import select
from starlette.testclient import TestClient

from receiver.app import create_app
from shared.config import Settings
from shared.db import session_scope
from shared.models import Message, User
from shared.users import MAILBOX_LOGIN, add_user, user_addresses
from tests.support.dashboardkit import D, csrf_from, seed
from tests.support.seedrows import settle
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


@pytest.fixture
def passthrough(
    engine: Engine, make_settings: Callable[..., Settings], upstream: RecordingUpstream
) -> Iterator[TestClient]:
    seed(engine)
    settings = make_settings(
        auth_mode="passthrough",
        upstream=upstream.url,
        upstream_verify_tls=False,
        public_url="https://t.example.test",
    )
    with TestClient(create_app(settings, engine)) as client:
        yield client


def _sign_in(client: TestClient, username: str, password: str) -> tuple[int, str]:
    page = client.get(f"{D}/login")
    reply = client.post(
        f"{D}/login",
        data={"username": username, "password": password, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    return reply.status_code, reply.text


def test_a_mailbox_signs_in_and_sees_its_own_mail(
    passthrough: TestClient, engine: Engine, upstream: RecordingUpstream
) -> None:
    assert "password of your mail account" in passthrough.get(f"{D}/login").text
    with session_scope(engine) as session:
        session.add(Message(id=77, sender=USER, subject="From the mailbox", status="sent"))
    settle(engine)
    assert _sign_in(passthrough, USER, PASSWORD)[0] == 303
    assert upstream.auth_attempts == [("PLAIN", USER)]
    with session_scope(engine) as session:
        user = session.exec(select(User).where(User.username == USER)).one()
    assert (user.role, user.password_hash) == ("sender", MAILBOX_LOGIN)
    assert user_addresses(engine, user.id or 0) == [USER]
    listed = passthrough.get(f"{D}/messages").text
    assert "From the mailbox" in listed
    assert "Quarterly numbers" not in listed
    # a second sign-in reuses the account
    passthrough.cookies.clear()
    assert _sign_in(passthrough, USER, PASSWORD)[0] == 303
    with session_scope(engine) as session:
        assert len(session.exec(select(User).where(User.username == USER)).all()) == 1


def test_a_wrong_mail_password_is_refused_after_one_upstream_attempt(
    passthrough: TestClient, engine: Engine, upstream: RecordingUpstream
) -> None:
    code, text = _sign_in(passthrough, USER, "not it")
    assert code == 401
    assert "do not match" in text
    assert upstream.auth_attempts == [("PLAIN", USER)]
    with session_scope(engine) as session:
        assert session.exec(select(User).where(User.username == USER)).first() is None


def test_local_accounts_never_sign_in_through_the_mail_server(
    passthrough: TestClient, engine: Engine, upstream: RecordingUpstream
) -> None:
    """The owner of mailbox USER upstream must not become a local account of that name."""
    add_user(engine, USER, "a local password", role="admin")
    code, _ = _sign_in(passthrough, USER, PASSWORD)
    assert code == 401
    assert upstream.auth_attempts == []
    assert _sign_in(passthrough, USER, "a local password")[0] == 303


def test_an_unreachable_mail_server_says_so(
    engine: Engine, make_settings: Callable[..., Settings], upstream: RecordingUpstream
) -> None:
    seed(engine)
    url = upstream.url
    upstream.stop()
    settings = make_settings(
        auth_mode="passthrough", upstream=url, upstream_verify_tls=False, upstream_timeout=5
    )
    with TestClient(create_app(settings, engine)) as client:
        code, text = _sign_in(client, USER, PASSWORD)
        assert code == 503
        assert "cannot check the password right now" in text
        assert _sign_in(client, "sam", "correct horse battery")[0] == 303  # local still works
