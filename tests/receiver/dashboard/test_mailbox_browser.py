"""Connecting a mailbox in headless Chromium, through the in-suite OAuth server's consent page.

Chromium is Debian's (/usr/bin/chromium) driven by Playwright with
``executable_path``, as in test_browser.py. The receiver listens on a socket
bound first, so its TRACKRELAY_PUBLIC_URL (where the provider sends the
browser back) is its real address. The relay (local mode, tests/support/
relaykit.py) then sends through the connection to the provider's submission
server (the recording upstream, XOAUTH2 only, tokens checked by introspection)
and, once the grant is revoked, is the one that finds out and marks the
connection broken. Screenshots go to ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from receiver.app import create_app
from shared import db, mailbox
from shared.config import Settings
from shared.models import MailboxConnection
from tests.receiver.dashboard.test_browser import ARGS, CHROMIUM, SHOTS
from tests.support.dashboardkit import PASSWORD, connect_mailbox, seed, sign_in
from tests.support.oauth_server import OAuthServer, provider_settings
from tests.support.receiverkit import ServerThread
from tests.support.relaykit import relay_settings, running_relay, send
from tests.support.upstream import PASSWORD as UPSTREAM_PASSWORD
from tests.support.upstream import USER, RecordingUpstream

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the Debian chromium package"),
]
SAM = "sam@example.com"
MESSAGE = b"From: sam@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def provider(tls_pair: tuple[Path, Path], oauth_server: OAuthServer) -> Iterator[RecordingUpstream]:
    """The provider's submission server: XOAUTH2 with a live token only."""
    server = RecordingUpstream(*tls_pair, oauth=oauth_server).start()
    yield server
    server.stop()


def sam_sends(settings: Settings, engine: object, times: int) -> list[int]:
    """Sam's mail program sends through the relay ``times`` times (one relay run); the
    reply codes."""

    async def go() -> list[int]:
        codes = []
        async with running_relay(settings, engine) as relay:  # type: ignore[arg-type]
            for _ in range(times):
                try:
                    reply = await send(relay, MESSAGE, sender=SAM, user="sam", password=PASSWORD)
                    codes.append(reply.code)
                except aiosmtplib.SMTPSenderRefused as refused:
                    codes.append(refused.code)
        return codes

    # in a thread of its own: Playwright's sync API keeps an event loop in this one
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(go())).result(60)


def local_site(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    providers: dict[str, Any],
) -> tuple[Engine, socket.socket, str, Settings]:
    """A seeded SQLite database, the receiver's socket bound first and its public URL,
    and one config for the receiver and the relay: local mode (where connections are
    used) with the ``oauth`` PROVIDERS; the screenshots' folder made."""
    url = f"sqlite:///{tmp_path / 'mailbox.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    seed(engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    public = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = relay_settings(
        make_settings,
        upstream,
        auth_mode="local",
        upstream_user=USER,
        upstream_password=UPSTREAM_PASSWORD,
        database_url=url,
        public_url=public,
        oauth=providers,
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    return engine, sock, public, settings


def test_connect_a_mailbox_in_the_browser_and_see_it_break(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    oauth_server: OAuthServer,
    upstream: RecordingUpstream,
    provider: RecordingUpstream,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    providers = provider_settings(oauth_server, provider.url)
    engine, sock, public, settings = local_site(tmp_path, make_settings, upstream, providers)

    with ServerThread(create_app(settings, engine), sock) as server, sync_playwright() as pw:
        assert server.url == public
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        sign_in(page, public, "sam")

        page.click("nav.nav >> text=Mailbox")
        expect(page.locator("h1")).to_have_text("Mailbox")
        expect(page.locator("input[name=address]")).to_have_value(SAM)
        page.screenshot(path=str(SHOTS / "mailbox-empty-desktop.png"), full_page=True)

        row = connect_mailbox(page, public, oauth_server.url, SAM)
        expect(page.locator(".flash")).to_have_text(
            f"Connected {SAM} to test: its mail now goes out through that mailbox."
        )
        expect(page.locator("[data-unused]")).to_have_count(0)  # local mode: used
        page.screenshot(path=str(SHOTS / "mailbox-connected-desktop.png"), full_page=True)

        # sam's mail goes out through the mailbox: one XOAUTH2 login with the granted token
        assert sam_sends(settings, engine, 1) == [250]
        assert provider.auth_attempts == [("XOAUTH2", SAM)]
        assert upstream.messages == []
        # sam revokes the app at the provider; the relay's next sends find out (454 each:
        # the token refused at AUTH, then the refresh refused: broken)
        oauth_server.revoke_user(SAM)
        assert sam_sends(settings, engine, 2) == [454, 454]
        with Session(engine) as session:
            assert session.exec(select(MailboxConnection.state)).one() == "broken"

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

        # Disconnect while the provider's revocation endpoint is away: kept, and that
        # row alone offers "Forget without revoking" (each asks first: accepted here)
        oauth_server.revoke_down = True
        page.on("dialog", lambda dialog: dialog.accept())
        row.locator("button:has-text('Disconnect')").click()
        expect(page.locator(".flash-error[role=status]")).to_contain_text("kept, try again")
        forget = row.locator("button:has-text('Forget without revoking')")
        expect(forget).to_be_visible()
        page.screenshot(path=str(SHOTS / "mailbox-not-revoked-desktop.png"), full_page=True)
        forget.click()
        expect(page.locator(".flash[role=status]")).to_contain_text("forgotten without revoking")
        expect(row).to_have_count(0)
        browser.close()


def test_connect_with_an_app_password_in_the_browser_and_see_it_break(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    upstream: RecordingUpstream,
    tls_pair: tuple[Path, Path],
) -> None:
    from playwright.sync_api import expect, sync_playwright

    fast = RecordingUpstream(*tls_pair).start()  # app passwords only: PLAIN for USER/PASSWORD
    providers = {"fast": {"app_passwords": True, "smtp": fast.url}}
    engine, sock, public, settings = local_site(tmp_path, make_settings, upstream, providers)

    try:
        with ServerThread(create_app(settings, engine), sock), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            sign_in(page, public, "sam")
            page.goto(public + "/dashboard/mailbox")
            form = page.locator("form[data-form=app-password]")
            expect(form.locator("input[name=address]")).to_have_value(SAM)
            form.locator("input[name=login]").fill(USER)
            form.locator("input[name=password]").fill("not the app password")
            form.locator("button[type=submit]").click()
            expect(form.locator("#password-error")).to_contain_text("refused the app password")
            expect(form.locator("input[name=password]")).to_have_value("")  # never echoed
            page.screenshot(path=str(SHOTS / "mailbox-app-password-refused.png"), full_page=True)

            form.locator("input[name=password]").fill(UPSTREAM_PASSWORD)
            form.locator("button[type=submit]").click()
            expect(page.locator(".flash")).to_contain_text(f"Connected {SAM} to fast")
            row = page.locator(f'tr[data-connection="{SAM}"]')
            expect(row.locator("[data-state]")).to_have_text("ok")
            expect(row).to_contain_text("app password")
            page.screenshot(path=str(SHOTS / "mailbox-app-password-desktop.png"), full_page=True)

            assert sam_sends(settings, engine, 1) == [250]
            assert [m.mail_from for m in fast.messages] == [SAM]
            assert upstream.messages == []
            with Session(engine) as session:  # the app password is revoked in the account
                connection = session.exec(select(MailboxConnection)).one()
                connection.grant = mailbox.seal(settings, SAM, {"password": "revoked"})
                session.add(connection)
                session.commit()
            assert sam_sends(settings, engine, 2) == [454, 454]

            page.goto(public + "/dashboard/messages")
            expect(page.locator("[data-broken-mailbox]")).to_contain_text(
                f"Your mailbox connection for {SAM} stopped working"
            )
            page.goto(public + "/dashboard/mailbox")
            expect(row.locator("[data-state]")).to_have_text("broken")
            expect(row).to_contain_text("refused the app password")
            browser.close()
    finally:
        fast.stop()
        engine.dispose()
