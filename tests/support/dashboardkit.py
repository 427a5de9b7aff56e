"""Shared by the dashboard tests: a seeded database, sign-in (also in a browser); the
real server thread is receiverkit's."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine
from starlette.testclient import TestClient

from shared import eventstate
from shared.db import session_scope
from shared.models import Event, Link, Message, Recipient, User, UserAddress
from shared.passwords import hash_password
from tests.support.seedrows import settle

if TYPE_CHECKING:  # Playwright is imported where a browser test runs, not at collection
    from playwright.sync_api import Locator, Page

D = "/dashboard"
PASSWORD = "correct horse battery"
NOW = datetime.now(UTC).replace(microsecond=0)
XSS_SUBJECT = "<script>alert(1)</script>"

# message ids (63-bit values, like the relay's)
M_OPENED = 7_000_000_000_000_000_001  # sam, opened + clicked, one copy refused
M_XSS = 7_000_000_000_000_000_002  # sam, tracked, nothing happened
M_CORP = 7_000_000_000_000_000_003  # x@corp.example, proxy open
M_UNTRACKED = 7_000_000_000_000_000_004  # someone else, not tracked, 10 days old


USERS = [
    ("ada", "admin", []),
    ("sam", "sender", ["sam@example.com"]),
    ("dom", "sender", ["@corp.example"]),
    ("nobody", "sender", []),
]


@cache
def _password_hash() -> str:
    """Hashed once per run: scrypt is slow on purpose."""
    return hash_password(PASSWORD)


def seed(engine: Engine) -> None:
    """Users ada (admin), sam (sam@example.com), dom (@corp.example), nobody; 4 messages."""
    with session_scope(engine) as s:
        for name, role, addresses in USERS:
            user = User(username=name, password_hash=_password_hash(), role=role)
            s.add(user)
            s.flush()
            assert user.id is not None
            s.add_all(UserAddress(user_id=user.id, address=a) for a in addresses)
    with session_scope(engine) as s:
        s.add(
            Message(
                id=M_OPENED,
                created_at=NOW - timedelta(hours=3),
                sender="sam@example.com",
                from_header="Sam Sender <sam@example.com>",
                subject="Quarterly numbers",
                track_opens=True,
                track_clicks=True,
                per_recipient=True,
                decision='{"tracked": true, "copies": 2, "policy": "sam@example.com", '
                '"mode": "header", "reasons": ["header X-Track: all"]}',
                status="partial",
            )
        )
        s.add(
            Recipient(message_id=M_OPENED, position=1, address="bob@client.example", tracked=True)
        )
        s.add(
            Recipient(
                message_id=M_OPENED,
                position=2,
                address="carol@client.example",
                status="refused",
                reply_code=550,
                reply_text="5.1.1 <carol@client.example>: mailbox unavailable",
            )
        )
        s.add(Link(message_id=M_OPENED, position=1, url="https://example.com/pricing?a=1&b=2"))
        s.add(Link(message_id=M_OPENED, position=2, url="javascript:alert(2)"))
        outlook = "Mozilla/4.0 (compatible; ms-office; MSOffice 16) Windows NT 10.0"
        s.add(_event("o1", M_OPENED, 1, 0, "open", "human", NOW - timedelta(hours=2), outlook))
        s.add(
            _event("o2", M_OPENED, 1, 0, "open", "machine", NOW - timedelta(hours=2), "Mozilla/5.0")
        )
        s.add(_event("c1", M_OPENED, 1, 1, "click", "human", NOW - timedelta(hours=1), outlook))
        s.add(_event("c2", M_OPENED, 1, 1, "click", "scanner", NOW - timedelta(hours=1), "curl/8"))

        s.add(
            Message(
                id=M_XSS,
                created_at=NOW - timedelta(hours=2),
                sender="sam@example.com",
                subject=XSS_SUBJECT,
                track_opens=True,
                track_clicks=True,
                per_recipient=True,
            )
        )
        s.add(Recipient(message_id=M_XSS, position=1, address="dave@client.example", tracked=True))

        s.add(
            Message(
                id=M_CORP,
                created_at=NOW - timedelta(hours=1),
                sender="x@corp.example",
                subject="Corp plan",
                track_opens=True,
            )
        )
        s.add(Recipient(message_id=M_CORP, position=1, address="erin@partner.example"))
        s.add(_event("o3", M_CORP, 0, 0, "open", "proxy", NOW, "Mozilla/5.0 GoogleImageProxy"))

        s.add(
            Message(
                id=M_UNTRACKED,
                created_at=NOW - timedelta(days=10),
                sender="other@elsewhere.example",
                subject="Lunch?",
            )
        )
        s.add(Recipient(message_id=M_UNTRACKED, position=1, address="frank@client.example"))
    settle(engine)  # sender_key and the state the relay and the receiver keep


def _event(
    key: str,
    message_id: int,
    recipient: int,
    link: int,
    kind: str,
    verdict: str,
    when: datetime,
    ua: str,
) -> Event:
    return Event(
        event_key=key,
        message_id=message_id,
        recipient_position=recipient,
        link_position=link,
        kind=kind,
        verdict=verdict,
        occurred_at=when,
        user_agent=ua,
        ip="203.0.113.0",
    )


def add_open(engine: Engine, message_id: int, key: str, recipient: int = 1) -> dict[str, Any]:
    """Write a human open as the receiver's event writer would; return its dict."""
    event = _event(
        key,
        message_id,
        recipient,
        0,
        "open",
        "human",
        datetime.now(UTC),
        "Mozilla/5.0 (iPhone) AppleWebKit/605",
    )
    with session_scope(engine) as s:
        s.add(event)
        s.flush()
        eventstate.apply(
            s.connection(), [(message_id, recipient, "open", "human", event.occurred_at, "")]
        )
    return event.model_dump()


CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def login(client: httpx.Client, username: str, password: str = PASSWORD) -> None:
    """Sign in through the login form: a TestClient, or an httpx client of a ServerThread."""
    token = csrf_from(client.get(f"{D}/login").text)
    response = client.post(
        f"{D}/login",
        data={"username": username, "password": password, "csrf_token": token},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text


def sign_in(page: Page, base: str, username: str = "ada", password: str = PASSWORD) -> None:
    """In a browser: a signed-out visit lands on the login page; signed in, on Messages."""
    from playwright.sync_api import expect

    page.goto(base + "/dashboard/")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Messages")


def connect_mailbox(page: Page, base: str, provider_url: str, address: str) -> Locator:
    """On the Mailbox page: Connect test, allow on the provider's consent page
    (tests/support/oauth_server.py) as ADDRESS, back with the connection ok; its row."""
    from playwright.sync_api import expect

    page.click("button:has-text('Connect test')")  # off to the provider
    expect(page.locator("h1")).to_have_text("Allow access to your mailbox?")
    assert page.url.startswith(f"{provider_url}/authorize?")
    page.fill("input[name=username]", address)
    page.click("button[value=allow]")
    expect(page).to_have_url(base + "/dashboard/mailbox")  # back, the code exchanged
    expect(page.locator(".flash")).to_contain_text(f"Connected {address} to test")
    row = page.locator(f'tr[data-connection="{address}"]')
    expect(row.locator("[data-state]")).to_have_text("ok")
    return row


def token(client: TestClient, path: str = f"{D}/messages") -> str:
    """The CSRF token of the signed-in session, read from a page."""
    return csrf_from(client.get(path).text)


QUARTERLY_ID = "<quarterly@example.com>"


def add_answers(engine: Engine) -> None:
    """M_OPENED answered as the intake listener's store writes it: bob replies (and
    sends an out-of-office), carol's copy bounces hard, bob reports it as spam."""
    from relay.answerstore import AnswerStore, item  # the relay's writer, as in production
    from shared.answers import Finding

    with session_scope(engine) as s:
        message = s.get(Message, M_OPENED)
        assert message is not None
        message.message_id_header = QUARTERLY_ID
        s.add(message)
    ids = (QUARTERLY_ID,)
    bounce = Finding(
        "bounce", "ndr-qmail", ids, "carol@client.example", "hard", "5.1.1",
        "Sorry, no mailbox here by that name.",
    )  # fmt: skip
    AnswerStore(engine).write(
        [
            item("a1", NOW, [Finding("reply", "in-reply-to", ids, "bob@client.example")]),
            item("a2", NOW, [Finding("auto_reply", "x-autoreply", ids, "bob@client.example")]),
            item("a3", NOW, [bounce]),
            item("a4", NOW, [Finding("complaint", "arf", ids, "bob@client.example")]),
        ],
        replay=False,
    )


def auto_reply_only(engine: Engine, message_id: int, header: str, address: str) -> None:
    """An out-of-office and nothing else for ``message_id``."""
    from relay.answerstore import AnswerStore, item
    from shared.answers import Finding

    with session_scope(engine) as s:
        message = s.get(Message, message_id)
        assert message is not None
        message.message_id_header = header
        s.add(message)
    finding = Finding("auto_reply", "x-autoreply", (header,), address)
    AnswerStore(engine).write([item("ooo-" + header, NOW, [finding])], replay=False)
