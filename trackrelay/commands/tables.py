"""The two commands every table has: list its rows, remove one by its key.

``trackrelay user list``, ``policy list``, ``suppress list``, ``token list``
print one line per row; ``user remove``, ``policy remove``, ``suppress
remove``, ``webhook remove`` remove the row an argument names and say so.
Each group says only what differs: which rows, how a row reads, which
function removes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import Engine

from shared.config import Settings
from trackrelay.commands import Command
from trackrelay.database import database

Row = TypeVar("Row")


def listing(rows: Callable[[Engine], Iterable[Row]], line: Callable[[Row], str]) -> Command:
    """A command that prints ``line(row)`` for each of ``rows(engine)``."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        with database(settings) as engine:
            for row in rows(engine):
                print(line(row))
        return 0

    return run


def removal(remove: Callable[[Engine, Any], object], key: str, done: str) -> Command:
    """A command that removes the row named by the argument ``key`` (the
    shared function raises when there is none) and prints ``done`` with the
    key's value in its ``{}``."""

    def run(settings: Settings, args: argparse.Namespace) -> int:
        value = getattr(args, key)
        with database(settings) as engine:
            remove(engine, value)
        print(done.format(value))
        return 0

    return run
