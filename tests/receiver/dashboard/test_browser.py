"""The dashboard in headless Chromium, the way a person uses it.

Chromium is the Debian package (/usr/bin/chromium) driven by Playwright with
``executable_path``; Playwright never downloads a browser. Screenshots of each
page, at 1280x800 and at phone width (390x844), go to
``test-artifacts/screenshots/`` for people to look at.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import col, select

from receiver.app import create_app
from shared import db
from shared.config import Settings
from shared.db import session_scope
from shared.models import Event, Message
from shared.tokens import Signer
from tests.support.dashboardkit import (
    M_OPENED,
    M_XSS,
    add_answers,
    seed,
    sign_in,
)
from tests.support.receiverkit import ServerThread
from tests.support.relaykit import relay_one, relay_settings
from tests.support.seedrows import event, write_events
from tests.support.upstream import RecordingUpstream

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IPHONE_MAIL = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
SHOTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the Debian chromium package"),
]
TWO_OF_US = (
    b"X-Track: opens, clicks\r\nFrom: Alice <alice@example.com>\r\n"
    b"To: bob@client.example, carol@client.example\r\nSubject: Two of us\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
    b'<p>Our <a href="https://example.com/offer">offer</a>.</p>\r\n'
)


def relay_two_of_us(settings: Settings, engine: Engine) -> int:
    """As the issue saw it: one tracked message to two recipients through the real
    relay (recording upstream, the same database); its id."""
    relay_one(
        settings, engine, TWO_OF_US, recipients=("bob@client.example", "carol@client.example")
    )
    with session_scope(engine) as s:
        message_id = s.exec(select(Message.id).where(Message.subject == "Two of us")).one()
    assert message_id is not None
    return message_id


def wait_for_events(engine: Engine, message_id: int, count: int) -> None:
    """The event writer batches: wait until ``count`` events of the message are stored."""
    for _ in range(200):
        with session_scope(engine) as s:
            found = s.exec(select(func.count()).where(col(Event.message_id) == message_id)).one()
        if found >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} events of message {message_id} never arrived")


def test_dashboard_in_a_browser(
    tmp_path: Path, make_settings: Callable[..., Settings], upstream: RecordingUpstream
) -> None:
    from playwright.sync_api import Page, expect, sync_playwright

    url = f"sqlite:///{tmp_path / 'dash.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    seed(engine)
    add_answers(engine)  # Quarterly numbers: bob replies, carol's copy bounces hard
    settings = make_settings(database_url=url)
    two_of_us = relay_two_of_us(relay_settings(make_settings, upstream, database_url=url), engine)
    bob_copy = next(m for m in upstream.messages if m.rcpt_tos == ["bob@client.example"]).data
    [pixel_path] = re.findall(rb"/o/[\w-]+\.gif", bob_copy)
    [link_path] = re.findall(rb"/c/[\w-]+", bob_copy)
    app = create_app(settings, engine)
    SHOTS.mkdir(parents=True, exist_ok=True)
    dialogs: list[str] = []

    def shot(page: Page, name: str) -> None:
        width = page.viewport_size["width"] if page.viewport_size else 0
        suffix = "phone" if width < 600 else "desktop"
        page.screenshot(path=str(SHOTS / f"{name}-{suffix}.png"), full_page=True)

    with ServerThread(app) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        # sign in
        page.goto(server.url + "/dashboard/")
        shot(page, "login")
        sign_in(page, server.url)
        shot(page, "messages")
        expect(page.locator(".subject", has_text="<script>alert(1)</script>")).to_be_visible()

        # filter to opened messages
        page.click("nav.segmented >> text=Opened")
        expect(page).to_have_url(re.compile(r"state=opened"))
        expect(page.locator("tbody tr")).to_have_count(2)
        shot(page, "messages-opened")

        # a pixel hit on a message nobody opened: the toast, and the icon darkens
        page.click("nav.segmented >> text=Any")
        icon = page.locator(f'tr[data-message-id="{M_XSS}"] .hit-open')
        expect(icon).to_have_class(re.compile(r"\bis-none\b"))
        page.wait_for_function("document.body.dataset.liveState === 'open'")
        # dave's mail client loads the real pixel: /o -> event writer -> live feed
        pixel = f"{server.url}/o/{Signer(settings.signing_keys()).open_token(M_XSS, 1)}.gif"
        started = time.monotonic()
        hit = httpx.get(pixel, headers={"User-Agent": IPHONE_MAIL})
        assert (hit.status_code, hit.headers["content-type"]) == (200, "image/gif")
        toast = page.locator(".toast")
        expect(toast).to_contain_text("Opened by dave@client.example", timeout=10_000)
        print(f"pixel hit -> toast on screen: {(time.monotonic() - started) * 1000:.0f} ms")
        expect(toast).to_contain_text("<script>alert(1)</script>")  # as text
        expect(icon).to_have_class(re.compile(r"\bis-hit\b"))
        shot(page, "live-notification")
        page.reload()
        expect(icon).to_have_class(re.compile(r"\bis-hit\b"))  # and it stays dark
        page.locator(f'tr[data-message-id="{M_OPENED}"] .hit-open').hover()
        expect(page.locator(f'tr[data-message-id="{M_OPENED}"] .hit-open .tip')).to_be_visible()
        shot(page, "messages-tooltip")

        # the answers: a dark reply arrow saying when, a bounced badge saying how many
        answered = page.locator(f'tr[data-message-id="{M_OPENED}"]')
        reply = answered.locator(".hit-reply")
        expect(reply).to_have_class(re.compile(r"\bis-hit\b"))
        reply.hover()
        expect(reply.locator(".tip")).to_be_visible()
        expect(reply.locator(".tip")).to_contain_text("Replied")
        expect(reply.locator(".tip")).to_contain_text("First")
        bounced = answered.locator('[data-badge="bounced"]')
        expect(bounced).to_be_visible()
        expect(bounced).to_have_text("Bounced · hard")
        expect(bounced).to_have_attribute("title", "1 of 2 recipients bounced (hard)")
        expect(page.locator(f'tr[data-message-id="{M_XSS}"] .hit-reply')).to_have_class(
            re.compile(r"\bis-none\b")
        )
        shot(page, "messages-answers")
        page.click("nav.segmented >> text=Bounced")
        expect(page).to_have_url(re.compile(r"state=bounced"))
        expect(page.locator("tbody tr")).to_have_count(1)
        page.click("nav.segmented >> text=Any")

        # open a message
        page.click("text=Quarterly numbers")
        expect(page.locator("h1")).to_have_text("Quarterly numbers")
        expect(page.locator(".rcpt", has_text="carol@client.example")).to_contain_text("550")
        shot(page, "message")

        # the message the relay tracked: the sender opens and clicks it from the
        # machine that sent it ("Sender"); carol clicks, a scanner follows the link
        message_id = two_of_us
        with session_scope(engine) as s:
            relayed = s.get(Message, message_id)
        assert relayed is not None
        now = datetime.now(UTC)
        write_events(
            engine,
            [
                event(relayed, "click", recipient=2, verdict="human", at=now, link=1),
                event(relayed, "click", recipient=2, verdict="scanner", at=now, link=1),
            ],
        )
        assert httpx.get(server.url + pixel_path.decode()).status_code == 200
        assert httpx.get(server.url + link_path.decode()).status_code in (302, 303)
        wait_for_events(engine, message_id, 4)
        page.goto(f"{server.url}/dashboard/messages/{message_id}")
        expect(page.locator("h1")).to_have_text("Two of us")
        decision = page.locator(".decision")
        expect(decision.locator("p.decision-line")).to_have_text(
            [
                "Opens and clicks tracked because the message asked for it (X-Track).",
                "One copy per recipient: 2 copies.",
                "1 link tracked, pixel added in the HTML part.",
                "Delivered: 2 of 2 accepted by the server.",
            ]
        )
        outcomes = decision.locator(".outcome")
        expect(outcomes).to_have_count(2)
        for row, address in zip(
            outcomes.all(), ("bob@client.example", "carol@client.example"), strict=True
        ):
            expect(row).to_contain_text(address)
            expect(row.locator(".badge")).to_have_text("Accepted")
            expect(row.locator(".outcome-reply")).to_have_text(re.compile(r"^250 \S"))
        link = page.locator(".links li", has_text="https://example.com/offer")
        expect(link.locator(".link-count")).to_have_text("1 click · 1 automatic · 1 by the sender")
        expect(page.locator(".rcpt", has_text="bob@client.example")).to_contain_text("Sender")
        technical = decision.locator("details.technical")
        expect(technical.locator(".facts")).to_be_hidden()
        for word in ("Policy", "Mode", "Sent by", '"part"', "automated"):
            assert word not in decision.inner_text(), word
        shot(page, "message-decision")
        technical.locator("summary").click()
        expect(technical.locator(".facts")).to_contain_text("header X-Track: opens, clicks")
        expect(technical.locator("table.technical-table")).to_contain_text("text/html")
        shot(page, "message-technical")

        page.click(".nav >> text=Overview")
        expect(page.locator("svg.chart")).to_be_visible()
        shot(page, "overview")

        # add a policy: first a mistake, then right
        page.click(".nav >> text=Policies")
        shot(page, "policies-empty")
        page.click("text=Add policy")
        page.fill("input[name=pattern]", "sales at example")
        page.click("form.form button[type=submit]")
        expect(page.locator(".field-error")).to_contain_text("is not an email address")
        shot(page, "policy-form-error")
        page.fill("input[name=pattern]", "@example.com")
        page.check("input[name=mode][value=always]")
        page.click("form.form button[type=submit]")
        expect(page.locator(".flash")).to_have_text("Policy for @example.com added.")
        expect(page.locator("table.policies")).to_contain_text("Always")
        shot(page, "policies")

        page.click(".nav >> text=Suppression")
        page.fill("input[name=address]", "zoe@example.com")
        page.click("text=Stop tracking")
        expect(page.locator("table")).to_contain_text("zoe@example.com")
        shot(page, "suppressions")
        page.click(".nav >> text=Users")
        shot(page, "users")
        page.click("text=Add user")
        shot(page, "user-form")

        # add a webhook endpoint: its signing secret is shown once, then it is listed
        page.click(".nav >> text=Webhooks")
        shot(page, "webhooks-empty")
        page.fill("input[name=url]", "https://crm.example/hooks/mail")
        page.uncheck("input[name='type:message.sent']")
        page.fill("input[name=description]", "CRM sync")
        page.click("form.form button[type=submit]")
        reveal = page.locator(".reveal")
        expect(reveal).to_contain_text("Endpoint added")
        expect(reveal.locator(".secret-value")).to_have_text(re.compile(r"^whsec_\S{20,}$"))
        expect(page.locator("table.webhooks")).to_contain_text("https://crm.example/hooks/mail")
        expect(page.locator("table.webhooks")).to_contain_text("message.opened")
        shot(page, "webhooks-created")
        page.click("table.webhooks >> text=Delivery log")
        expect(page.locator("h1")).to_have_text("https://crm.example/hooks/mail")
        shot(page, "webhook")

        # create an API token: shown once with a copy button, then only its prefix
        page.click(".nav >> text=API tokens")
        page.fill("input[name=name]", "CRM sync")
        page.click("form.form button[type=submit]")
        secret = page.locator("#new-token")
        expect(secret).to_have_text(re.compile(r"^trk_\S{40,}$"))
        api_token = secret.inner_text()
        page.click("button[data-copy='#new-token']")
        expect(page.locator("button[data-copy='#new-token']")).to_have_text("Copied")
        expect(page.locator("table.tokens")).to_contain_text(api_token[:12] + "…")
        shot(page, "tokens-created")
        page.goto(server.url + "/dashboard/tokens")  # seen again: only its prefix
        expect(page.locator("table.tokens")).to_contain_text("CRM sync")
        expect(page.locator("#new-token")).to_have_count(0)
        assert api_token not in page.content()
        shot(page, "tokens")

        # privacy: consent, and erasing a recipient asks first
        page.click(".nav >> text=Privacy")
        page.fill("input[name=address]", "ana@eu.example")
        page.click("text=Record consent")
        expect(page.locator("table.consents")).to_contain_text("ana@eu.example")
        shot(page, "consent")
        page.click("nav.segmented >> text=Erase a recipient")
        page.fill("input[name=address]", "bob@client.example")
        page.click("text=Continue")
        expect(page.locator("form.confirm h2")).to_contain_text("bob@client.example")
        shot(page, "erase-confirm")
        page.click("form.confirm button[type=submit]")
        expect(page.locator(".erase-report")).to_contain_text("recipients")
        shot(page, "erase-done")

        # sign out
        page.click("text=Sign out")
        expect(page).to_have_url(re.compile(r"/dashboard/login"))
        page.goto(server.url + "/dashboard/messages")
        expect(page).to_have_url(re.compile(r"/dashboard/login"))

        # phone width
        phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        phone.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        phone.goto(server.url + "/dashboard/login")
        shot(phone, "login")
        sign_in(phone, server.url)
        shot(phone, "messages")
        for path, name in [
            (f"/dashboard/messages/{M_OPENED}", "message"),
            (f"/dashboard/messages/{two_of_us}", "message-decision"),
            ("/dashboard/overview", "overview"),
            ("/dashboard/policies", "policies"),
            ("/dashboard/policies/new", "policy-form"),
            ("/dashboard/suppressions", "suppressions"),
            ("/dashboard/users", "users"),
            ("/dashboard/webhooks", "webhooks"),
            ("/dashboard/webhooks/1", "webhook"),
            ("/dashboard/tokens", "tokens"),
            ("/dashboard/privacy", "consent"),
            ("/dashboard/privacy/erase", "erase"),
        ]:
            phone.goto(server.url + path)
            shot(phone, name)
            overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{name} scrolls sideways at phone width by {overflow}px"
        # the shown-once token at phone width
        phone.goto(server.url + "/dashboard/tokens")
        phone.fill("input[name=name]", "Phone script")
        phone.click("form.form button[type=submit]")
        expect(phone.locator("#new-token")).to_be_visible()
        shot(phone, "tokens-created")
        overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the new token scrolls sideways at phone width by {overflow}px"
        browser.close()
    assert dialogs == []  # nothing from mail ever ran as script
