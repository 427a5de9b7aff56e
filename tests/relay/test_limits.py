"""Session limits and the greeting timeout (relay/limits.py, relay/smtp.py), over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import random
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
from sqlalchemy import Engine

from relay.limits import SessionLimits, SharedCounts
from tests.support.relaykit import MakeSettings, RawClient, relay_settings, running_relay
from tests.support.upstream import RecordingUpstream


async def _open(port: int, ip: str) -> RawClient:
    return await RawClient.connect(port, local_addr=(ip, 0))


async def _closed(raw: RawClient) -> bool:
    """True when the server closed the connection (EOF) within 10 s."""
    try:
        return await asyncio.wait_for(raw.reader.read(), 10) == b""
    except TimeoutError:
        return False


def test_sessions_past_the_limits_are_greeted_421_and_others_still_served(
    make_settings: MakeSettings,
    upstream: RecordingUpstream,
    db_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Idle connections past TRACKRELAY_MAX_SESSIONS_PER_IP, then past
    TRACKRELAY_MAX_SESSIONS: a 421 4.7.0 greeting, a close and a WARNING naming the
    peer; another address is still served, and a freed slot is usable again."""
    settings = relay_settings(make_settings, upstream, max_sessions=5, max_sessions_per_ip=3)

    async def scenario() -> dict[str, object]:
        async with (
            contextlib.AsyncExitStack() as stack,
            running_relay(settings, db_engine) as relay,
        ):
            port = relay.ports["smtp"]
            held = [
                await stack.enter_async_context(await _open(port, "127.0.0.1")) for _ in range(3)
            ]
            over_ip = await stack.enter_async_context(await _open(port, "127.0.0.1"))
            other = await stack.enter_async_context(await _open(port, "127.0.0.2"))
            ehlo = await other.command(b"EHLO other.test")
            held.append(await stack.enter_async_context(await _open(port, "127.0.0.3")))
            over_all = await stack.enter_async_context(await _open(port, "127.0.0.4"))
            closed = [await _closed(over_ip), await _closed(over_all)]
            await held[0].close()
            await asyncio.sleep(0.1)  # its connection_lost has run
            again = await stack.enter_async_context(await _open(port, "127.0.0.1"))
            return {
                "held": [raw.greeting[:3] for raw in held],
                "over_ip": over_ip.greeting,
                "over_all": over_all.greeting,
                "other": (other.greeting[:3], ehlo[:3]),
                "closed": closed,
                "again": (again.greeting[:3], (await again.command(b"NOOP"))[:3]),
                "active": relay.limits.active,
            }

    with caplog.at_level(logging.WARNING, logger="relay.limits"):
        got = asyncio.run(scenario())
    assert got["held"] == ["220"] * 4
    assert got["over_ip"] == "421 4.7.0 Too many connections from your address, try again later\r\n"
    assert got["over_all"] == "421 4.7.0 Too many connections, try again later\r\n"
    assert got["other"] == ("220", "250")
    assert got["closed"] == [True, True]
    assert got["again"] == ("220", "250")
    assert got["active"] == 5
    lines = [r.getMessage() for r in caplog.records]
    assert any("127.0.0.1" in line and "TRACKRELAY_MAX_SESSIONS_PER_IP=3" in line for line in lines)
    assert any("127.0.0.4" in line and "TRACKRELAY_MAX_SESSIONS=5" in line for line in lines)


@pytest.mark.parametrize("listener", ["smtp", "smtps"])
def test_the_first_command_must_come_within_the_greeting_timeout(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine, listener: str
) -> None:
    """A connection that says nothing (not even its TLS handshake on the implicit-TLS
    port) is closed after TRACKRELAY_GREETING_TIMEOUT; one that spoke has the longer
    idle timeout, and its slot is free again after the silent one left."""
    settings = relay_settings(
        make_settings,
        upstream,
        greeting_timeout=0.3,
        idle_timeout=30,
        max_sessions=1,
    )

    async def scenario() -> tuple[bytes, str, str]:
        async with running_relay(settings, db_engine) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.ports[listener])
            try:
                said = await asyncio.wait_for(reader.read(), 10)  # until the relay closes
            finally:
                writer.close()
            async with await RawClient.connect(relay.ports["smtp"]) as raw:
                await raw.command(b"EHLO client.test")
                await asyncio.sleep(0.6)  # longer than the greeting timeout
                return said, raw.greeting[:3], (await raw.command(b"NOOP"))[:3]

    said, greeting, noop = asyncio.run(scenario())
    assert (greeting, noop) == ("220", "250")
    if listener == "smtp":  # greeted, then told why it is closed
        assert said.startswith(b"220 "), said
        assert said.endswith(b" Timeout, closing transmission channel\r\n"), said
    else:  # no TLS handshake, so nothing can be said: closed
        assert said == b""


def test_limits_count_and_release_per_address() -> None:
    limits = SessionLimits(total=3, per_ip=2, clock=lambda: 0.0)
    assert [limits.admit("a", "smtp"), limits.admit("a", "smtp")] == [None, None]
    assert limits.admit("a", "smtp") is not None
    assert limits.admit("b", "smtp") is None
    assert limits.admit("c", "smtp") is not None
    limits.release("a")
    assert limits.admit("c", "smtp") is None
    assert limits.active == 3


def test_an_ipv6_client_counts_by_its_64() -> None:
    limits = SessionLimits(total=10, per_ip=2, clock=lambda: 0.0)
    assert limits.admit("2001:db8:1:2::1", "smtp") is None
    assert limits.admit("2001:db8:1:2:ffff::9", "smtp") is None
    assert limits.admit("2001:db8:1:2::abcd", "smtp") is not None
    assert limits.admit("2001:db8:1:3::1", "smtp") is None  # another /64
    assert limits.admit("::ffff:192.0.2.1", "smtp") is None
    assert limits.admit("192.0.2.1", "smtp") is None
    assert limits.admit("192.0.2.1", "smtp") is not None  # the mapped one counted too
    limits.release("2001:db8:1:2::1")
    assert limits.admit("2001:db8:1:2::77", "smtp") is None


def test_refusals_are_logged_once_a_minute_per_address(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limits = SessionLimits(total=5, per_ip=1, clock=lambda: now[0])
    limits.admit("192.0.2.1", "smtp")
    with caplog.at_level(logging.WARNING, logger="relay.limits"):
        for _ in range(100):
            limits.admit("192.0.2.1", "smtp")
        limits.admit("192.0.2.2", "smtp")
        limits.admit("192.0.2.2", "smtp")  # another address: its own line
        now[0] = 61.0
        limits.admit("192.0.2.1", "smtp")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "refused 192.0.2.1" in lines[0]
    assert "refused 192.0.2.2" in lines[1]
    assert lines[2].endswith("(99 more refused since the last line)")


# --- one relay's limits across its worker processes (SharedCounts) ---


def _worker(
    counts: SharedCounts,
    number: int,
    limits: tuple[int, int],
    keys: list[list[str]],
    release: bool,
    start: Barrier,
    results: Queue[dict[str, int]],
) -> None:
    """One worker process: admit each of its ``keys`` (concurrently with the others),
    report what it admitted per key, then release them or leave them counted."""
    shared = counts.of_worker(number)
    session_limits = SessionLimits(*limits, clock=lambda: 0.0, shared=shared)
    start.wait()
    admitted: dict[str, int] = {}
    for key in keys[number]:
        if session_limits.admit(key, "smtp") is None:
            admitted[key] = admitted.get(key, 0) + 1
    results.put(admitted)
    start.wait()  # all have admitted before any releases
    if release:
        for key, n in admitted.items():
            for _ in range(n):
                session_limits.release(key)


def _run_workers(
    counts: SharedCounts, limits: tuple[int, int], keys: list[list[str]], release: bool
) -> list[dict[str, int]]:
    """Each worker ``n`` of ``counts`` in a process of its own, admitting ``keys[n]``."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(counts.workers)
    results: Queue[dict[str, int]] = context.Queue()
    workers = [
        context.Process(target=_worker, args=(counts, n, limits, keys, release, start, results))
        for n in range(counts.workers)
    ]
    for process in workers:
        process.start()
    got = [results.get(timeout=60) for _ in workers]
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    return got


def test_worker_processes_admit_the_limits_in_all_not_each() -> None:
    """Four processes admitting at once into one SharedCounts: TRACKRELAY_MAX_SESSIONS
    and _PER_IP hold for the four together (each alone would admit the full limits)."""
    keys = [f"10.0.0.{i}" for i in range(20)] * 3  # 60 tries per process, 12 per address
    counts = SharedCounts(total=1000, workers=4)
    per_key = _run_workers(counts, (1000, 5), [keys] * 4, release=False)
    admitted = {key: sum(got.get(key, 0) for got in per_key) for key in set(keys)}
    assert admitted == dict.fromkeys(set(keys), 5)  # per address, in all
    assert counts.active == 100

    counts = SharedCounts(total=50, workers=4)
    per_key = _run_workers(counts, (50, 5), [keys] * 4, release=True)
    assert sum(sum(got.values()) for got in per_key) == 50  # in all
    assert counts.active == 0  # all released: every slot is empty again
    assert SessionLimits(1, 1, shared=counts.of_worker(0)).admit("10.0.0.1", "smtp") is None


def test_a_dead_workers_sessions_are_forgotten() -> None:
    """A worker that ended without releasing (killed): the parent's forget frees its
    slots, and the other workers' counts stay."""
    counts = SharedCounts(total=10, workers=2)
    keys = [["192.0.2.1"] * 2 + ["192.0.2.2"], ["192.0.2.1", "192.0.2.3", "192.0.2.3"]]
    _run_workers(counts, (10, 3), keys, release=False)
    assert counts.active == 6
    counts.forget(1)  # what the parent does when worker 1 has ended
    assert counts.active == 3
    limits = SessionLimits(10, 3, clock=lambda: 0.0, shared=counts.of_worker(1))
    assert [limits.admit("192.0.2.3", "smtp") for _ in range(3)] == [None] * 3  # freed
    assert limits.admit("192.0.2.1", "smtp") is None  # 3 with worker 0's 2
    assert limits.admit("192.0.2.1", "smtp") is not None


def test_the_shared_table_counts_like_the_in_process_one() -> None:
    """Random admits and releases over few slots (long probe chains, wrap-around,
    backward-shift deletion), in two columns: the same verdicts as a plain dict."""
    rng = random.Random(5321)
    counts = SharedCounts(total=40, workers=2)
    shared = [SessionLimits(40, 4, clock=lambda: 0.0, shared=counts)] * 2
    model: dict[tuple[int, str], int] = {}
    for _ in range(20_000):
        worker, key = rng.randrange(2), f"198.51.100.{rng.randrange(60)}"
        counts.of_worker(worker)
        mine = model.get((worker, key), 0)
        if mine and rng.random() < 0.45:
            shared[worker].release(key)
            model[(worker, key)] = mine - 1
            continue
        total = sum(model.values())
        of_key = model.get((0, key), 0) + model.get((1, key), 0)
        expected = None if total < 40 and of_key < 4 else "421"
        got = shared[worker].admit(key, "smtp")
        assert (got is None) == (expected is None), (worker, key, model)
        if got is None:
            model[(worker, key)] = mine + 1
        assert counts.active == sum(model.values())
