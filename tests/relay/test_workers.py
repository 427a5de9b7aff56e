"""`trackrelay relay` with TRACKRELAY_RELAY_WORKERS=2: worker processes on one set of ports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from tests.support.relaykit import SIMPLE, RelayProcess, children
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def test_two_workers_share_the_ports_and_stop_together(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    relay = RelayProcess(
        tmp_path,
        TRACKRELAY_RELAY_WORKERS="2",
        TRACKRELAY_UPSTREAM=upstream.url,
        TRACKRELAY_UPSTREAM_VERIFY_TLS="false",
        TRACKRELAY_TLS_CERT=str(upstream.cert),
        TRACKRELAY_TLS_KEY=str(upstream.key),
    )
    processes.append(relay)
    workers = children(relay.process.pid)
    assert len(workers) == 2

    async def one(i: int) -> None:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.smtps, use_tls=True, validate_certs=False
        ) as smtp:
            await smtp.ehlo()
            await smtp.auth_plain(USER, PASSWORD)
            await smtp.sendmail(USER, [f"rcpt{i}@example.net"], SIMPLE)

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(6)))

    asyncio.run(scenario())
    received = upstream.wait_for(6)
    assert sorted(m.rcpt_tos[0] for m in received) == [f"rcpt{i}@example.net" for i in range(6)]
    assert all(m.data == SIMPLE for m in received)
    assert relay.stop() == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
