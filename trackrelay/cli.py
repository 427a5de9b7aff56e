"""The ``trackrelay`` command: start the servers and manage what they use.

Every command loads the settings first; a bad setting prints one line naming it
and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine

from shared import db
from shared.config import Settings, SettingsError, load_settings
from shared.users import UserError, add_user, list_users, remove_user

log = logging.getLogger("trackrelay")

Command = Callable[[Settings, argparse.Namespace], int]


class CommandError(Exception):
    """A command cannot do what was asked; the message is printed, exit 1."""


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
    except (CommandError, UserError, SettingsError) as exc:  # SettingsError: found at start
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
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str,
        func: Command,
        help: str,
        parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub,
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(command=func)
        return p

    command("serve", cmd_serve, "run the relay and the receiver in one process (quick start)")
    command("relay", cmd_relay, "run the SMTP relay alone")

    db_parser = sub.add_parser("db", help="database schema", description="database schema")
    db_sub = db_parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    command("upgrade", cmd_db_upgrade, "apply the schema migrations (also done at start)", db_sub)

    user_parser = sub.add_parser(
        "user", help="relay and dashboard users", description="relay and dashboard users"
    )
    user_sub = user_parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p = command("add", cmd_user_add, "add a user (asks for the password)", user_sub)
    p.add_argument("username")
    p.add_argument("--admin", action="store_true", help="may see everything and manage settings")
    p.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="ADDR",
        help="an address (a@b.c) or domain (@b.c) the user sends as; repeatable",
    )
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    command("list", cmd_user_list, "list users and their addresses", user_sub)
    p = command("remove", cmd_user_remove, "remove a user", user_sub)
    p.add_argument("username")
    return parser


def open_database(settings: Settings) -> Engine:
    """Migrate the schema and return an engine; errors name the setting."""
    try:
        db.upgrade(settings.db_url)
    except Exception as exc:
        raise CommandError(f"TRACKRELAY_DATABASE_URL: cannot open the database: {exc}") from None
    return db.make_engine(settings.db_url)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay.serve import serve

    return serve(settings, open_database(settings), relay=True, receiver=True)


def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay.serve import serve

    return serve(settings, open_database(settings), relay=True, receiver=False)


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    open_database(settings).dispose()
    print(f"database schema is up to date ({settings.db_url.split('@')[-1]})")
    return 0


def cmd_user_add(settings: Settings, args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.username}: ")
        if password != getpass.getpass("again: "):
            raise CommandError("the passwords differ")
    role = "admin" if args.admin else "sender"
    add_user(open_database(settings), args.username, password, role, args.address)
    print(f"added {role} {args.username}")
    return 0


def cmd_user_list(settings: Settings, args: argparse.Namespace) -> int:
    for user, addresses in list_users(open_database(settings)):
        print(f"{user.username}\t{user.role}\t{', '.join(addresses) or '-'}")
    return 0


def cmd_user_remove(settings: Settings, args: argparse.Namespace) -> int:
    remove_user(open_database(settings), args.username)
    print(f"removed {args.username}")
    return 0
