"""The ``trackrelay`` command: the parser, the settings, and how errors are told.

Every command loads the settings first; a bad setting prints one line naming
it and exits with status 2, a command that cannot do what was asked prints
one line and exits with status 1: never a traceback. The commands themselves
live in trackrelay/commands/, one module per command group.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from shared.config import SettingsError, load_settings
from shared.errors import UserError
from trackrelay.commands import (
    CommandError,
    consent,
    db,
    mailbox,
    policy,
    privacy,
    servers,
    suppress,
    token,
    user,
    webhook,
)

# in the order --help lists them
GROUPS = (servers, db, user, policy, suppress, webhook, token, privacy, consent, mailbox)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "command"):
        parser.print_help()
        return 2
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"trackrelay: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.command(settings, args))
    except (CommandError, UserError, SettingsError) as exc:  # Settings: a server's, at start
        print(f"trackrelay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trackrelay",
        description=(
            "An SMTP relay that adds open and click tracking to mail from any client. "
            "Settings come from TRACKRELAY_* environment variables and --config."
        ),
    )
    parser.add_argument(
        "--config", type=Path, metavar="PATH", help="a TOML file of settings (env vars win)"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in GROUPS:
        module.register(commands)
    return parser
