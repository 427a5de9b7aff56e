"""Real mail clients through the relay, by the recipes in ../shared/clients/README.md.

Each client sends a message that asks for tracking. What the client submitted is
kept by a RecordingTracker (the real Tracker, remembering its input), what the
upstream received by the recording upstream; ``check_relayed`` then proves the
delivered copy is the submitted message minus its X-Track line, with only the
HTML hrefs and the pixel changed, and returns the tokens, verified.

* swaks and msmtp send tests/data/clients/message.eml as a file (quoted-
  printable windows-1251 HTML from Windows Live Mail);
* swaks, s-nail and mutt compose text + HTML + PDF from body.txt, body.html
  and report.pdf: swaks base64-encodes the HTML, s-nail quoted-prints it
  (with ``=3D`` and soft breaks inside URLs), mutt sends it as 8bit UTF-8.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from relay.server import RelayServer
from shared.tokens import Signer
from tests.support.injection_checks import Relayed, check_relayed
from tests.support.relaykit import (
    CLIENTS,
    MESSAGE,
    MakeSettings,
    RecordingTracker,
    relay_settings,
    running_relay,
    sqlite_engine,
)
from tests.support.upstream import PASSWORD, USER, RecordingUpstream

pytestmark = pytest.mark.clients
PUBLIC_URL = "https://t.example.net"
RCPT = "rcpt@example.net"
# body.html's links: the unsubscribe link and mailto are skipped, the rest tracked
BODY_URLS = ["https://example.com/report?id=42&utm_source=mail", "https://example.org/docs"]
S_NAIL = ["s-nail", "-:/", "-Sv15-compat", "-Sttycharset=utf-8", "-Smime-force-sendout"]
S_NAIL += ["-Ssendwait", "-Stls-verify=ignore"]


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def needs(binary: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(binary) is None, reason=f"{binary} is not installed")


async def run(*argv: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> str:
    """Run a client; its output is returned, a non-zero exit fails the test."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(process.communicate(stdin), 60)
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"{argv[0]} exited with {process.returncode}:\n{text}"
    return text


class Harness:
    """A relay with a RecordingTracker in front of the recording upstream."""

    def __init__(self, make_settings: MakeSettings, upstream: RecordingUpstream, tmp: Path):
        self.upstream = upstream
        self.settings = relay_settings(make_settings, upstream, public_url=PUBLIC_URL)
        self.engine = sqlite_engine(tmp)
        self.tracker = RecordingTracker(self.settings, self.engine)
        self.signer = Signer(self.settings.signing_keys())

    def run(self, scenario: Callable[[RelayServer], Awaitable[object]]) -> None:
        async def main() -> None:
            async with running_relay(self.settings, self.engine, self.tracker) as relay:
                await scenario(relay)

        asyncio.run(main())

    def delivered(self, count: int = 1) -> list[Relayed]:
        """Every delivered copy checked against what its client submitted."""
        messages = self.upstream.messages
        submitted = self.tracker.submitted
        assert (len(messages), len(submitted)) == (count, count)
        out = []
        for sent, got in zip(submitted, messages, strict=True):
            assert got.rcpt_tos == [RCPT]
            relayed = check_relayed(sent, got.data, PUBLIC_URL, self.signer)
            assert relayed.report.pixels == 1
            assert len(relayed.opens) == 1
            assert relayed.clicks
            assert relayed.recipients == {1}, "one recipient: its copy carries position 1"
            assert len(relayed.message_ids) == 1
            out.append(relayed)
        return out


@pytest.fixture
def harness(make_settings: MakeSettings, upstream: RecordingUpstream, tmp_path: Path) -> Harness:
    return Harness(make_settings, upstream, tmp_path)


def composed_parts(data: bytes) -> dict[str, bytes]:
    """Decoded leaf parts of a composed message by content type."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    out = {}
    for part in msg.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out[part.get_content_type()] = payload
    return out


def assert_composed(harness: Harness, relayed: Relayed) -> None:
    """The client's text and PDF arrive as given; the HTML's links are body.html's."""
    assert relayed.urls == BODY_URLS
    parts = composed_parts(harness.upstream.messages[0].data)
    assert parts["application/pdf"] == (CLIENTS / "report.pdf").read_bytes()
    if "text/plain" in parts:
        assert (
            crlf(parts["text/plain"]).strip() == crlf((CLIENTS / "body.txt").read_bytes()).strip()
        )


# --- files: message.eml as it is ------------------------------------------------


@needs("swaks")
@pytest.mark.parametrize(
    ("listener", "tls", "mechanism"),
    [("smtp", "--tls", "PLAIN"), ("smtps", "--tls-on-connect", "LOGIN")],
)
def test_swaks_file(listener: str, tls: str, mechanism: str, harness: Harness) -> None:
    async def scenario(relay: RelayServer) -> None:
        await run(
            "swaks", "--server", "127.0.0.1", "--port", str(relay.ports[listener]), tls,
            "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", USER, "--to", RCPT, "--data", f"@{MESSAGE}",
        )  # fmt: skip

    harness.run(scenario)
    # swaks adds one CRLF after the file (it does the same straight to a server)
    assert harness.tracker.submitted == [crlf(MESSAGE.read_bytes()) + b"\r\n"]
    [relayed] = harness.delivered()
    assert relayed.urls == ["http://intenices.co.ua/drugs-store/index.html"] * len(relayed.urls)
    assert harness.upstream.auth_attempts == [(mechanism, USER)]


@needs("msmtp")
def test_msmtp_starttls_plain_and_smtps_login(harness: Harness, tmp_path: Path) -> None:
    async def scenario(relay: RelayServer) -> None:
        rc = tmp_path / "msmtprc"
        rc.write_text(
            f"defaults\nfrom {USER}\nuser {USER}\npassword {PASSWORD}\n"
            f"account starttls\nhost 127.0.0.1\nport {relay.ports['smtp']}\ntls on\n"
            "tls_starttls on\ntls_certcheck off\nauth plain\n"
            f"account smtps : starttls\nport {relay.ports['smtps']}\ntls_starttls off\n"
            "auth login\naccount default : starttls\n"
        )
        rc.chmod(0o600)
        data = MESSAGE.read_bytes()
        await run("msmtp", "-C", str(rc), "-a", "starttls", RCPT, stdin=data)
        await run("msmtp", "-C", str(rc), "-a", "smtps", RCPT, stdin=data)

    harness.run(scenario)
    assert harness.tracker.submitted == [crlf(MESSAGE.read_bytes())] * 2
    first, second = harness.delivered(2)
    assert first.urls == second.urls
    assert first.message_ids != second.message_ids
    assert harness.upstream.auth_attempts == [("PLAIN", USER), ("LOGIN", USER)]


# --- composed: text + HTML + PDF --------------------------------------------------


@needs("swaks")
def test_swaks_composes_text_html_pdf(harness: Harness) -> None:
    async def scenario(relay: RelayServer) -> None:
        await run(
            "swaks", "--server", "127.0.0.1", "--port", str(relay.ports["smtp"]), "--tls",
            "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", USER, "--to", RCPT, "--header", "Subject: test",
            "--add-header", "X-Track: opens, clicks",
            "--attach-type", "text/plain", "--attach-body", f"@{CLIENTS / 'body.txt'}",
            "--attach-type", "text/html", "--attach-body", f"@{CLIENTS / 'body.html'}",
            "--attach-type", "application/pdf", "--attach", f"@{CLIENTS / 'report.pdf'}",
        )  # fmt: skip

    harness.run(scenario)
    [relayed] = harness.delivered()
    assert relayed.report.rewritten == ["text/html"]
    assert_composed(harness, relayed)


@needs("s-nail")
@pytest.mark.parametrize(
    ("scheme", "listener", "options"),
    [
        ("smtp", "smtp", ["-Ssmtp-use-starttls", "-Ssmtp-auth=plain"]),
        ("smtps", "smtps", ["-Ssmtp-auth=login"]),
    ],
)
def test_s_nail_quoted_printable_urls(
    scheme: str, listener: str, options: list[str], harness: Harness
) -> None:
    user = USER.replace("@", "%40")
    password = PASSWORD.replace(" ", "%20")

    async def scenario(relay: RelayServer) -> None:
        mta = f"mta={scheme}://{user}:{password}@127.0.0.1:{relay.ports[listener]}"
        await run(
            "env", "LC_ALL=C", *S_NAIL, "-S", mta, *options,
            "-S", f"from=Relay Test <{USER}>", "-C", "X-Track: opens, clicks", "-s", "subject",
            "-a", str(CLIENTS / "report.pdf"), "-M", "text/html", "-.", RCPT,
            stdin=(CLIENTS / "body.html").read_bytes(),
        )  # fmt: skip

    harness.run(scenario)
    [submitted] = harness.tracker.submitted
    assert b"=3D" in submitted
    assert b"Content-Transfer-Encoding: quoted-printable" in submitted
    [relayed] = harness.delivered()
    assert_composed(harness, relayed)


@needs("mutt")
def test_mutt_8bit_html(harness: Harness, tmp_path: Path) -> None:
    cert = harness.settings.tls_cert
    assert cert is not None

    async def scenario(relay: RelayServer) -> None:
        rc = tmp_path / "muttrc"
        rc.write_text(
            f'set from = "Relay Test <{USER}>"\nset use_from = yes\n'
            f'set smtp_url = "smtp://{USER.replace("@", "%40")}@127.0.0.1:{relay.ports["smtp"]}/"\n'
            f'set smtp_pass = "{PASSWORD}"\nset smtp_authenticators = "plain"\n'
            "set ssl_starttls = yes\nset ssl_force_tls = yes\n"
            f'set certificate_file = "{cert}"\nset ssl_verify_host = no\n'
            'set record = ""\nset copy = no\nset content_type = "text/html"\n'
            'set charset = "utf-8"\nset send_charset = "utf-8"\n'
            "my_hdr X-Track: opens, clicks\n"
        )
        env = {**os.environ, "HOME": str(tmp_path), "LC_ALL": "C.UTF-8", "TERM": "dumb"}
        await run(
            "mutt", "-n", "-F", str(rc), "-s", "subject", "-a", str(CLIENTS / "report.pdf"),
            "--", RCPT, stdin=(CLIENTS / "body.html").read_bytes(), env=env,
        )  # fmt: skip

    harness.run(scenario)
    [submitted] = harness.tracker.submitted
    assert b"Content-Transfer-Encoding: 8bit" in submitted
    [relayed] = harness.delivered()
    assert_composed(harness, relayed)
