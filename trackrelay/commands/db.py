"""``trackrelay db``: the database schema (shared/migrations, through trackrelay/database.py)."""

from __future__ import annotations

import argparse

from shared.config import Settings
from trackrelay.commands import Commands, command, group
from trackrelay.database import database


def register(commands: Commands) -> None:
    db = group(commands, "db", "database schema")
    command(db, "upgrade", db_upgrade, "apply the schema migrations (also done at start)")


def db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings):  # opening it migrates
        pass
    print(f"database schema is up to date ({settings.db_url.split('@')[-1]})")
    return 0
