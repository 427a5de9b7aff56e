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
from shared.policies import (
    MODES,
    PolicyError,
    add_suppression,
    describe,
    list_policies,
    list_suppressions,
    remove_policy,
    remove_suppression,
    set_policy,
)
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
    except (CommandError, UserError, PolicyError) as exc:
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

    policy_parser = sub.add_parser(
        "policy", help="per-sender tracking policies", description="per-sender tracking policies"
    )
    policy_sub = policy_parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p = command(
        "set", cmd_policy_set, "create or change the policy of a sender, @domain or *", policy_sub
    )
    p.add_argument("pattern", help="a@b.c, @b.c or '*'")
    p.add_argument("--mode", choices=MODES, help="header: track when asked (default)")
    for flag, what in (
        ("opens", "may track opens"),
        ("clicks", "may track clicks"),
        ("text-links", "may rewrite links in text/plain parts"),
        ("per-recipient", "one copy per recipient (who opened, not just whether)"),
        ("notify", "notify the sender of opens and clicks"),
    ):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, help=what)
    p.add_argument("--cap", type=int, metavar="N", help="per-recipient copies up to N recipients")
    command("list", cmd_policy_list, "list policies, most specific first", policy_sub)
    p = command("remove", cmd_policy_remove, "remove a policy", policy_sub)
    p.add_argument("pattern")

    suppress_parser = sub.add_parser(
        "suppress",
        help="recipients never tracked",
        description="recipients never tracked",
    )
    suppress_sub = suppress_parser.add_subparsers(
        title="commands", metavar="COMMAND", required=True
    )
    p = command("add", cmd_suppress_add, "never track this recipient", suppress_sub)
    p.add_argument("address")
    command("list", cmd_suppress_list, "list suppressed recipients", suppress_sub)
    p = command("remove", cmd_suppress_remove, "track this recipient again", suppress_sub)
    p.add_argument("address")
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


def cmd_policy_set(settings: Settings, args: argparse.Namespace) -> int:
    policy = set_policy(
        open_database(settings),
        args.pattern,
        mode=args.mode,
        allow_opens=args.opens,
        allow_clicks=args.clicks,
        allow_text_links=args.text_links,
        per_recipient=args.per_recipient,
        recipient_cap=args.cap,
        notify=args.notify,
    )
    print(f"{policy.pattern}\t{describe(policy)}")
    return 0


def cmd_policy_list(settings: Settings, args: argparse.Namespace) -> int:
    for policy in list_policies(open_database(settings)):
        print(f"{policy.pattern}\t{describe(policy)}")
    return 0


def cmd_policy_remove(settings: Settings, args: argparse.Namespace) -> int:
    remove_policy(open_database(settings), args.pattern)
    print(f"removed the policy for {args.pattern}")
    return 0


def cmd_suppress_add(settings: Settings, args: argparse.Namespace) -> int:
    row = add_suppression(open_database(settings), args.address, "cli")
    print(f"{row.address} will not be tracked")
    return 0


def cmd_suppress_list(settings: Settings, args: argparse.Namespace) -> int:
    for row in list_suppressions(open_database(settings)):
        print(f"{row.address}\t{row.source}\t{row.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_suppress_remove(settings: Settings, args: argparse.Namespace) -> int:
    remove_suppression(open_database(settings), args.address)
    print(f"{args.address} may be tracked again")
    return 0
