"""The dashboard over HTTP (Starlette TestClient): every route and permission rule."""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func
from sqlmodel import select
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from receiver import dashboard
from receiver.app import create_app
from receiver.dashboard.devices import device_family
from receiver.sessions import COOKIE_NAME
from shared import apitokens
from shared.config import Settings
from shared.db import session_scope
from shared.models import (
    ApiToken,
    Consent,
    ConsentMode,
    MailboxConnection,
    Message,
    Policy,
    Suppression,
    User,
    WebhookEndpoint,
)
from tests.support.dashboardkit import (
    M_CORP,
    M_OPENED,
    M_UNTRACKED,
    M_XSS,
    NOW,
    PASSWORD,
    XSS_SUBJECT,
    D,
    csrf_from,
    login,
    seed,
    token,
)
from tests.support.seedrows import event, settle, write_events


def ids_on(html: str) -> set[int]:
    return {m for m in (M_OPENED, M_XSS, M_CORP, M_UNTRACKED) if f'data-message-id="{m}"' in html}


# --- signing in and out ---


def test_anonymous_get_goes_to_login(client: TestClient) -> None:
    paths = [
        r.path.replace("{message_id:int}", str(M_OPENED)).replace("{policy_id:int}", "1")
        for r in dashboard.routes
        if isinstance(r, Route) and "GET" in (r.methods or ()) and r.path != "/login"
    ]
    assert len(paths) > 10
    for path in paths:
        path = path.replace("{user_id:int}", "1").replace("{endpoint_id:int}", "1")
        response = client.get(D + path, follow_redirects=False)
        if path == "/":
            assert response.headers["location"] == f"{D}/messages"
            continue
        assert response.status_code == 303, path
        assert response.headers["location"].startswith(f"{D}/login?next=")


def test_login_sets_a_safe_cookie_and_rotates_the_session(client: TestClient) -> None:
    before_page = client.get(f"{D}/login")
    before = client.cookies.get(COOKIE_NAME)
    assert before
    response = client.post(
        f"{D}/login",
        data={"username": "ada", "password": PASSWORD, "csrf_token": csrf_from(before_page.text)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"{D}/messages"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here
    after = client.cookies.get(COOKIE_NAME)
    assert after
    assert after != before
    # a new CSRF token after login
    assert token(client) != csrf_from(before_page.text)
    # the pre-login cookie (what an attacker could have planted) is not signed in
    planted = TestClient(client.app)
    planted.cookies.set(COOKIE_NAME, before)
    assert planted.get(f"{D}/messages", follow_redirects=False).status_code == 303


def test_cookie_is_secure_over_https(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    seed(engine)
    with TestClient(create_app(make_settings(), engine), base_url="https://testserver") as c:
        c.get(f"{D}/login")
        login(c, "ada")
        response = c.post(f"{D}/logout", data={"csrf_token": token(c)}, follow_redirects=False)
        assert "Secure" in response.headers["set-cookie"]


def test_wrong_password_and_unknown_user(client: TestClient) -> None:
    for username in ("ada", "nobody-at-all"):
        page = client.get(f"{D}/login")
        response = client.post(
            f"{D}/login",
            data={"username": username, "password": "wrong", "csrf_token": csrf_from(page.text)},
        )
        assert response.status_code == 401
        assert "That username and password do not match." in response.text
    assert client.get(f"{D}/messages", follow_redirects=False).status_code == 303


def test_login_is_throttled(engine: Engine, make_settings: Callable[..., Settings]) -> None:
    seed(engine)
    settings = make_settings(auth_failures_per_user=3, auth_failures_per_ip=50)
    with TestClient(create_app(settings, engine)) as c:
        for _ in range(3):
            page = c.get(f"{D}/login")
            data = {"username": "ada", "password": "guess", "csrf_token": csrf_from(page.text)}
            assert c.post(f"{D}/login", data=data).status_code == 401
        page = c.get(f"{D}/login")
        data = {"username": "ada", "password": PASSWORD, "csrf_token": csrf_from(page.text)}
        response = c.post(f"{D}/login", data=data)
        assert response.status_code == 429
        assert "Too many failed attempts. Try again in 15 minutes." in response.text
        # another user from the same address is not locked out
        login(c, "sam")


def test_login_next_stays_inside_the_dashboard(client: TestClient) -> None:
    for target, expected in [
        (f"{D}/overview?period=week", f"{D}/overview?period=week"),
        ("https://evil.example/", f"{D}/messages"),
        ("//evil.example/x", f"{D}/messages"),
    ]:
        page = client.get(f"{D}/login")
        response = client.post(
            f"{D}/login",
            params={"next": target},
            data={"username": "ada", "password": PASSWORD, "csrf_token": csrf_from(page.text)},
            follow_redirects=False,
        )
        assert response.headers["location"] == expected


def test_logout(client: TestClient) -> None:
    login(client, "ada")
    assert client.get(f"{D}/logout").status_code == 405  # never by GET (a link or an image)
    response = client.post(
        f"{D}/logout", data={"csrf_token": token(client)}, follow_redirects=False
    )
    assert response.status_code == 303
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert client.get(f"{D}/messages", follow_redirects=False).status_code == 303


# --- CSRF ---


def post_routes() -> list[str]:
    paths = [
        r.path
        for r in dashboard.routes
        if isinstance(r, Route) and "POST" in (r.methods or ()) and r.path != "/login"
    ]
    return [
        p.replace("{policy_id:int}", "1")
        .replace("{suppression_id:int}", "1")
        .replace("{user_id:int}", "2")
        .replace("{endpoint_id:int}", "1")
        .replace("{token_id:int}", "1")
        .replace("{connection_id:int}", "1")
        for p in paths
    ]


def test_every_post_needs_the_csrf_token(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    with session_scope(engine) as s:
        s.add(Policy(pattern="*"))
        s.add(Suppression(address="x@y.example"))
        s.add(Consent(address="c@y.example"))
        s.add(WebhookEndpoint(url="https://hooks.example/x", secret="whsec_x"))
        s.add(MailboxConnection(user_id=1, address="ada@example.com", provider="x", grant="x"))
    apitokens.create_token(engine, "ada", "script")
    paths = post_routes()
    assert len(paths) >= 9
    good = token(client)
    for path in paths:
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": good + "x"}):
            response = client.post(D + path, data=data, follow_redirects=False)
            assert response.status_code == 403, (path, data)
            assert "This form has expired" in response.text
        # the right token from a foreign origin is refused too
        response = client.post(
            D + path, data={"csrf_token": good}, headers={"Origin": "https://evil.example"}
        )
        assert response.status_code == 403, path
    with session_scope(engine) as s:  # nothing was changed
        assert s.get(Policy, 1) is not None
        assert s.get(Suppression, 1) is not None
        assert s.get(User, 2) is not None
        assert s.get(Consent, 1) is not None
        assert s.get(MailboxConnection, 1) is not None
        endpoint = s.get(WebhookEndpoint, 1)
        assert endpoint is not None
        assert endpoint.active
        api_token = s.get(ApiToken, 1)
        assert api_token is not None
        assert api_token.revoked_at is None
        assert s.exec(select(func.count()).select_from(ConsentMode)).one() == 0
    assert client.get(f"{D}/messages").status_code == 200  # still signed in


def test_login_form_needs_the_csrf_token(client: TestClient) -> None:
    client.get(f"{D}/login")
    response = client.post(f"{D}/login", data={"username": "ada", "password": PASSWORD})
    assert response.status_code == 403
    assert client.get(f"{D}/messages", follow_redirects=False).status_code == 303


# --- who sees what ---


def test_admin_sees_everything_newest_first(client: TestClient) -> None:
    login(client, "ada")
    html = client.get(f"{D}/messages").text
    assert ids_on(html) == {M_OPENED, M_XSS, M_CORP, M_UNTRACKED}
    order = [html.index(f'data-message-id="{m}"') for m in (M_CORP, M_XSS, M_OPENED, M_UNTRACKED)]
    assert order == sorted(order)


def test_sender_sees_only_own_messages(client: TestClient) -> None:
    login(client, "sam")
    assert ids_on(client.get(f"{D}/messages").text) == {M_OPENED, M_XSS}
    assert client.get(f"{D}/messages/{M_OPENED}").status_code == 200
    for other in (M_CORP, M_UNTRACKED, 12345, 2**63 + 5):
        response = client.get(f"{D}/messages/{other}")
        assert response.status_code == 404
        assert "Corp plan" not in response.text
    rows = list(csv.DictReader(io.StringIO(client.get(f"{D}/messages.csv").text)))
    assert {int(r["message_id"]) for r in rows} == {M_OPENED, M_XSS}
    events = list(csv.DictReader(io.StringIO(client.get(f"{D}/events.csv").text)))
    assert {int(r["message_id"]) for r in events} == {M_OPENED}
    # a sender cannot filter their way into someone else's mail
    assert ids_on(client.get(f"{D}/messages", params={"sender": "x@corp.example"}).text) == set()
    assert "x@corp.example" not in client.get(f"{D}/overview").text


def test_domain_sender_and_sender_without_addresses(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    seed(engine)
    with session_scope(engine) as s:  # a look-alike domain must not match @corp.example
        s.add(Message(id=99, sender="x@evilcorp.example", subject="lookalike"))
    settle(engine)
    with TestClient(create_app(make_settings(), engine)) as client:
        login(client, "dom")
        html = client.get(f"{D}/messages").text
        assert ids_on(html) == {M_CORP}
        assert "lookalike" not in html
        assert client.get(f"{D}/messages/99").status_code == 404
        client.post(f"{D}/logout", data={"csrf_token": token(client)})
        login(client, "nobody")
        assert ids_on(client.get(f"{D}/messages").text) == set()


def test_admin_pages_are_for_admins(client: TestClient) -> None:
    login(client, "sam")
    for path in ("/policies", "/policies/new", "/suppressions", "/users", "/users/new", "/users/1"):
        response = client.get(D + path)
        assert response.status_code == 403, path
        assert "Administrators only" in response.text
    response = client.post(
        f"{D}/policies/new",
        data={"csrf_token": token(client), "pattern": "*", "mode": "always", "recipient_cap": "5"},
    )
    assert response.status_code == 403
    html = client.get(f"{D}/messages").text
    assert f"{D}/policies" not in html  # not in the navigation either


def test_removed_user_is_signed_out(client: TestClient, engine: Engine) -> None:
    login(client, "sam")
    with session_scope(engine) as s:
        user = s.exec(__import__("sqlmodel").select(User).where(User.username == "sam")).one()
        s.delete(user)
    assert client.get(f"{D}/messages", follow_redirects=False).status_code == 303


# --- escaping ---


def test_text_from_mail_is_escaped(client: TestClient) -> None:
    login(client, "ada")
    for path in (f"{D}/messages", f"{D}/messages/{M_XSS}"):
        html = client.get(path).text
        assert XSS_SUBJECT not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    detail = client.get(f"{D}/messages/{M_OPENED}").text
    assert 'href="javascript:' not in detail  # shown as text, never a link
    assert "javascript:alert(2)" in detail
    assert 'href="https://example.com/pricing?a=1&amp;b=2"' in detail


def test_csv_cells_cannot_be_formulas(client: TestClient, engine: Engine) -> None:
    with session_scope(engine) as s:
        s.add(Message(id=98, sender="sam@example.com", subject='=HYPERLINK("http://x","y")'))
    settle(engine)
    login(client, "ada")
    text = client.get(f"{D}/messages.csv").text
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["message_id"] == "98")
    assert row["subject"] == '\'=HYPERLINK("http://x","y")'


def test_csv_cells_cannot_be_formulas_in_semicolon_locales(
    client: TestClient, engine: Engine
) -> None:
    """A spreadsheet splitting on ";" read ``Hi;=HYPERLINK(...)`` as a second, formula cell."""
    with session_scope(engine) as s:
        s.add(Message(id=97, sender="sam@example.com", subject='Hi;=HYPERLINK("http://x")'))
        s.add(Message(id=96, sender="sam@example.com", subject="a, -1 and ;@SUM(1)"))
        s.add(Message(id=95, sender="sam@example.com", subject="plain; no formula"))
    login(client, "ada")
    text = client.get(f"{D}/messages.csv").text
    rows = {r["message_id"]: r for r in csv.DictReader(io.StringIO(text))}
    assert rows["97"]["subject"] == '\'Hi;=HYPERLINK("http://x")'
    assert rows["96"]["subject"] == "'a, -1 and ;@SUM(1)"
    assert rows["95"]["subject"] == "plain; no formula"
    assert '"\'Hi;=HYPERLINK(""http://x"")"' in text  # quoted: one cell whatever the separator
    assert '"plain; no formula"' in text


# --- the messages list ---


def test_icons_counts_and_machine_opens(client: TestClient) -> None:
    login(client, "ada")
    html = client.get(f"{D}/messages").text
    row = html[html.index(f'data-message-id="{M_OPENED}"') :]
    row = row[: row.index("</tr>")]
    assert "hit-open is-hit" in row
    assert "Opened 1 time" in row
    assert "hit-click is-hit" in row
    assert "Clicked 1 time" in row
    assert "1 automatic open" in row
    assert "1 of 2 refused" in row
    xss = html[html.index(f'data-message-id="{M_XSS}"') :]
    assert "hit-open is-none" in xss[: xss.index("</tr>")]
    untracked = html[html.index(f'data-message-id="{M_UNTRACKED}"') :]
    assert "hit-open is-off" in untracked[: untracked.index("</tr>")]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"state": "opened"}, {M_OPENED, M_CORP}),
        ({"state": "not_opened"}, {M_XSS}),
        ({"state": "clicked"}, {M_OPENED}),
        ({"tracking": "on"}, {M_OPENED, M_XSS, M_CORP}),
        ({"tracking": "off"}, {M_UNTRACKED}),
        ({"sender": "SAM@example.com"}, {M_OPENED, M_XSS}),
        ({"q": "carol@"}, {M_OPENED}),
        ({"q": "QUARTERLY"}, {M_OPENED}),
        ({"q": "%"}, set()),
        ({"from": (NOW - timedelta(days=1)).date().isoformat()}, {M_OPENED, M_XSS, M_CORP}),
        ({"to": (NOW - timedelta(days=5)).date().isoformat()}, {M_UNTRACKED}),
        ({"state": "opened", "sender": "x@corp.example"}, {M_CORP}),
    ],
)
def test_filters(client: TestClient, params: dict[str, str], expected: set[int]) -> None:
    login(client, "ada")
    assert ids_on(client.get(f"{D}/messages", params=params).text) == expected


def test_not_opened_means_tracked_for_opens_and_no_counted_open(
    client: TestClient, engine: Engine
) -> None:
    """As in the API: mail not tracked for opens is not "not opened"."""
    with session_scope(engine) as s:
        s.add(Message(id=97, sender="sam@example.com", subject="clicks only", track_clicks=True))
    settle(engine)
    login(client, "ada")
    html = client.get(f"{D}/messages", params={"state": "not_opened"}).text
    assert ids_on(html) == {M_XSS}  # not M_UNTRACKED: never tracked
    assert 'data-message-id="97"' not in html  # tracked for clicks only


def test_search_matches_like_wildcards_literally(client: TestClient, engine: Engine) -> None:
    with session_scope(engine) as s:
        for mid, subject in ((91, "50% off"), (92, "500 off"), (93, "Plan a_b"), (94, "Plan a1b")):
            s.add(Message(id=mid, sender="sam@example.com", subject=subject))
    settle(engine)
    login(client, "ada")

    def found(q: str) -> set[int]:
        html = client.get(f"{D}/messages", params={"q": q}).text
        return {m for m in (91, 92, 93, 94) if f'data-message-id="{m}"' in html}

    assert found("50%") == {91}
    assert found("A_B") == {93}


def test_bad_filter_values_are_explained(client: TestClient) -> None:
    login(client, "ada")
    response = client.get(f"{D}/messages", params={"from": "yesterday", "page": "x"})
    assert response.status_code == 200
    assert "is not a date like 2025-03-31; ignored." in response.text


def test_paging(client: TestClient, engine: Engine) -> None:
    """Keyset pages: "Older" and "Newer" links carry a cursor and keep the filters."""
    with session_scope(engine) as s:
        for i in range(60):
            s.add(Message(id=1000 + i, sender="bulk@example.com", subject=f"bulk {i:02}"))
    settle(engine)
    login(client, "ada")
    first = client.get(f"{D}/messages", params={"sender": "bulk@example.com"}).text
    assert "60 messages" in first
    assert first.count("data-message-id=") == 50
    assert "Newer" not in first
    older = re.search(r'href="([^"]*sender=bulk%40example.com&amp;cursor=[^"]+)" rel="next"', first)
    assert older, "the pager keeps the filters"
    second = client.get(html.unescape(older.group(1))).text
    assert second.count("data-message-id=") == 10
    assert "Older" not in second
    newer = re.search(r'href="([^"]+)" rel="prev"', second)
    assert newer
    back = client.get(html.unescape(newer.group(1))).text
    assert re.findall(r'data-message-id="(\d+)"', back) == re.findall(
        r'data-message-id="(\d+)"', first
    )
    bad = client.get(f"{D}/messages", params={"cursor": "o:nonsense"})
    assert bad.status_code == 200
    assert "not one this dashboard made" in bad.text


def test_a_long_timeline_shows_more_by_a_link(client: TestClient, engine: Engine) -> None:
    with session_scope(engine) as s:
        message = s.get(Message, M_OPENED)
    assert message is not None
    write_events(engine, [event(message, at=NOW - timedelta(seconds=n)) for n in range(130)])
    login(client, "ada")
    page = client.get(f"{D}/messages/{M_OPENED}").text
    assert page.count('class="tl-item') == 100
    more = re.search(r'href="([^"]+)" rel="next">Show more', page)
    assert more
    rest = client.get(html.unescape(more.group(1))).text
    assert rest.count('class="tl-item') > 0
    assert "Latest events" in rest
    assert "Show more" not in rest


def test_csv_export_follows_the_filters(client: TestClient) -> None:
    login(client, "ada")
    response = client.get(f"{D}/messages.csv", params={"state": "opened"})
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {int(r["message_id"]) for r in rows} == {M_OPENED, M_CORP}
    opened = next(r for r in rows if int(r["message_id"]) == M_OPENED)
    assert (opened["opens"], opened["clicks"], opened["machine_opens"]) == ("1", "1", "1")
    assert opened["recipients"] == "bob@client.example; carol@client.example"
    events = list(csv.DictReader(io.StringIO(client.get(f"{D}/events.csv").text)))
    assert len(events) == 5
    click = next(e for e in events if e["kind"] == "click" and e["verdict"] == "human")
    assert click["url"] == "https://example.com/pricing?a=1&b=2"
    assert click["recipient"] == "bob@client.example"


# --- one message ---


def test_message_detail(client: TestClient) -> None:
    login(client, "ada")
    html = client.get(f"{D}/messages/{M_OPENED}").text
    assert "automated" not in html
    for text in (
        "Quarterly numbers",
        "bob@client.example",
        "carol@client.example",
        "550 5.1.1 &lt;carol@client.example&gt;: mailbox unavailable",
        "Partly delivered",
        "Outlook on Windows",
        "Apple Mail privacy proxy",
        "IP 203.0.113.0",
        "Opens and clicks tracked because the message asked for it (X-Track).",
        "Partly delivered: 1 of 2 accepted by the server, 1 refused.",
        "1 automatic",
        "Person",
        "Machine",
    ):
        assert text in html, text
    corp = client.get(f"{D}/messages/{M_CORP}").text
    assert "Whole message" in corp
    assert "Gmail image proxy" in corp


def test_device_families() -> None:
    iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15"
    assert device_family(iphone) == "Apple Mail (iPhone)"
    assert device_family("Mozilla/5.0 (Windows NT 10.0; Win64) Chrome/120.0 Safari/537.36") == (
        "Chrome on Windows"
    )
    assert device_family("Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Thunderbird/115.0") == (
        "Thunderbird on Linux"
    )
    assert device_family("") == "No user agent"


# --- overview ---


def test_overview(client: TestClient) -> None:
    login(client, "ada")
    html = client.get(f"{D}/overview").text
    assert "<svg" in html
    assert "Open and click rate" in html
    assert "x@corp.example" in html
    assert "sam@example.com" in html
    assert "Human / machine opens" in html
    weekly = client.get(f"{D}/overview", params={"period": "week", "sender": "sam@example.com"})
    assert "Weekly, last 12 weeks" in weekly.text
    assert "x@corp.example</a>" not in weekly.text
    assert client.get(f"{D}/overview", params={"period": "bogus"}).status_code == 200


# --- policies, suppression, users ---


def test_policy_crud(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    t = token(client, f"{D}/policies/new")
    form = {"csrf_token": t, "pattern": "not an address", "mode": "sometimes", "recipient_cap": "0"}
    response = client.post(f"{D}/policies/new", data=form)
    assert response.status_code == 400
    assert "is not an email address (ann@example.com)" in response.text
    assert "Choose when to track" in response.text
    assert "from 1 to 1000" in response.text
    form = {
        "csrf_token": t, "pattern": "@Example.com", "mode": "always", "recipient_cap": "10",
        "allow_opens": "on", "per_recipient": "on",
    }  # fmt: skip
    response = client.post(f"{D}/policies/new", data=form)
    assert response.status_code == 200
    assert "Policy for @example.com added." in response.text
    with session_scope(engine) as s:
        policy = s.exec(__import__("sqlmodel").select(Policy)).one()
    assert (policy.pattern, policy.mode, policy.allow_clicks, policy.recipient_cap) == (
        "@example.com", "always", False, 10,
    )  # fmt: skip
    again = client.post(f"{D}/policies/new", data=form)
    assert again.status_code == 400
    assert "There is already a policy for @example.com" in again.text
    form.update(mode="never", allow_clicks="on")
    assert client.post(f"{D}/policies/{policy.id}", data=form).status_code == 200
    assert "Never" in client.get(f"{D}/policies").text
    assert client.get(f"{D}/policies/999").status_code == 404
    client.post(f"{D}/policies/{policy.id}/delete", data={"csrf_token": t})
    assert "No policies yet" in client.get(f"{D}/policies").text


def test_suppression_list(client: TestClient) -> None:
    login(client, "ada")
    t = token(client, f"{D}/suppressions")
    bad = client.post(f"{D}/suppressions", data={"csrf_token": t, "address": "@example.com"})
    assert bad.status_code == 400
    assert "not a whole domain" in bad.text
    bad = client.post(f"{D}/suppressions", data={"csrf_token": t, "address": "nope"})
    assert "is not an email address" in bad.text
    ok = client.post(f"{D}/suppressions", data={"csrf_token": t, "address": "Zoe@Example.com"})
    assert "zoe@example.com will not be tracked any more." in ok.text
    dup = client.post(f"{D}/suppressions", data={"csrf_token": t, "address": "zoe@example.com"})
    assert "already on the list" in dup.text
    assert "zoe@example.com" in client.get(f"{D}/suppressions", params={"q": "zoe"}).text
    assert "zoe@example.com" not in client.get(f"{D}/suppressions", params={"q": "xyz"}).text
    client.post(f"{D}/suppressions/1/delete", data={"csrf_token": t})
    assert "Nobody is on the list." in client.get(f"{D}/suppressions").text


def test_user_management(client: TestClient, engine: Engine) -> None:
    login(client, "ada")
    t = token(client, f"{D}/users/new")
    bad = client.post(
        f"{D}/users/new",
        data={
            "csrf_token": t,
            "username": "",
            "role": "boss",
            "password": "short",
            "addresses": "x",
        },
    )
    assert bad.status_code == 400
    for text in ("Enter a username.", "Choose a role", "at least 8 characters", "Not an address"):
        assert text in bad.text
    data = {
        "csrf_token": t, "username": "tina", "role": "sender", "password": "long enough pw",
        "addresses": "tina@example.com\n@team.example",
    }  # fmt: skip
    assert "User tina added." in client.post(f"{D}/users/new", data=data).text
    assert "already exists" in client.post(f"{D}/users/new", data=data).text
    with session_scope(engine) as s:
        tina = s.exec(__import__("sqlmodel").select(User).where(User.username == "tina")).one()
    edit = {"csrf_token": t, "role": "sender", "addresses": "tina@example.com", "password": ""}
    assert "User tina saved." in client.post(f"{D}/users/{tina.id}", data=edit).text
    assert "@team.example" not in client.get(f"{D}/users").text
    # ada cannot demote or remove herself (she is the only administrator)
    ada_id = 1
    demote = client.post(f"{D}/users/{ada_id}", data={**edit, "role": "sender"})
    assert "You cannot remove your own administrator role." in demote.text
    assert (
        "You cannot remove yourself."
        in client.post(f"{D}/users/{ada_id}/delete", data={"csrf_token": t}).text
    )
    assert (
        "User tina removed."
        in client.post(f"{D}/users/{tina.id}/delete", data={"csrf_token": t}).text
    )


def test_static_files_and_mount_shape() -> None:
    mounts = [r for r in dashboard.routes if isinstance(r, Mount)]
    assert [m.path for m in mounts] == ["/static"]


def test_static_served(client: TestClient) -> None:
    assert client.get(f"{D}/static/dashboard.css").status_code == 200
    assert "EventSource" in client.get(f"{D}/static/dashboard.js").text


def test_the_timeline_labels_answers(client: TestClient, engine: Engine) -> None:
    """Replies, automatic replies, bounces and complaints on the message page."""
    from relay.answerstore import AnswerStore, item
    from shared.answers import Finding

    with session_scope(engine) as s:
        message = s.get(Message, M_OPENED)
        assert message is not None
        message.message_id_header = "<quarterly@example.com>"
        s.add(message)
    ids = ("<quarterly@example.com>",)
    AnswerStore(engine).write(
        [
            item("c1", NOW, [Finding("reply", "in-reply-to", ids, "bob@client.example")]),
            item("c2", NOW, [Finding("auto_reply", "x-autoreply", ids, "bob@client.example")]),
            item(
                "c3",
                NOW,
                [
                    Finding(
                        "bounce",
                        "ndr-qmail",
                        ids,
                        "carol@client.example",
                        "hard",
                        "5.1.1",
                        "Sorry, no mailbox here by that name.",
                    )
                ],
            ),
            item("c4", NOW, [Finding("reply", "references", ids, "dora@elsewhere.example")]),
            item("c5", NOW, [Finding("complaint", "arf", ids, "bob@client.example")]),
        ],
        replay=False,
    )
    login(client, "ada")
    html = client.get(f"{D}/messages/{M_OPENED}").text
    for text in (
        "Replied",
        "Automatic reply",
        "Bounced (hard)",
        "5.1.1 Sorry, no mailbox here by that name.",
        "Replied by someone else",
        "Marked as spam",
        "x-autoreply",
    ):
        assert text in html, text
    assert "dora@elsewhere.example" not in html  # never stored
