"""Input no page can take is a 400 with a plain message, never a 500 (receiver/dashboard/
filters.py, web.py ``page``), over real HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import Engine

from receiver.app import create_app
from shared.config import Settings
from tests.support.dashboardkit import PASSWORD, D, csrf_from, login, seed
from tests.support.receiverkit import ServerThread


@pytest.fixture
def browser(engine: Engine, make_settings: Callable[..., Settings]) -> Iterator[httpx.Client]:
    """ada signed in, over HTTP to the receiver under uvicorn."""
    seed(engine)
    with (
        ServerThread(create_app(make_settings(), engine)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        login(client, "ada")
        yield client


@pytest.mark.parametrize(
    "path",
    [
        "/messages?q=%00",
        "/messages?sender=%00",
        "/messages?q=a%1Bb",
        "/overview?sender=%00",
        "/messages.csv?q=%00",
        "/events.csv?sender=%00",
    ],
)
def test_control_characters_in_filters_are_a_400(browser: httpx.Client, path: str) -> None:
    reply = browser.get(D + path)
    assert reply.status_code == 400
    assert "cannot contain control characters" in reply.text
    assert "Traceback" not in reply.text


def test_crlf_in_next_redirects_to_the_messages(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    """It was a RuntimeError in the response headers, and no response at all."""
    seed(engine)
    with (
        ServerThread(create_app(make_settings(), engine)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        form = csrf_from(client.get(f"{D}/login").text)
        reply = client.post(
            f"{D}/login?next=%2Fdashboard%2Fmessages%0D%0ASet-Cookie:%20x=1",
            data={"username": "ada", "password": PASSWORD, "csrf_token": form},
        )
    assert reply.status_code == 303
    assert reply.headers["location"] == f"{D}/messages"
    assert "x=1" not in reply.headers.get("set-cookie", "")
