"""``trackrelay purge`` and ``trackrelay erase``: retention and erasure (shared/privacy.py)."""

from __future__ import annotations

import argparse

from shared import privacy
from shared.config import Settings
from trackrelay.commands import Commands, command
from trackrelay.database import database


def register(commands: Commands) -> None:
    p = command(commands, "purge", purge, "delete events and message details past the retention")
    p.add_argument("--days", type=int, help="override TRACKRELAY_RETENTION_DAYS")
    p = command(commands, "erase", erase, "remove every record about one recipient")
    p.add_argument("address")
    p.add_argument(
        "--forget-suppression",
        action="store_true",
        help="also remove their suppression (they would be tracked again)",
    )


def purge(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        days = settings.retention_days if args.days is None else args.days
        if days <= 0:
            print("retention is 0 (keep forever): nothing purged")
            return 0
        counts = privacy.purge(engine, days)
    print(f"purged data older than {days} days:")
    for table, n in counts.items():
        print(f"  {table}: {n}")
    return 0


def erase(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        result = privacy.erase(engine, args.address, forget_suppression=args.forget_suppression)
    print("\n".join(result.lines()))
    return 0
