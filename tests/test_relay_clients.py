"""Real mail clients (swaks, msmtp) through the relay, by the recipes in shared/clients."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from relaykit import MESSAGE, relay_settings, running_relay, sqlite_engine
from sqlalchemy import Engine
from upstream import PASSWORD, USER, RecordingUpstream

from relay.server import RelayServer
from shared.config import Settings

pytestmark = pytest.mark.clients
MakeSettings = Callable[..., Settings]


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest.mark.parametrize(
    ("listener", "tls", "mechanism"),
    [("smtp", "--tls", "PLAIN"), ("smtps", "--tls-on-connect", "LOGIN")],
)
def test_swaks(
    listener: str,
    tls: str,
    mechanism: str,
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    tmp_path: Path,
) -> None:
    async def scenario(relay: RelayServer) -> tuple[int, str]:
        return await run(
            "swaks", "--server", "127.0.0.1", "--port", str(relay.ports[listener]), tls,
            "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", USER, "--to", "rcpt@example.net", "--data", f"@{MESSAGE}",
        )  # fmt: skip

    code, out = _with_relay(make_settings, upstream, sqlite_engine(tmp_path), scenario)
    assert code == 0, out
    [got] = upstream.messages
    # swaks adds one CRLF after the file (it does the same straight to a server)
    assert got.data == crlf(MESSAGE.read_bytes()) + b"\r\n"
    assert upstream.auth_attempts == [(mechanism, USER)]


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed")
def test_msmtp_starttls_plain_and_smtps_login(
    make_settings: MakeSettings, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    async def scenario(relay: RelayServer) -> list[tuple[int, str]]:
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
        return [
            await run("msmtp", "-C", str(rc), "-a", "starttls", "rcpt@example.net", stdin=data),
            await run("msmtp", "-C", str(rc), "-a", "smtps", "rcpt@example.net", stdin=data),
        ]

    results = _with_relay(make_settings, upstream, sqlite_engine(tmp_path), scenario)
    assert [code for code, _ in results] == [0, 0], results
    assert [m.data for m in upstream.messages] == [crlf(MESSAGE.read_bytes())] * 2
    assert upstream.auth_attempts == [("PLAIN", USER), ("LOGIN", USER)]


def _with_relay(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    engine: Engine,
    scenario: Callable[[RelayServer], object],
) -> object:
    async def main() -> object:
        async with running_relay(relay_settings(make_settings, upstream), engine) as relay:
            return await scenario(relay)  # type: ignore[misc]

    return asyncio.run(main())
