"""The webhook and API token pages (receiver/dashboard/integrations.py)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver.app import create_app
from shared import apitokens, webhook_signature, webhooks
from shared.config import Settings
from shared.db import session_scope
from shared.models import DeliveryAttempt, OutboxItem, utcnow
from tests.support.dashboardkit import D, login, seed, token
from tests.support.webhook_server import webhook_server

ADMIN_PAGES = ["/webhooks", "/webhooks/1", "/tokens"]
ADMIN_POSTS = [
    "/webhooks",
    "/webhooks/1/active",
    "/webhooks/1/test",
    "/webhooks/1/delete",
    "/tokens",
    "/tokens/1/revoke",
]


def test_senders_get_403_and_no_link(client: TestClient, engine: Engine) -> None:
    endpoint = webhooks.add_endpoint(engine, "https://hooks.example/a")
    apitokens.create_token(engine, "ada", "script")
    login(client, "sam")
    for path in ADMIN_PAGES:
        response = client.get(D + path)
        assert response.status_code == 403, path
        assert "Administrators only" in response.text
    t = token(client)
    for path in ADMIN_POSTS:
        data = {"csrf_token": t, "url": "https://evil.example/", "name": "x", "active": "0"}
        assert client.post(D + path, data=data).status_code == 403, path
    html = client.get(f"{D}/messages").text
    assert f"{D}/webhooks" not in html
    assert f"{D}/tokens" not in html
    assert [e.url for e in webhooks.list_endpoints(engine)] == [endpoint.url]
    assert webhooks.get_endpoint(engine, endpoint.id or 0).active
    assert [t.revoked_at for t, _ in apitokens.list_tokens(engine)] == [None]


def test_posts_without_csrf_change_nothing(client: TestClient, engine: Engine) -> None:
    webhooks.add_endpoint(engine, "https://hooks.example/a")
    apitokens.create_token(engine, "ada", "script")
    login(client, "ada")
    for path in ADMIN_POSTS:
        data = {"url": "https://other.example/", "name": "x", "active": "0"}
        response = client.post(D + path, data=data)
        assert response.status_code == 403, path
        assert "This form has expired" in response.text
    assert len(webhooks.list_endpoints(engine)) == 1
    assert webhooks.get_endpoint(engine, 1).active
    assert [t.revoked_at for t, _ in apitokens.list_tokens(engine)] == [None]


def test_add_webhook_shows_the_secret_once(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    assert "No endpoints yet" in client.get(f"{D}/webhooks").text
    t = token(client, f"{D}/webhooks")
    bad = client.post(f"{D}/webhooks", data={"csrf_token": t, "url": "ftp://files.example/"})
    assert bad.status_code == 400
    assert "is not a web address: it starts with https://" in bad.text
    assert "Choose at least one event type to send." in bad.text
    assert webhooks.list_endpoints(engine) == []

    form = {
        "csrf_token": t,
        "url": "https://crm.example/hooks?a=1&b=<2>",
        "description": "CRM <b>sync</b>",
        "type:message.opened": "on",
        "type:link.clicked": "on",
    }
    added = client.post(f"{D}/webhooks", data=form)
    assert added.status_code == 200
    assert added.headers["cache-control"] == "no-store"
    (endpoint,) = webhooks.list_endpoints(engine)
    assert endpoint.event_types == "message.opened,link.clicked"
    assert endpoint.description == "CRM <b>sync</b>"
    assert added.text.count(endpoint.secret) == 1
    assert "This is the only time it is shown." in added.text
    assert "CRM &lt;b&gt;sync&lt;/b&gt;" in added.text
    listed = client.get(f"{D}/webhooks").text
    assert endpoint.secret not in listed
    assert "https://crm.example/hooks?a=1&amp;b=&lt;2&gt;" in listed
    assert "message.opened" in listed
    assert "Active" in listed
    detail = client.get(f"{D}/webhooks/{endpoint.id}").text
    assert endpoint.secret not in detail
    assert "Nothing delivered yet" in detail

    every = {"csrf_token": t, "url": "https://all.example/"}
    every |= {f"type:{name}": "on" for name in webhooks.EVENT_TYPES}
    assert client.post(f"{D}/webhooks", data=every).status_code == 200
    assert webhooks.list_endpoints(engine)[1].event_types == "*"
    assert "every event" in client.get(f"{D}/webhooks").text


def test_pause_resume_remove_and_missing(client: TestClient, engine: Engine) -> None:
    endpoint = webhooks.add_endpoint(engine, "https://hooks.example/a")
    login(client, "ada")
    t = token(client, f"{D}/webhooks")
    paused = client.post(
        f"{D}/webhooks/{endpoint.id}/active", data={"csrf_token": t, "active": "0"}
    )
    assert "Paused https://hooks.example/a." in paused.text
    assert not webhooks.get_endpoint(engine, endpoint.id or 0).active
    assert "Resume" in client.get(f"{D}/webhooks").text
    resumed = client.post(
        f"{D}/webhooks/{endpoint.id}/active", data={"csrf_token": t, "active": "1"}
    )
    assert "Sending to https://hooks.example/a again" in resumed.text
    assert webhooks.get_endpoint(engine, endpoint.id or 0).active
    for path in ("/webhooks/99", "/webhooks/99999999999"):
        assert client.get(D + path).status_code == 404
    for action in ("active", "test", "delete"):
        assert client.post(f"{D}/webhooks/99/{action}", data={"csrf_token": t}).status_code == 404
    removed = client.post(f"{D}/webhooks/{endpoint.id}/delete", data={"csrf_token": t})
    assert "Removed https://hooks.example/a" in removed.text
    assert webhooks.list_endpoints(engine) == []


@pytest.fixture
def loopback_client(engine: Engine, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The dashboard allowed to reach webhook_server() on loopback."""
    seed(engine)
    with TestClient(create_app(make_settings(webhook_allow_private=True), engine)) as client:
        yield client


def test_the_test_button_refuses_private_addresses_alike_open_or_closed(
    client: TestClient, engine: Engine
) -> None:
    """Without TRACKRELAY_WEBHOOK_ALLOW_PRIVATE nothing tells an open port from a closed one."""
    login(client, "ada")
    t = token(client, f"{D}/webhooks")
    with webhook_server() as server, socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
        open_ = webhooks.add_endpoint(engine, server.url)
        shut = webhooks.add_endpoint(engine, f"http://127.0.0.1:{closed}/")
        said = []
        for endpoint in (open_, shut):
            page = client.post(f"{D}/webhooks/{endpoint.id}/test", data={"csrf_token": t})
            said.append(re.findall(r"Could not deliver the test event[^<]*", page.text))
        assert server.requests == []
    assert said[0] == said[1]
    assert "non-public address" in said[0][0]


def test_send_test_event_and_delivery_log(loopback_client: TestClient, engine: Engine) -> None:
    client = loopback_client
    with webhook_server() as server:
        server.script = [200, 503]
        endpoint = webhooks.add_endpoint(engine, server.url, ["message.opened"])
        login(client, "ada")
        t = token(client, f"{D}/webhooks")
        ok = client.post(f"{D}/webhooks/{endpoint.id}/test", data={"csrf_token": t})
        assert re.search(r"Test event delivered: the endpoint answered 200 in \d+ ms\.", ok.text)
        (received,) = server.requests
        assert webhook_signature.verify_signature(
            endpoint.secret, received.headers[webhook_signature.SIGNATURE_HEADER], received.body
        )
        refused = client.post(f"{D}/webhooks/{endpoint.id}/test", data={"csrf_token": t})
        assert "The endpoint answered 503" in refused.text
        assert "flash-error" in refused.text
    gone = client.post(f"{D}/webhooks/{endpoint.id}/test", data={"csrf_token": t})
    assert "Could not deliver the test event" in gone.text

    # the worker's log: one failed attempt that will be retried, then a success
    with session_scope(engine) as s:
        row = OutboxItem(
            channel="webhook",
            target=str(endpoint.id),
            endpoint_id=endpoint.id,
            event_type="message.opened",
            idempotency_key="message.opened:1:1",
            payload="{}",
            status="pending",
        )
        s.add(row)
        s.flush()
        assert row.id is not None
        s.add(
            DeliveryAttempt(
                outbox_id=row.id,
                attempt=1,
                status="error",
                reply_code=500,
                latency_ms=41,
                error="HTTP 500 <html>",
                started_at=utcnow(),
            )
        )
    detail = client.get(f"{D}/webhooks/{endpoint.id}").text
    assert "message.opened" in detail
    assert "Failed" in detail
    assert "will retry" in detail
    assert ">500<" in detail
    assert "41 ms" in detail
    assert "HTTP 500 &lt;html&gt;" in detail


def test_api_token_is_shown_once_and_revocable(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    assert "No tokens yet" in client.get(f"{D}/tokens").text
    t = token(client, f"{D}/tokens")
    bad = client.post(f"{D}/tokens", data={"csrf_token": t, "name": " ", "username": "ada"})
    assert bad.status_code == 400
    assert "Give the token a name" in bad.text
    bad = client.post(f"{D}/tokens", data={"csrf_token": t, "name": "x", "username": "ghost"})
    assert bad.status_code == 400
    assert "No user &#39;ghost&#39;." in bad.text
    assert apitokens.list_tokens(engine) == []

    made = client.post(
        f"{D}/tokens", data={"csrf_token": t, "name": "CRM <sync>", "username": "sam"}
    )
    assert made.status_code == 200
    assert made.headers["cache-control"] == "no-store"
    match = re.search(r'id="new-token">(trk_[A-Za-z0-9_-]+)<', made.text)
    assert match, "the token is on the page"
    secret = match.group(1)
    assert made.text.count(secret) == 1
    assert 'data-copy="#new-token"' in made.text
    principal = apitokens.authenticate_token(engine, secret)
    assert principal is not None
    assert principal.username == "sam"
    assert not principal.is_admin
    listed = client.get(f"{D}/tokens").text
    assert secret not in listed
    assert secret[:12] + "…" in listed
    assert "CRM &lt;sync&gt;" in listed
    assert "sam" in listed

    (row, _), *_ = apitokens.list_tokens(engine)
    assert client.post(f"{D}/tokens/999/revoke", data={"csrf_token": t}).status_code == 404
    revoked = client.post(f"{D}/tokens/{row.id}/revoke", data={"csrf_token": t})
    assert "revoked: it stops working at once" in revoked.text
    assert apitokens.authenticate_token(engine, secret) is None
    assert "Revoked" in client.get(f"{D}/tokens").text


@pytest.mark.parametrize("path", ["/webhooks", "/tokens"])
def test_nav_links_for_admins(client: TestClient, path: str) -> None:
    login(client, "ada")
    html = client.get(f"{D}/messages").text
    assert f'href="{D}{path}"' in html
    assert 'aria-current="page"' in client.get(D + path).text


@pytest.mark.parametrize(
    ("path", "fields", "count"),
    [
        (
            "/webhooks",
            {"url": "https://crm.example/h", "type:link.clicked": "on"},
            lambda engine: len(webhooks.list_endpoints(engine)),
        ),
        ("/tokens", {"name": "crm", "username": "ada"}, lambda e: len(apitokens.list_tokens(e))),
    ],
)
def test_reloading_the_page_that_shows_a_secret_creates_nothing_twice(
    client: TestClient, engine: Engine, path: str, fields: dict[str, str], count: Any
) -> None:
    """A reload re-sends the form: it lands on the list with a note, not a second secret."""
    login(client, "ada")
    page = client.get(f"{D}{path}").text
    once = re.search(r'name="once" value="([^"]+)"', page)
    assert once, "the form carries a one-time value"
    form = {"csrf_token": token(client, f"{D}{path}"), "once": once[1], **fields}
    first = client.post(f"{D}{path}", data=form)
    assert first.status_code == 200
    assert "only time" in first.text
    again = client.post(f"{D}{path}", data=form, follow_redirects=False)
    assert again.status_code == 303
    assert again.headers["location"] == f"{D}{path}"
    listed = client.get(f"{D}{path}").text
    assert "That form was already sent" in listed
    assert count(engine) == 1
    # a new page load gives a new value: a deliberate second one is still possible
    fresh = re.search(r'name="once" value="([^"]+)"', listed)
    assert fresh
    assert fresh[1] != once[1]
    assert client.post(f"{D}{path}", data={**form, "once": fresh[1]}).status_code == 200
    assert count(engine) == 2
