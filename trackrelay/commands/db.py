"""``trackrelay db``: the database schema (shared/migrations, through trackrelay/database.py)
and the state kept from the events (shared/eventstate.py)."""

from __future__ import annotations

import argparse

from shared import eventstate
from shared.config import Settings
from trackrelay.commands import CommandError, Commands, command, group
from trackrelay.database import database


def register(commands: Commands) -> None:
    db = group(commands, "db", "database schema")
    command(db, "upgrade", db_upgrade, "apply the schema migrations (also done at start)")
    rebuild = command(
        db,
        "rebuild-state",
        db_rebuild_state,
        "count the recipients', messages' and daily figures again from the events",
    )
    rebuild.add_argument(
        "--slice",
        type=int,
        default=None,
        help="count this many messages per committed transaction, for a database being"
        " written to (default: every table in one statement, in one transaction)",
    )


def db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings):  # opening it migrates
        pass
    print(f"database schema is up to date ({settings.db_url.split('@')[-1]})")
    return 0


def db_rebuild_state(settings: Settings, args: argparse.Namespace) -> int:
    if args.slice is not None and args.slice < 1:
        raise CommandError("--slice: give a number of messages, 1 or more")
    with database(settings) as engine:
        slices = eventstate.rebuild(engine, args.slice)
    if args.slice is None:
        print("state rebuilt from the events, every table at once")
    else:
        print(f"state rebuilt from the events: {slices} slice(s) of at most {args.slice} messages")
    return 0
