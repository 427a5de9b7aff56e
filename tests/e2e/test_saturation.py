"""Issue 17.1: one client cannot take the process down. ``trackrelay serve`` held to
the common open-file limit of 1024 (not raised), 1,100 idle SMTP connections: the
sessions past TRACKRELAY_MAX_SESSIONS are greeted 421 4.7.0 and closed, and the
receiver in the same process keeps answering /healthz."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import httpx

from tests.support.relaykit import RelayProcess

CONNECTIONS = 1100
ADDRESSES = 22  # 50 each, the default TRACKRELAY_MAX_SESSIONS_PER_IP: only the total binds


async def _flood(port: int) -> tuple[list[str], list[asyncio.StreamWriter]]:
    """Open CONNECTIONS idle connections, from ADDRESSES loopback addresses; each
    one's first line (the greeting) and the writers, to hold them open."""
    writers: list[asyncio.StreamWriter] = []
    greetings: list[str] = []
    for n in range(CONNECTIONS):
        ip = f"127.0.1.{n % ADDRESSES + 1}"
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
            writers.append(writer)
            line = await asyncio.wait_for(reader.readline(), 10)
            greetings.append(line.decode())
        except (OSError, TimeoutError) as exc:
            greetings.append(f"failed: {exc!r}")
    return greetings, writers


def test_http_answers_while_smtp_is_saturated(
    tmp_path: Path, processes: list[RelayProcess]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CONNECTIONS + 200:  # this test process holds the client ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    relay = RelayProcess(tmp_path, "serve", log=tmp_path / "serve.log", TRACKRELAY_HTTP_PORT="0")
    processes.append(relay)
    # As under a service manager that sets 1024 and no more (not raised at start).
    resource.prlimit(relay.process.pid, resource.RLIMIT_NOFILE, (1024, 1024))

    async def scenario() -> tuple[list[str], int, int]:
        greetings, writers = await _flood(relay.smtp)
        files = len(list(Path(f"/proc/{relay.process.pid}/fd").iterdir()))
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                health = await http.get(f"{relay.http}/healthz")
        finally:
            for writer in writers:
                writer.transport.abort()
        return greetings, health.status_code, files

    greetings, status, files = asyncio.run(scenario())
    codes = [g[:9] for g in greetings]
    assert codes.count("220 127.0") == 300, sorted(set(codes))
    assert codes.count("421 4.7.0") == CONNECTIONS - 300, sorted(set(codes))
    assert status == 200
    assert files < 1024 - 300, files  # room left for the sessions' upstream connections
    assert relay.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert "refused 127.0.1." in log
    assert "TRACKRELAY_MAX_SESSIONS=300 sessions reached" in log
    assert "Traceback" not in log
