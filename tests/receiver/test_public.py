"""The public page: what this host is, and "stop tracking me" with CSRF and confirmation."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import Engine, text
from starlette.testclient import TestClient

from receiver.app import create_app
from receiver.public import CSRF_COOKIE, normalize_address
from shared.config import Settings
from shared.policies import lookup_key
from tests.support.receiverkit import ServerThread


@pytest.fixture
def client(make_settings: Callable[..., Settings], engine: Engine) -> Iterator[TestClient]:
    settings = make_settings(
        operator_name="Example Trading Ltd", operator_contact="privacy@example.org"
    )
    with TestClient(create_app(settings, engine)) as c:
        yield c


def _hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name}"
    return match[1]


def _suppressions(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT address, source FROM suppressions"))]


def test_the_page_says_what_this_is_and_who_runs_it(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert "records when emails are opened and links are clicked" in page.text
    assert "Example Trading Ltd" in page.text
    assert "privacy@example.org" in page.text
    assert "Stop tracking me" in page.text
    assert CSRF_COOKIE in page.headers["set-cookie"]
    assert "samesite=strict" in page.headers["set-cookie"].lower()


def test_stop_tracking_with_confirmation(client: TestClient, engine: Engine) -> None:
    page = client.get("/")
    confirm = client.post(
        "/stop-tracking", data={"csrf": _hidden(page.text, "csrf"), "address": " Bob@Example.COM "}
    )
    assert confirm.status_code == 200
    assert "Stop tracking bob@example.com?" in confirm.text
    assert _suppressions(engine) == []  # nothing happens before the confirmation

    done = client.post(
        "/stop-tracking/confirm",
        data={"csrf": _hidden(confirm.text, "csrf"), "confirm": _hidden(confirm.text, "confirm")},
    )
    assert done.status_code == 200
    assert "will no longer be tracked" in done.text
    assert _suppressions(engine) == [("bob@example.com", "public")]

    again = client.post(
        "/stop-tracking/confirm",
        data={"csrf": _hidden(confirm.text, "csrf"), "confirm": _hidden(confirm.text, "confirm")},
    )
    assert again.status_code == 200  # idempotent
    assert _suppressions(engine) == [("bob@example.com", "public")]


def test_csrf_is_required(client: TestClient, engine: Engine) -> None:
    page = client.get("/")
    token = _hidden(page.text, "csrf")
    no_token = client.post("/stop-tracking", data={"address": "a@example.com"})
    assert no_token.status_code == 403
    assert "expired" in no_token.text
    client.cookies.clear()  # a cross-site POST carries no SameSite=Strict cookie
    no_cookie = client.post("/stop-tracking", data={"csrf": token, "address": "a@example.com"})
    assert no_cookie.status_code == 403
    forged = client.post(
        "/stop-tracking/confirm", data={"csrf": token, "confirm": "a@example.com.forged"}
    )
    assert forged.status_code == 403
    assert _suppressions(engine) == []


def test_bad_input_gets_a_clear_4xx(client: TestClient, engine: Engine) -> None:
    page = client.get("/")
    csrf = _hidden(page.text, "csrf")
    bad = client.post("/stop-tracking", data={"csrf": csrf, "address": "not an address"})
    assert bad.status_code == 400
    assert "does not look like an email address" in bad.text
    assert 'value="not an address"' in bad.text  # kept for correction (escaped by Jinja)
    tampered = client.post("/stop-tracking/confirm", data={"csrf": csrf, "confirm": "x.y.z"})
    assert tampered.status_code == 400
    assert "expired or was changed" in tampered.text
    not_a_form = client.post("/stop-tracking", content=b"{}", headers={"content-type": "x/json"})
    assert not_a_form.status_code == 400
    assert client.get("/stop-tracking").status_code == 405
    assert _suppressions(engine) == []


def test_markup_in_input_is_escaped(client: TestClient) -> None:
    page = client.get("/")
    bad = client.post(
        "/stop-tracking", data={"csrf": _hidden(page.text, "csrf"), "address": '"><script>x'}
    )
    assert bad.status_code == 400
    assert "<script>x" not in bad.text


def test_address_normalisation() -> None:
    assert normalize_address("  Alice@Example.org ") == "alice@example.org"
    for bad in ["", "alice", "a@b", "a b@example.org", "a@@example.org", "x" * 400 + "@e.org"]:
        assert normalize_address(bad) is None, bad


def test_address_is_stored_as_the_relay_looks_it_up() -> None:
    # An IDN domain must be kept in its IDNA form, or the relay never matches it.
    stored = normalize_address("Jörg@Bücher.example")
    assert stored == "jörg@xn--bcher-kva.example"
    assert stored == lookup_key("jörg@bücher.example")[0]


def test_the_form_is_rate_limited_per_address(
    make_settings: Callable[..., Settings], engine: Engine
) -> None:
    """300 arbitrary addresses in 3 s went in; now the Nth+1 POST of one address is a 429."""
    settings = make_settings(public_form_limit=3)
    with (
        ServerThread(create_app(settings, engine)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        csrf = _hidden(http.get("/").text, "csrf")
        codes = []
        for i in range(5):
            reply = http.post("/stop-tracking", data={"csrf": csrf, "address": f"x{i}@example.com"})
            codes.append(reply.status_code)
        assert "Too many requests from your address. Try again in 10 minutes." in reply.text
        confirm = http.post("/stop-tracking/confirm", data={"csrf": csrf, "confirm": "x"})
        assert confirm.status_code == 429
    assert codes == [200, 200, 200, 429, 429]
    assert _suppressions(engine) == []


def test_public_pages_carry_the_dashboards_security_headers(client: TestClient) -> None:
    """No inline style: the CSP that holds the dashboard holds here too (hardening, 17.9)."""
    from receiver.dashboard.headers import HEADERS

    home = client.get("/")
    posted = client.post("/stop-tracking", data={"email": "x@example.org"})  # no CSRF: 4xx
    assert posted.status_code >= 400
    for response in (home, posted):
        for name, value in HEADERS.items():
            assert response.headers[name] == value, name
    assert "<style" not in home.text
    assert " style=" not in home.text
    sheet = re.search(r'<link rel="stylesheet" href="([^"]+)"', home.text)
    assert sheet
    css = client.get(sheet[1])
    assert css.status_code == 200
    assert "footer" in css.text
