"""The issue "Mailbox connections", done when: a person with a (simulated) Microsoft 365
or Google mailbox connects it in the dashboard, sends a tracked message to three
recipients from a mail client through the relay, and finds one untracked copy in
Sent and, later, the replies and bounces on the message page.

Real pieces only: ``trackrelay serve`` in its own process (local auth mode, on
SQLite and PostgreSQL); ann signs in to its dashboard in Debian's Chromium and
connects on the Mailbox page through the in-suite OAuth server's consent page
(authorization code + PKCE, the redirect landing on the serve process); msmtp
sends the message by the recipe in ../shared/clients/README.md; the provider's
submission server is the recording upstream (XOAUTH2 only) filing what it takes
into the real Dovecot's Sent as Microsoft 365 does (every copy) or Gmail does
(the first per Message-ID); its IMAP server is that Dovecot. The reply and the
bounce are then filed in ann's INBOX, and the message page shows them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_serve import ServeProcess, wait_for
from tests.receiver.dashboard.test_browser import ARGS, CHROMIUM, SHOTS
from tests.support.dashboardkit import connect_mailbox, sign_in
from tests.support.dovecot import ANN, SENT, Dovecot
from tests.support.imapkit import (
    BOUNCE,
    MESSAGE,
    PASSWORD,
    RECIPIENTS,
    REPLY,
    AnnsMailbox,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.clients,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs the Debian chromium package"),
    pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed"),
]
BOB, CAROL, DAVE = RECIPIENTS


def _msmtp(tmp_path: Path, port: int) -> None:
    """ann's mail program sends MESSAGE to the three recipients (STARTTLS, AUTH PLAIN)."""
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"defaults\nfrom {ANN}\nuser ann\npassword {PASSWORD}\n"
        f"account default\nhost 127.0.0.1\nport {port}\ntls on\n"
        "tls_starttls on\ntls_certcheck off\nauth plain\n"
    )
    rc.chmod(0o600)
    done = subprocess.run(
        ["msmtp", "-C", str(rc), *RECIPIENTS],
        input=MESSAGE,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("files", ["every", "first"], ids=["microsoft365", "gmail"])
def test_connect_send_one_clean_copy_then_the_answers_on_the_message_page(
    files: str, tmp_path: Path, database_url: str, anns_mailbox: AnnsMailbox, dovecot: Dovecot
) -> None:
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with (
        anns_mailbox.provider(files) as provider,
        ServeProcess(tmp_path, database_url) as process,
    ):
        process.env.update(anns_mailbox.serve_env(provider))
        process.cli("user", "add", "ann", "--password-stdin", "--address", ANN, stdin=PASSWORD)
        process.start()
        public = process.public_url
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            sign_in(page, public, "ann", PASSWORD)

            # connect: off to the provider's consent page and back to the serve process
            page.click("nav.nav >> text=Mailbox")
            expect(page.locator("input[name=address]")).to_have_value(ANN)
            row = connect_mailbox(page, public, anns_mailbox.oauth_server.url, ANN)
            expect(row.locator("select[name=sent]")).to_have_value("clean")

            # send from the mail program: the copies leave through ann's mailbox
            _msmtp(tmp_path, process.smtp_port)
            assert len(provider.wait_for(3)) == 3, process.stderr
            assert sorted(r for m in provider.messages for r in m.rcpt_tos) == sorted(RECIPIENTS)
            assert set(provider.auth_attempts) == {("XOAUTH2", ANN)}
            assert anns_mailbox.upstream.messages == []

            # Sent: exactly one copy, the bytes msmtp sent (no pixel, the links, everyone)
            def one_clean_copy() -> bool:
                sent = dovecot.messages(SENT)
                return len(sent) == 1 and sent[0][0] == MESSAGE

            assert wait_for(one_clean_copy, 20), (dovecot.messages(SENT), process.stderr)
            [(_, flags)] = dovecot.messages(SENT)
            assert b"\\Seen" in flags
            # the provider had filed 3 tracked copies (Microsoft 365) or 1 (Gmail), each
            # taking a UID, then the original took the next
            with dovecot.client() as imap:
                uidnext = imap.folder_status(SENT, [b"UIDNEXT"])[b"UIDNEXT"]
            assert uidnext == {"every": 3, "first": 1}[files] + 2

            # bob replies, carol's copy bounces: filed in ann's INBOX
            dovecot.append("INBOX", REPLY)
            dovecot.append("INBOX", BOUNCE)
            page.click("nav.nav >> text=Messages")
            page.click("text=the plan")
            expect(page.locator("h1")).to_have_text("the plan")
            answers = page.locator(".rcpt .tl-reply, .rcpt .tl-bounce")

            def answered() -> bool:
                page.reload()
                return answers.count() == 2

            assert wait_for(answered, 20), process.stderr
            bob = page.locator(".rcpt", has=page.get_by_role("heading", name=BOB))
            carol = page.locator(".rcpt", has=page.get_by_role("heading", name=CAROL))
            dave = page.locator(".rcpt", has=page.get_by_role("heading", name=DAVE))
            expect(bob.locator(".tl-reply")).to_contain_text("Replied")
            expect(bob.locator(".tl-bounce")).to_have_count(0)
            expect(carol.locator(".tl-bounce")).to_contain_text("Bounced (hard)")
            expect(carol.locator(".tl-bounce")).to_contain_text("5.1.1")
            expect(carol.locator(".tl-reply")).to_have_count(0)
            expect(dave.locator(".tl-reply, .tl-bounce")).to_have_count(0)
            page.screenshot(path=str(SHOTS / f"mailbox-done-{files}-desktop.png"), full_page=True)
            browser.close()

        inbox = dovecot.messages("INBOX")
        assert len(inbox) == 2
        assert all(b"\\Seen" not in flags for _, flags in inbox)
        assert process.stop() == 0, process.stderr
