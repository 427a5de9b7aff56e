"""``trackrelay suppress``: recipients never tracked (kept by shared/policies.py)."""

from __future__ import annotations

import argparse

from shared import policies
from shared.config import Settings
from shared.models import Suppression
from trackrelay.commands import Commands, command, group
from trackrelay.commands.tables import listing, removal
from trackrelay.database import database


def register(commands: Commands) -> None:
    suppress = group(commands, "suppress", "recipients never tracked")
    p = command(suppress, "add", suppress_add, "never track this recipient")
    p.add_argument("address")
    command(
        suppress, "list", listing(policies.list_suppressions, _line), "list suppressed recipients"
    )
    remove = removal(policies.remove_suppression, "address", "{} may be tracked again")
    command(suppress, "remove", remove, "track this recipient again").add_argument("address")


def suppress_add(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        row = policies.add_suppression(engine, args.address, "cli")
    print(f"{row.address} will not be tracked")
    return 0


def _line(row: Suppression) -> str:
    return f"{row.address}\t{row.source}\t{row.created_at:%Y-%m-%d %H:%M}"
