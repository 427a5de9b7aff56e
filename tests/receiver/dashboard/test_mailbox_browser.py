"""Connecting a mailbox in headless Chromium, through the in-suite OAuth server's consent page.

Chromium is Debian's (/usr/bin/chromium) driven by Playwright with
``executable_path``, as in test_browser.py. The receiver listens on a socket
bound first, so its TRACKRELAY_PUBLIC_URL (where the provider sends the
browser back) is its real address. Screenshots go to
``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import Session, select

from receiver.app import create_app
from shared import db, mailbox
from shared.config import Settings
from shared.mailbox import MailboxBroken
from shared.models import MailboxConnection
from tests.receiver.dashboard.test_browser import ARGS, CHROMIUM, SHOTS
from tests.support.dashboardkit import PASSWORD, ServerThread, seed
from tests.support.oauth_server import OAuthServer, provider_settings

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the Debian chromium package"),
]
SAM = "sam@example.com"


def test_connect_a_mailbox_in_the_browser_and_see_it_break(
    tmp_path: Path, make_settings: Callable[..., Settings], oauth_server: OAuthServer
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url = f"sqlite:///{tmp_path / 'mailbox.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    seed(engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    public = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = make_settings(
        database_url=url, public_url=public, oauth=provider_settings(oauth_server)
    )
    SHOTS.mkdir(parents=True, exist_ok=True)

    with ServerThread(create_app(settings, engine), sock) as server, sync_playwright() as pw:
        assert server.url == public
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(public + "/dashboard/")
        page.fill("input[name=username]", "sam")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        expect(page.locator("h1")).to_have_text("Messages")

        page.click("nav.nav >> text=Mailbox")
        expect(page.locator("h1")).to_have_text("Mailbox")
        expect(page.locator("input[name=address]")).to_have_value(SAM)
        page.screenshot(path=str(SHOTS / "mailbox-empty-desktop.png"), full_page=True)

        page.click("button:has-text('Connect test')")  # off to the provider
        expect(page.locator("h1")).to_have_text("Allow access to your mailbox?")
        assert page.url.startswith(f"{oauth_server.url}/authorize?")
        page.fill("input[name=username]", SAM)
        page.click("button[value=allow]")

        expect(page).to_have_url(public + "/dashboard/mailbox")  # back, the code exchanged
        expect(page.locator(".flash")).to_contain_text(f"Connected {SAM} to test")
        row = page.locator(f'tr[data-connection="{SAM}"]')
        expect(row.locator("[data-state]")).to_have_text("ok")
        page.screenshot(path=str(SHOTS / "mailbox-connected-desktop.png"), full_page=True)

        # the person revokes the app at the provider; the relay's next refresh finds out
        with Session(engine) as session:
            connection = session.exec(select(MailboxConnection)).one()
        assert connection.id is not None
        oauth_server.revoke_user(SAM)
        mailbox.token_refused(engine, connection.id)
        with pytest.raises(MailboxBroken):
            mailbox.access_token(engine, settings, connection.id)

        page.goto(public + "/dashboard/messages")
        banner = page.locator("[data-broken-mailbox]")
        expect(banner).to_have_text(
            f"Your mailbox connection for {SAM} stopped working: reconnect it on the Mailbox page."
        )
        page.screenshot(path=str(SHOTS / "mailbox-broken-banner-desktop.png"), full_page=True)
        banner.locator("a").click()
        expect(page).to_have_url(re.compile(r"/dashboard/mailbox$"))
        expect(row.locator("[data-state]")).to_have_text("broken")
        expect(row).to_contain_text("invalid_grant")
        page.screenshot(path=str(SHOTS / "mailbox-broken-desktop.png"), full_page=True)
        browser.close()
