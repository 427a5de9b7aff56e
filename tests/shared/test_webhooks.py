"""Webhooks end to end: outbox rows in the caller's transaction, a real HTTP
server receiving signed deliveries, retries, restarts and crashes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlmodel import col

from receiver.eventrecord import event_keys, new_event
from receiver.eventrows import BatchStore
from shared import outbox_worker, webhooks
from shared.config import Settings
from shared.db import session_scope
from shared.models import DeliveryAttempt, OutboxItem, Recipient, utcnow
from shared.outbox import enqueue_for_events, enqueue_messages_sent
from shared.webhook_signature import SIGNATURE_HEADER, sign, verify_signature
from tests.support.seedrows import add_message, event, write_events
from tests.support.webhook_server import webhook_server

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0"


def rows(engine: Engine) -> list[OutboxItem]:
    with session_scope(engine) as session:
        return list(session.exec(select(OutboxItem).order_by(col(OutboxItem.id))).scalars())


def attempts(engine: Engine) -> list[DeliveryAttempt]:
    with session_scope(engine) as session:
        statement = select(DeliveryAttempt).order_by(col(DeliveryAttempt.id))
        return list(session.exec(statement).scalars())


def queue_events(engine: Engine, events: list[dict]) -> int:
    write_events(engine, events)
    with session_scope(engine) as session:
        return enqueue_for_events(session, events)


def fast(make_settings: Callable[..., Settings], **extra: object) -> Settings:
    values = {
        "webhook_retry_base": 0.01,
        "webhook_retry_max_interval": 0.05,
        "webhook_poll_interval": 0.01,
        "webhook_timeout": 5.0,
        "webhook_allow_private": True,  # webhook_server() listens on loopback
    }
    values.update(extra)
    return make_settings(**values)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, engine: Engine, **options: Any
) -> AsyncIterator[outbox_worker.OutboxWorker]:
    """The outbox worker started, and stopped on the way out."""
    worker = outbox_worker.OutboxWorker(settings, engine, **options)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def work_once(settings: Settings, engine: Engine) -> None:
    """Start the worker, claim once beside its loop (stop() waits for both), stop."""

    async def run() -> None:
        async with running_worker(settings, engine) as worker:
            await worker.run_once()

    asyncio.run(run())


async def until(condition: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_signature_round_trip_and_replay_window() -> None:
    body = b'{"id":"x"}'
    header = sign("s3cret", body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature("s3cret", header, body, now=1_700_000_100)
    assert not verify_signature("s3cret", header, body + b" ", now=1_700_000_100)
    assert not verify_signature("other", header, body, now=1_700_000_100)
    assert not verify_signature("s3cret", header, body, now=1_700_000_301)  # replay
    assert not verify_signature("s3cret", "v1=abc", body)
    assert verify_signature("s3cret", sign("s3cret", body), body)


def test_endpoint_validation(engine: Engine) -> None:
    with pytest.raises(webhooks.WebhookError, match="http"):
        webhooks.add_endpoint(engine, "ftp://example.com/")
    with pytest.raises(webhooks.WebhookError, match="unknown event type"):
        webhooks.add_endpoint(engine, "https://example.com/", ["message.read"])
    endpoint = webhooks.add_endpoint(engine, "https://example.com/h", ["message.opened"])
    assert endpoint.secret.startswith("whsec_")
    assert [e.url for e in webhooks.list_endpoints(engine)] == ["https://example.com/h"]
    webhooks.remove_endpoint(engine, endpoint.id or 0)
    assert webhooks.list_endpoints(engine) == []


def test_outbox_rows_commit_and_roll_back_with_the_message(engine: Engine) -> None:
    webhooks.add_endpoint(engine, "https://example.com/h")
    message = add_message(engine, refused=("carol@other.test",))
    with session_scope(engine) as session:
        recipients = list(session.exec(select(Recipient)).scalars())
    queued = []

    def fail_after_queueing() -> None:
        with session_scope(engine) as session:
            queued.append(enqueue_messages_sent(session, [(message, recipients)]))
            raise RuntimeError("the caller's transaction fails")

    with pytest.raises(RuntimeError):
        fail_after_queueing()
    assert queued == [2]
    assert rows(engine) == []
    with session_scope(engine) as session:
        enqueue_messages_sent(session, [(message, recipients)])
        assert enqueue_messages_sent(session, [(message, recipients)]) == 0  # same keys: skipped
    assert [r.event_type for r in rows(engine)] == ["message.sent", "delivery.failed"]
    failed = json.loads(rows(engine)[1].payload)
    assert [r["address"] for r in failed["data"]["recipients"]] == ["carol@other.test"]


def test_first_open_per_recipient_and_filters(engine: Engine) -> None:
    webhooks.add_endpoint(engine, "https://example.com/all")
    webhooks.add_endpoint(engine, "https://example.com/clicks", ["link.clicked"])
    message = add_message(engine)
    t = message.created_at
    batch = [
        event(message, verdict="machine", at=t + timedelta(minutes=1)),
        event(message, verdict="machine", at=t + timedelta(minutes=2)),
        event(message, verdict="human", at=t + timedelta(minutes=5)),
        event(message, verdict="proxy", at=t + timedelta(minutes=9)),
        event(message, recipient=2, verdict="proxy", at=t + timedelta(minutes=7)),
        event(message, kind="click", verdict="scanner", link=1),
        event(message, kind="click", verdict="human", link=1, recipient=2),
        event(message, verdict="self"),
    ]
    assert queue_events(engine, batch) == 5  # 4 for /all, 1 for /clicks
    found = rows(engine)
    assert sorted(r.event_type for r in found if r.target == "1") == [
        "link.clicked",
        "message.machine_opened",
        "message.opened",
        "message.opened",
    ]
    opened = [json.loads(r.payload) for r in found if r.event_type == "message.opened"]
    first = next(p for p in opened if p["data"]["recipient"]["position"] == 1)
    assert first["data"]["event"]["id"] == batch[2]["event_key"]
    assert first["data"]["recipient"]["address"] == "bob@client.test"
    assert first["data"]["message"]["subject"] == "Quarterly numbers"
    click = next(json.loads(r.payload) for r in found if r.target == "2")
    assert click["data"]["link"] == {"position": 1, "url": "https://example.com/report"}
    # A later batch with another human open of recipient 1 announces nothing new.
    assert queue_events(engine, [event(message, at=t + timedelta(hours=3))]) == 0
    with session_scope(engine) as session:  # a replayed batch adds nothing
        assert enqueue_for_events(session, batch) == 0


def test_delivery_retries_after_500_and_is_signed(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings)
    with webhook_server() as server:
        server.script = [500]
        endpoint = webhooks.add_endpoint(engine, server.url)
        message = add_message(engine)
        queue_events(engine, [event(message), event(message, kind="click", link=1)])

        async def run() -> None:
            async with running_worker(settings, engine):
                await until(lambda: {r.status for r in rows(engine)} == {"delivered"}, "delivery")

        asyncio.run(run())
        keys = server.keys()
        assert len(keys) == 3
        assert len(set(keys)) == 2
        for received in server.requests:
            signature = received.headers[SIGNATURE_HEADER]
            assert verify_signature(endpoint.secret, signature, received.body)
            body = json.loads(received.body)
            assert body["id"] == received.headers["Idempotency-Key"]
            assert body["type"] == received.headers["X-Trackrelay-Event"]
    log = attempts(engine)
    assert sorted((a.status, a.reply_code) for a in log) == [
        ("error", 500),
        ("ok", 200),
        ("ok", 200),
    ]
    assert all(a.latency_ms >= 0 for a in log)
    retried = next(a.outbox_id for a in log if a.status == "error")
    assert {a.attempt for a in log if a.outbox_id == retried} == {1, 2}
    assert webhooks.delivery_log(engine, endpoint.id)[0].row_status == "delivered"


def test_graceful_restart_mid_delivery_sends_nothing_twice(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings)
    with webhook_server() as server:
        server.hold = True
        webhooks.add_endpoint(engine, server.url)
        message = add_message(engine)
        queue_events(engine, [event(message), event(message, recipient=2)])

        async def run() -> None:
            worker = outbox_worker.OutboxWorker(settings, engine, batch_size=1)
            await worker.start()
            await asyncio.to_thread(server.received.wait, 10)
            stopping = asyncio.create_task(worker.stop(grace=30))
            await asyncio.sleep(0.05)
            server.release.set()
            await stopping  # the delivery in flight finished before the worker stopped
            restarted = outbox_worker.OutboxWorker(settings, engine)
            await restarted.start()
            await until(lambda: {r.status for r in rows(engine)} == {"delivered"}, "delivery")
            await restarted.stop()

        asyncio.run(run())
        keys = server.keys()
    assert sorted(keys) == sorted(r.idempotency_key for r in rows(engine))
    assert len(keys) == len(set(keys)) == 2


def test_crash_mid_delivery_redelivers_with_the_same_key(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings)
    with webhook_server() as server:
        server.hold = True
        webhooks.add_endpoint(engine, server.url)
        message = add_message(engine)
        queue_events(engine, [event(message)])

        async def run() -> None:
            doomed = outbox_worker.OutboxWorker(settings, engine, lease=0.3)
            await doomed.start()
            await asyncio.to_thread(server.received.wait, 10)
            # A crash: the process dies without writing anything back.
            assert doomed._task is not None
            doomed._task.cancel()
            await asyncio.gather(doomed._task, return_exceptions=True)
            assert [r.status for r in rows(engine)] == ["delivering"]
            survivor = outbox_worker.OutboxWorker(settings, engine)
            await survivor.start()
            await until(lambda: rows(engine)[0].status == "delivered", "redelivery")
            await survivor.stop()
            await doomed.stop()

        asyncio.run(run())
        first, second = server.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.body == second.body  # the receiver can drop the repeat
    assert [(a.attempt, a.status) for a in attempts(engine)] == [(2, "ok")]


def test_gives_up_after_the_retry_period(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings, webhook_retry_period=0)
    with webhook_server() as server:
        server.script = [503]
        webhooks.add_endpoint(engine, server.url)
        queue_events(engine, [event(add_message(engine))])

        work_once(settings, engine)
    (row,) = rows(engine)
    assert row.status == "failed"
    assert row.last_error.startswith("HTTP 503")


def test_two_workers_share_the_queue_without_overlap(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings)
    with webhook_server() as server:
        webhooks.add_endpoint(engine, server.url)
        message = add_message(engine, recipients=tuple(f"r{i}@client.test" for i in range(12)))
        queue_events(engine, [event(message, recipient=i) for i in range(1, 13)])

        async def run() -> list[int]:
            a = outbox_worker.OutboxWorker(settings, engine, batch_size=4)
            b = outbox_worker.OutboxWorker(settings, engine, batch_size=4)
            await a.start()
            await b.start()
            await until(lambda: {r.status for r in rows(engine)} == {"delivered"}, "delivery")
            await a.stop()
            await b.stop()
            return [0]

        asyncio.run(run())
        keys = server.keys()
    assert len(keys) == len(set(keys)) == 12
    with session_scope(engine) as session:
        total = session.exec(select(func.count()).select_from(DeliveryAttempt)).one()
    assert total == (12,)


def test_send_test_posts_a_signed_ping(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    with webhook_server() as server:
        endpoint = webhooks.add_endpoint(engine, server.url)
        code, _ = asyncio.run(
            webhooks.send_test(make_settings(webhook_allow_private=True), engine, endpoint.id or 0)
        )
        (received,) = server.requests
    assert code == 200
    assert json.loads(received.body)["type"] == "webhook.test"
    signature = received.headers[SIGNATURE_HEADER]
    assert verify_signature(endpoint.secret, signature, received.body)


def test_the_writer_queues_notifications_with_its_batch(engine: Engine) -> None:
    """What production runs: the receiver's writer process queues the outbox rows in
    the transaction that stores the hits (receiver/eventstore.py), and reports the
    rows marked with what shared/notable.py decided."""
    webhooks.add_endpoint(engine, "https://example.com/h")
    message = add_message(engine)
    assert message.id is not None
    store = BatchStore(engine, store_full_ip=False)
    batch = event_keys.assign(
        [
            new_event("open", message.id, 1, 0, "192.0.2.1", FIREFOX, "GET"),
            new_event("open", message.id, 1, 0, "192.0.2.1", FIREFOX, "GET"),
            new_event("click", message.id, 1, 1, "192.0.2.1", FIREFOX, "GET"),
        ]
    )
    written = store.write(batch)
    assert [row["notable"] for row in written.notable] == ["first_open", None, "click"]
    assert store.write(batch, replay=True).inserted == 0  # a replay adds nothing
    assert sorted(r.event_type for r in rows(engine)) == ["link.clicked", "message.opened"]


def test_the_readme_verification_snippet_works() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    verify = namespace["verify"]
    body = b'{"id":"x"}'
    assert verify("s3cret", sign("s3cret", body), body)
    assert not verify("s3cret", sign("s3cret", body), body + b"!")
    assert not verify("s3cret", sign("s3cret", body, int(time.time()) - 301), body)
    assert not verify("s3cret", "garbage", body)


def test_a_paused_endpoint_keeps_its_queue(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    with webhook_server() as server:
        endpoint = webhooks.add_endpoint(engine, server.url)
        queue_events(engine, [event(add_message(engine))])
        webhooks.set_active(engine, endpoint.id or 0, False)
        assert outbox_worker.claim_due(engine, 10, 60) == []
        webhooks.set_active(engine, endpoint.id or 0, True)
        (claim,) = outbox_worker.claim_due(engine, 10, 60)
    assert claim.url == server.url
    assert claim.attempts == 1


def test_retry_after_is_honoured_when_longer_than_the_backoff(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings)  # backoff: 0.01-0.05 s
    with webhook_server() as server:
        server.script = [(503, {"Retry-After": "120"}), (429, {"Retry-After": "soon"})]
        webhooks.add_endpoint(engine, server.url)
        queue_events(engine, [event(add_message(engine))])

        async def run() -> None:
            async with running_worker(settings, engine):
                await until(lambda: len(attempts(engine)) == 1, "the first attempt")
                (row,) = rows(engine)
                assert row.status == "pending"
                assert row.last_error.startswith("HTTP 503")
                wait = (row.next_attempt_at - attempts(engine)[0].started_at).total_seconds()
                assert 119 <= wait <= 125  # the endpoint's 120 s, not the 0.05 s backoff
                with session_scope(engine) as session:  # time passes
                    session.execute(update_due(row.id))
                await until(lambda: len(attempts(engine)) == 2, "the second attempt")
                # an unreadable Retry-After is ignored: the backoff applies
                await until(lambda: {r.status for r in rows(engine)} == {"delivered"}, "delivery")

        asyncio.run(run())
    assert [a.reply_code for a in attempts(engine)] == [503, 429, 200]


def update_due(outbox_id: int | None) -> Any:
    """The statement that makes a waiting row due now."""
    due = update(OutboxItem).where(col(OutboxItem.id) == outbox_id)
    return due.values(next_attempt_at=utcnow())


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 12, 2, 8, 0, 0, tzinfo=UTC)
    assert outbox_worker.retry_after("30", now) == 30.0
    assert outbox_worker.retry_after(" 0 ", now) == 0.0
    assert outbox_worker.retry_after("Wed, 02 Dec 2026 08:01:30 GMT", now) == 90.0
    assert outbox_worker.retry_after("Wed, 02 Dec 2026 07:00:00 GMT", now) == 0.0  # in the past
    for bad in (None, "", "-5", "1.5", "tomorrow", "Wed, 02 Dec 2026 08:01:30"):
        assert outbox_worker.retry_after(bad, now) is None, bad


def test_410_gone_pauses_the_endpoint_and_keeps_its_queue(
    engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = fast(make_settings)
    with webhook_server() as server:
        server.script = [410]
        endpoint = webhooks.add_endpoint(engine, server.url)
        message = add_message(engine)
        queue_events(engine, [event(message), event(message, kind="click", link=1)])

        async def run() -> None:
            async with running_worker(settings, engine, batch_size=1):
                await until(
                    lambda: not webhooks.get_endpoint(engine, endpoint.id or 0).active, "pause"
                )
                await asyncio.sleep(0.3)  # a paused endpoint is not called again
                assert len(server.requests) == 1
                assert {r.status for r in rows(engine)} == {"pending"}  # nothing given up
                webhooks.set_active(engine, endpoint.id or 0, True)
                await until(lambda: {r.status for r in rows(engine)} == {"delivered"}, "delivery")

        asyncio.run(run())
    assert [a.reply_code for a in attempts(engine)] == [410, 200, 200]
    assert len(set(server.keys())) == 2
