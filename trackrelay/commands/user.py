"""``trackrelay user``: relay and dashboard users (kept by shared/users.py)."""

from __future__ import annotations

import argparse
import getpass
import sys

from shared import users
from shared.config import Settings
from shared.models import User
from trackrelay.commands import CommandError, Commands, command, group
from trackrelay.commands.tables import listing, removal
from trackrelay.database import database


def register(commands: Commands) -> None:
    user = group(commands, "user", "relay and dashboard users")
    p = command(user, "add", user_add, "add a user (asks for the password)")
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
    command(user, "list", listing(users.list_users, _line), "list users and their addresses")
    remove = removal(users.remove_user, "username", "removed {}")
    command(user, "remove", remove, "remove a user").add_argument("username")


def user_add(settings: Settings, args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.username}: ")
        if password != getpass.getpass("again: "):
            raise CommandError("the passwords differ")
    role = "admin" if args.admin else "sender"
    with database(settings) as engine:
        users.add_user(engine, args.username, password, role, args.address)
    print(f"added {role} {args.username}")
    return 0


def _line(row: tuple[User, list[str]]) -> str:
    user, addresses = row
    return f"{user.username}\t{user.role}\t{', '.join(addresses) or '-'}"
