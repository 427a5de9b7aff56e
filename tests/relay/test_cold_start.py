"""``trackrelay relay`` started while its database is down: it relays, and records arrive later.

A database restarting at the same moment as the relay (a host reboot, a
failover) must not stop mail: the relay starts, says so once on stderr,
journals its records and stores them when the database answers. The outage is
real (receiver_support.Outage: PostgreSQL behind a stopped TCP proxy, SQLite
held by an exclusive transaction).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiosmtplib
from sqlalchemy import Engine, text

from tests.support.receiverkit import Outage, wait_for
from tests.support.relaykit import SIMPLE, RelayProcess
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def _messages(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM messages")).scalar_one())


async def _send(port: int, n: int) -> list[int]:
    codes = []
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        for i in range(n):
            message = SIMPLE + b"number %d\r\n" % i
            _, reply = await smtp.sendmail("app@example.com", ["bob@example.net"], message)
            codes.append(int(reply.split(" ", 1)[0].split(".")[0]))
    return codes


def test_relay_starts_and_relays_while_its_database_is_down(
    tmp_path: Path, upstream: RecordingUpstream, engine: Engine, outage: Outage
) -> None:
    outage.down()
    log = tmp_path / "relay.log"
    relay = RelayProcess(
        tmp_path,
        log=log,
        TRACKRELAY_DATABASE_URL=outage.app_url,
        TRACKRELAY_UPSTREAM=upstream.url,
        TRACKRELAY_UPSTREAM_VERIFY_TLS="false",
        TRACKRELAY_UPSTREAM_USER=USER,
        TRACKRELAY_UPSTREAM_PASSWORD=PASSWORD,
        TRACKRELAY_TLS_CERT=str(upstream.cert),
        TRACKRELAY_TLS_KEY=str(upstream.key),
        TRACKRELAY_AUTH_MODE="none",
        TRACKRELAY_TRUSTED_NETWORKS="127.0.0.1/32",
        TRACKRELAY_PLAIN_PORT="0",
    )
    try:
        assert asyncio.run(_send(relay.plain, 3)) == [2, 2, 2]  # 2.0.0 Ok: queued
        assert len(upstream.messages) == 3
        assert _messages(engine) == 0
        outage.up()
        wait_for(lambda: _messages(engine) == 3, 30)
    finally:
        code = relay.stop(signal.SIGTERM)
    assert code == 0
    said = log.read_text()
    assert "Traceback" not in said
    if not outage.sqlite:  # a locked SQLite file in WAL mode still reads: the schema check passes
        assert "TRACKRELAY_DATABASE_URL: cannot open the database" in said
        assert "starting anyway, records are journaled until it is reachable" in said
