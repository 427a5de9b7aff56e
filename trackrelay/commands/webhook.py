"""``trackrelay webhook``: webhook endpoints, their queue and delivery log (shared/webhooks.py).

shared/webhooks.py brings httpx and its kin (~50 modules): it is imported by
the command that runs, not with the parser, which every server process builds.
"""

from __future__ import annotations

import argparse

from shared.config import Settings
from shared.outbox import EVENT_TYPES
from trackrelay.commands import CommandError, Commands, command, group
from trackrelay.database import database


def register(commands: Commands) -> None:
    hook = group(commands, "webhook", "webhook endpoints")
    p = command(hook, "add", webhook_add, "add an endpoint (prints its signing secret once)")
    p.add_argument("url")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="TYPE",
        help="an event type to send (repeatable; default: all): " + ", ".join(EVENT_TYPES),
    )
    p.add_argument("--description", default="")
    command(hook, "list", webhook_list, "list endpoints with their queue")
    for name, run, help in (
        ("remove", webhook_remove, "remove an endpoint and its queue"),
        ("pause", webhook_pause, "stop delivering to an endpoint (its queue waits)"),
        ("resume", webhook_resume, "deliver to a paused endpoint again"),
        ("test", webhook_test, "POST a signed webhook.test event now"),
    ):
        command(hook, name, run, help).add_argument("id", type=int)
    p = command(hook, "log", webhook_log, "the delivery log, newest first")
    p.add_argument("--endpoint", type=int, metavar="ID")
    p.add_argument("--limit", type=int, default=20)


def webhook_add(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        endpoint = webhooks.add_endpoint(engine, args.url, args.event, description=args.description)
    print(f"added webhook {endpoint.id}: {endpoint.url} ({endpoint.event_types})")
    print(f"signing secret (shown once): {endpoint.secret}")
    return 0


def webhook_list(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        queue = webhooks.queue_by_endpoint(engine)
        endpoints = webhooks.list_endpoints(engine)
    for e in endpoints:
        states = ", ".join(f"{n} {s}" for s, n in sorted(queue.get(e.id, {}).items())) or "empty"
        active = "active" if e.active else "paused"
        print(f"{e.id}\t{active}\t{e.url}\t{e.event_types}\t{states}")
    return 0


def webhook_remove(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        webhooks.remove_endpoint(engine, args.id)
    print(f"removed webhook {args.id}")
    return 0


def webhook_pause(settings: Settings, args: argparse.Namespace) -> int:
    return _set_active(settings, args.id, False)


def webhook_resume(settings: Settings, args: argparse.Namespace) -> int:
    return _set_active(settings, args.id, True)


def _set_active(settings: Settings, endpoint_id: int, active: bool) -> int:
    from shared import webhooks

    with database(settings) as engine:
        webhooks.set_active(engine, endpoint_id, active)
    print(f"webhook {endpoint_id} {'resumed' if active else 'paused'}")
    return 0


def webhook_test(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    from shared import webhooks

    with database(settings) as engine:
        try:
            code, ms = asyncio.run(webhooks.send_test(settings, engine, args.id))
        except httpx.HTTPError as exc:
            raise CommandError(f"webhook {args.id}: {type(exc).__name__}: {exc}") from None
    print(f"webhook {args.id} answered {code} in {ms} ms")
    return 0 if 200 <= code < 300 else 1


def webhook_log(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        attempts = webhooks.delivery_log(engine, args.endpoint, args.limit)
    for a in attempts:
        reply = a.reply_code if a.reply_code is not None else "-"
        print(
            f"{a.started_at:%Y-%m-%d %H:%M:%S}\t{a.channel}:{a.target}\t{a.event_type}\t"
            f"#{a.attempt}\t{a.status}\t{reply}\t{a.latency_ms} ms\t{a.row_status}"
            + (f"\t{a.error}" if a.error else "")
        )
    return 0
