"""Dashboard sessions end on the server (receiver/sessions.py, users.session_version):
a cookie replayed after sign-out, a new password or the user's removal opens nothing.
Real HTTP to the receiver under uvicorn, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import Engine

from receiver.app import create_app
from receiver.sessions import COOKIE_NAME
from shared.config import Settings
from shared.users import add_user, remove_user, update_user, user_by_id
from tests.support.dashboardkit import D, csrf_from, login, seed
from tests.support.receiverkit import ServerThread


@pytest.fixture
def server(engine: Engine, make_settings: Callable[..., Settings]) -> Iterator[ServerThread]:
    seed(engine)
    with ServerThread(create_app(make_settings(), engine)) as running:
        yield running


SignIn = Callable[[ServerThread, str], tuple[httpx.Client, str]]


@pytest.fixture
def sign_in() -> Iterator[SignIn]:
    """``sign_in(server, username)``: a browser signed in, and its session cookie's value."""
    browsers: list[httpx.Client] = []

    def open_(server: ServerThread, username: str) -> tuple[httpx.Client, str]:
        browsers.append(_signed_in(server, username))
        return browsers[-1], browsers[-1].cookies[COOKIE_NAME]

    yield open_
    for browser in browsers:
        browser.close()


def _signed_in(server: ServerThread, username: str) -> httpx.Client:
    browser = httpx.Client(base_url=server.url)
    login(browser, username)
    return browser


def opens_messages(server: ServerThread, cookie: str) -> bool:
    """Replay a cookie from a fresh client: does it still open the message list?"""
    with httpx.Client(base_url=server.url) as other:
        reply = other.get(f"{D}/messages", headers={"Cookie": f"{COOKIE_NAME}={cookie}"})
    if reply.status_code == 303:
        assert "/dashboard/login" in reply.headers["location"]
        return False
    assert reply.status_code == 200
    return True


def test_a_cookie_replayed_after_logout_opens_nothing(
    server: ServerThread, sign_in: SignIn
) -> None:
    browser, cookie = sign_in(server, "sam")
    _, elsewhere = sign_in(server, "sam")  # the same user on another machine
    _, colleague = sign_in(server, "dom")
    assert opens_messages(server, cookie)
    form = csrf_from(browser.get(f"{D}/messages").text)
    assert browser.post(f"{D}/logout", data={"csrf_token": form}).status_code == 303
    assert not opens_messages(server, cookie)
    assert not opens_messages(server, elsewhere)  # every session of sam
    assert opens_messages(server, colleague)  # nobody else's
    _, fresh = sign_in(server, "sam")
    assert opens_messages(server, fresh)


def test_a_new_password_ends_every_session(
    server: ServerThread, engine: Engine, sign_in: SignIn
) -> None:
    _, cookie = sign_in(server, "sam")
    found = user_by_id(engine, 2)
    assert found is not None
    user, addresses = found
    assert user.username == "sam"
    update_user(engine, 2, role=user.role, addresses=addresses)  # no new password
    assert opens_messages(server, cookie)
    update_user(engine, 2, role=user.role, addresses=addresses, password="a new long password")
    assert not opens_messages(server, cookie)


def test_a_removed_user_s_cookie_does_not_pass_to_the_next_user(
    server: ServerThread, engine: Engine, sign_in: SignIn
) -> None:
    """SQLite may give a removed user's id to the next user made: the cookie is not theirs."""
    _, cookie = sign_in(server, "nobody")
    remove_user(engine, "nobody")
    assert not opens_messages(server, cookie)
    add_user(engine, "newcomer", "another long password", "admin", [])
    assert not opens_messages(server, cookie)
