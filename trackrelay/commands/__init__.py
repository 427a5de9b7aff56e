"""The ``trackrelay`` commands, one module per command group; this module is their kit.

Each module's ``register(commands)`` adds its group (``user``, ``policy``, ...)
or its top-level commands (``serve``, ``purge``, ...) to the parser, and
trackrelay/cli.py calls them in the order ``--help`` lists them. A command is a
function of the settings and the parsed arguments that returns the exit status;
one that cannot do what was asked raises :class:`CommandError` (or a shared
``UserError``), which trackrelay/cli.py prints as one line, exit status 1.
A command that needs the database opens it with
:func:`trackrelay.database.database`, the CLI's one way to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

from shared.config import Settings

Command: TypeAlias = Callable[[Settings, argparse.Namespace], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandError(Exception):
    """A command cannot do what was asked; the message is printed, exit 1."""


def group(commands: Commands, name: str, help: str, description: str = "") -> Commands:
    """A command group (``trackrelay NAME COMMAND``); its commands are required."""
    parser = commands.add_parser(name, help=help, description=description or help)
    return parser.add_subparsers(title="commands", metavar="COMMAND", required=True)


def command(commands: Commands, name: str, run: Command, help: str) -> argparse.ArgumentParser:
    """A command that ``run`` carries out; add its arguments to what this returns."""
    parser = commands.add_parser(name, help=help, description=help)
    parser.set_defaults(command=run)
    return parser
