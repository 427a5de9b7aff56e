"""`trackrelay relay` with TRACKRELAY_RELAY_WORKERS=2: worker processes on one set of ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiosmtplib

from relay.limits import TOO_MANY_FROM_IP, TOO_MANY_SESSIONS
from tests.support.relaykit import SIMPLE, RawClient, RelayProcess, children
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


def _worker_of(raw: RawClient, port: int, workers: list[int]) -> int:
    """Which worker process holds the relay's end of ``raw`` (from /proc)."""
    mine = raw.writer.get_extra_info("sockname")[1]
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == mine:
            inode = fields[9]
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    raise AssertionError(f"no worker holds the connection from port {mine}")


def test_the_session_limits_hold_for_all_workers_together(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    """Three workers, TRACKRELAY_MAX_SESSIONS=4 and _PER_IP=2. Sessions are held on
    two different workers (a connection that lands on a worker already holding one
    is closed and made again), so each worker holds fewer than the limits: the next
    connection is refused all the same (a worker counting alone would admit it),
    and a freed slot is usable again."""
    relay = RelayProcess(
        tmp_path,
        TRACKRELAY_RELAY_WORKERS="3",
        TRACKRELAY_MAX_SESSIONS="4",
        TRACKRELAY_MAX_SESSIONS_PER_IP="2",
        TRACKRELAY_UPSTREAM=upstream.url,
        TRACKRELAY_UPSTREAM_VERIFY_TLS="false",
        TRACKRELAY_TLS_CERT=str(upstream.cert),
        TRACKRELAY_TLS_KEY=str(upstream.key),
    )
    processes.append(relay)
    workers = children(relay.process.pid)
    assert len(workers) == 3

    async def scenario() -> dict[str, object]:
        async with contextlib.AsyncExitStack() as stack:

            async def held_on_another(ip: str, taken: set[int]) -> RawClient:
                """A session from ``ip`` held by a worker not in ``taken``."""
                for _ in range(200):  # the kernel picks the worker: try again
                    raw = await RawClient.connect(relay.smtp, local_addr=(ip, 0))
                    assert raw.greeting[:3] == "220", raw.greeting
                    worker = _worker_of(raw, relay.smtp, workers)
                    if worker not in taken:
                        taken.add(worker)
                        return await stack.enter_async_context(raw)
                    await raw.close()
                    await asyncio.sleep(0.05)  # its slot is released
                raise AssertionError("every connection went to the same worker")

            async def greeting(ip: str) -> str:
                raw = await stack.enter_async_context(
                    await RawClient.connect(relay.smtp, local_addr=(ip, 0))
                )
                return raw.greeting

            taken: set[int] = set()
            await held_on_another("127.0.0.1", taken)
            await held_on_another("127.0.0.1", taken)  # 1 + 1 on two workers
            over_ip = [await greeting("127.0.0.1") for _ in range(4)]
            await held_on_another("127.0.0.2", taken)  # 3 sessions on three workers
            fourth = await greeting("127.0.0.3")
            over_all = [await greeting(f"127.0.0.{i}") for i in range(4, 10)]
            await stack.aclose()  # all closed: every slot free again
        await asyncio.sleep(0.5)  # the workers' connection_lost have run
        async with await RawClient.connect(relay.smtp) as again:
            return {
                "over_ip": set(over_ip),
                "fourth": fourth[:3],
                "over_all": set(over_all),
                "again": again.greeting[:3],
            }

    got = asyncio.run(scenario())
    assert got == {
        "over_ip": {TOO_MANY_FROM_IP + "\r\n"},
        "fourth": "220",
        "over_all": {TOO_MANY_SESSIONS + "\r\n"},
        "again": "220",
    }
    assert relay.stop() == 0


def test_a_killed_workers_sessions_are_freed_for_the_others(
    tmp_path: Path, upstream: RecordingUpstream, processes: list[RelayProcess]
) -> None:
    """TRACKRELAY_MAX_SESSIONS_PER_IP=2 held, then the workers holding them are
    SIGKILLed (no connection_lost runs there): once the parent has reaped them, the
    address is admitted twice again by the worker left."""
    log = tmp_path / "relay.log"
    relay = RelayProcess(
        tmp_path,
        log=log,
        TRACKRELAY_RELAY_WORKERS="3",
        TRACKRELAY_MAX_SESSIONS_PER_IP="2",
        TRACKRELAY_UPSTREAM=upstream.url,
        TRACKRELAY_UPSTREAM_VERIFY_TLS="false",
        TRACKRELAY_TLS_CERT=str(upstream.cert),
        TRACKRELAY_TLS_KEY=str(upstream.key),
    )
    processes.append(relay)
    workers = children(relay.process.pid)

    async def scenario() -> tuple[str, list[str]]:
        async with contextlib.AsyncExitStack() as stack:

            async def greeting() -> str:
                raw = await RawClient.connect(relay.smtp, local_addr=("127.0.0.1", 0))
                held.append(await stack.enter_async_context(raw))
                return raw.greeting

            held: list[RawClient] = []
            assert [(await greeting())[:3] for _ in range(2)] == ["220", "220"]
            over = await greeting()
            killed = {_worker_of(raw, relay.smtp, workers) for raw in held[:2]}
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            for raw in held[:2]:  # their connections ended with them
                await asyncio.wait_for(raw.reader.read(), 10)
            # the parent's line once it has reaped one and freed its sessions
            while log.read_text().count(" ended with -9; ") < len(killed):
                await asyncio.sleep(0.05)
            return over, [(await greeting())[:3] for _ in range(2)]

    over, again = asyncio.run(scenario())
    assert over == TOO_MANY_FROM_IP + "\r\n"
    assert again == ["220", "220"]
    relay.stop()
