"""``serve``, ``relay`` and ``receiver``: start the servers (trackrelay/serve.py runs them).

The relay and the receiver alone start even when their database does not
answer (what they would store is journaled); ``serve``, the quick start,
needs it. Server modules are imported when a server starts, not when the
parser is built, so the admin commands never load the relay or uvicorn.
"""

from __future__ import annotations

import argparse

from shared.config import Settings
from trackrelay.commands import CommandError, Commands, command
from trackrelay.database import database


def register(commands: Commands) -> None:
    command(
        commands, "serve", start_both, "run the relay and the receiver in one process (quick start)"
    )
    command(commands, "relay", start_relay, "run the SMTP relay alone")
    command(
        commands,
        "receiver",
        start_receiver,
        "run the HTTP receiver alone (TRACKRELAY_RECEIVER_WORKERS processes)",
    )


def _links_must_be_reachable(settings: Settings) -> None:
    """A relay sending real mail refuses to write links nobody can follow."""
    if not settings.dev_mode and not settings.public_url:
        raise CommandError(
            f"{settings.public_url_problem()}; set TRACKRELAY_PUBLIC_URL to the receiver's "
            "public https:// address"
        )


def start_both(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay import serve

    _links_must_be_reachable(settings)
    with database(settings, server=True) as engine:
        return serve.serve(settings, engine, serve.BOTH)


def start_relay(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay import serve

    _links_must_be_reachable(settings)
    with database(settings, server=True, journaled="records") as engine:
        if settings.relay_workers > 1:
            return serve.serve_relay_workers(settings, engine)
        return serve.serve(settings, engine, serve.RELAY)


def start_receiver(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay import serve, web

    # Hits must still be answered: events go to the journal until the database is back.
    with database(settings, server=True, journaled="events") as engine:
        if settings.receiver_workers == 1:
            return serve.serve(settings, engine, serve.RECEIVER)
        engine.dispose()  # each worker opens its own
        return web.serve_receiver_workers(settings, args.config)
