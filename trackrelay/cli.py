"""The ``trackrelay`` command: start the servers and manage what they use.

Every command loads the settings first; a bad setting prints one line naming it
and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from shared import db
from shared.config import Settings, SettingsError, load_settings
from shared.outbox import EVENT_TYPES
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
    except (CommandError, UserError, PolicyError, SettingsError) as exc:  # Settings: at start
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
    command(
        "receiver",
        cmd_receiver,
        "run the HTTP receiver alone (TRACKRELAY_RECEIVER_WORKERS processes)",
    )

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
    add_privacy_commands(sub, command)
    return parser


def add_privacy_commands(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """webhook, token, purge, erase and consent (issue 6)."""
    hook = sub.add_parser("webhook", help="webhook endpoints", description="webhook endpoints")
    hook_sub = hook.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p = command(
        "add", cmd_webhook_add, "add an endpoint (prints its signing secret once)", hook_sub
    )
    p.add_argument("url")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="TYPE",
        help="an event type to send (repeatable; default: all): " + ", ".join(EVENT_TYPES),
    )
    p.add_argument("--description", default="")
    command("list", cmd_webhook_list, "list endpoints with their queue", hook_sub)
    p = command("remove", cmd_webhook_remove, "remove an endpoint and its queue", hook_sub)
    p.add_argument("id", type=int)
    p = command(
        "pause", cmd_webhook_pause, "stop delivering to an endpoint (its queue waits)", hook_sub
    )
    p.add_argument("id", type=int)
    p = command("resume", cmd_webhook_resume, "deliver to a paused endpoint again", hook_sub)
    p.add_argument("id", type=int)
    p = command("test", cmd_webhook_test, "POST a signed webhook.test event now", hook_sub)
    p.add_argument("id", type=int)
    p = command("log", cmd_webhook_log, "the delivery log, newest first", hook_sub)
    p.add_argument("--endpoint", type=int, metavar="ID")
    p.add_argument("--limit", type=int, default=20)

    token = sub.add_parser("token", help="JSON API tokens", description="JSON API tokens")
    token_sub = token.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p = command("create", cmd_token_create, "create a token for a user (shown once)", token_sub)
    p.add_argument("name", help="what the token is for")
    p.add_argument("--user", required=True, help="the user the token acts as (and its role)")
    command("list", cmd_token_list, "list tokens", token_sub)
    p = command("revoke", cmd_token_revoke, "revoke a token by id or prefix", token_sub)
    p.add_argument("token", metavar="ID_OR_PREFIX")

    p = command("purge", cmd_purge, "delete events and message details past the retention")
    p.add_argument("--days", type=int, help="override TRACKRELAY_RETENTION_DAYS")
    p = command("erase", cmd_erase, "remove every record about one recipient")
    p.add_argument("address")
    p.add_argument(
        "--forget-suppression",
        action="store_true",
        help="also remove their suppression (they would be tracked again)",
    )

    consent = sub.add_parser(
        "consent", help="tracking consent (opt-in mode)", description="tracking consent"
    )
    consent_sub = consent.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p = command("add", cmd_consent_add, "record a recipient's consent", consent_sub)
    p.add_argument("address")
    p.add_argument("--source", default="cli", help="where the consent came from")
    p = command("remove", cmd_consent_remove, "withdraw a consent", consent_sub)
    p.add_argument("address")
    command("list", cmd_consent_list, "list consents and modes", consent_sub)
    p = command(
        "mode", cmd_consent_mode, "show or set the mode (globally or per domain)", consent_sub
    )
    p.add_argument("mode", nargs="?", choices=["opt-in", "opt-out", "default"])
    p.add_argument("--domain", default="*", help="a recipient domain (default: all)")


def open_database(settings: Settings, *, server: bool = False) -> Engine:
    """Migrate the schema and return an engine; errors name the setting.

    ``server``: the process will run for long (serve, relay, receiver), so the
    migrations run in a child process (:func:`upgrade_apart`).
    """
    try:
        if server:
            upgrade_apart(settings.db_url)
        else:
            db.upgrade(settings.db_url)
    except Exception as exc:
        raise CommandError(f"TRACKRELAY_DATABASE_URL: cannot open the database: {exc}") from None
    return db.make_engine(settings.db_url)


class MigrationFailed(Exception):
    """The migration child process failed; the message is its error."""


def upgrade_apart(url: str) -> None:
    """:func:`shared.db.upgrade` in a forked child process.

    Alembic, Mako (with Pygments) and the migration scripts are imported by
    the child and leave with it: in-process they stayed in a server's memory
    for good (~10 MB of its idle RSS), for one use at start. The child
    inherits everything already imported and the settings, so this costs a
    fork. An in-memory SQLite database lives in this process only, and a
    platform without fork has no cheap child: both migrate in-process.
    """
    if not hasattr(os, "fork") or _in_memory(url):
        db.upgrade(url)
        return
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child; its effect is what the tests see
        code = 0
        try:
            os.close(read)
            db.upgrade(url)
        except BaseException as exc:
            os.write(write, (str(exc) or type(exc).__name__).encode(errors="replace")[:4000])
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        error = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise MigrationFailed(error or f"the migration process ended with status {status}")


def _in_memory(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def _database_or_journal(settings: Settings, what: str) -> Engine:
    """The relay and the receiver start without their database: mail and hits must flow.

    What they would store goes to the journal under the var directory and is
    replayed once the database answers (the schema must exist by then: a
    database that was never migrated needs ``trackrelay db upgrade``).
    """
    try:
        return open_database(settings, server=True)
    except CommandError as exc:
        log.warning("%s; starting anyway, %s are journaled until it is reachable", exc, what)
        return db.make_engine(settings.db_url)


def _links_must_be_reachable(settings: Settings) -> None:
    """A relay sending real mail refuses to write links nobody can follow."""
    if not settings.dev_mode and not settings.public_url:
        raise CommandError(
            f"{settings.public_url_problem()}; set TRACKRELAY_PUBLIC_URL to the receiver's "
            "public https:// address"
        )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay.serve import serve

    _links_must_be_reachable(settings)
    return serve(settings, open_database(settings, server=True), relay=True, receiver=True)


def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay.serve import serve, serve_relay_workers

    _links_must_be_reachable(settings)
    engine = _database_or_journal(settings, "records")
    if settings.relay_workers > 1:
        return serve_relay_workers(settings, engine)
    return serve(settings, engine, relay=True, receiver=False)


def cmd_receiver(settings: Settings, args: argparse.Namespace) -> int:
    from trackrelay.serve import serve
    from trackrelay.web import serve_receiver_workers

    # Hits must still be answered: events go to the journal until the database is back.
    engine = _database_or_journal(settings, "events")
    if settings.receiver_workers == 1:
        return serve(settings, engine, relay=False, receiver=True)
    engine.dispose()  # each worker opens its own
    return serve_receiver_workers(settings, args.config)


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


# --- webhooks, tokens, privacy (issue 6) ---


@contextmanager
def database(settings: Settings) -> Iterator[Engine]:
    """An engine that is disposed when the command ends (no connection left open)."""
    engine = open_database(settings)
    try:
        yield engine
    finally:
        engine.dispose()


def cmd_webhook_add(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        endpoint = webhooks.add_endpoint(engine, args.url, args.event, description=args.description)
        print(f"added webhook {endpoint.id}: {endpoint.url} ({endpoint.event_types})")
        print(f"signing secret (shown once): {endpoint.secret}")
        return 0


def cmd_webhook_list(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import func, select
    from sqlmodel import col

    from shared import webhooks
    from shared.models import OutboxItem

    with database(settings) as engine:
        with db.session_scope(engine) as session:
            counts = session.connection().execute(
                select(col(OutboxItem.endpoint_id), col(OutboxItem.status), func.count()).group_by(
                    col(OutboxItem.endpoint_id), col(OutboxItem.status)
                )
            )
            queue: dict[int | None, dict[str, int]] = {}
            for endpoint_id, status, n in counts:
                queue.setdefault(endpoint_id, {})[status] = n
        for e in webhooks.list_endpoints(engine):
            states = (
                ", ".join(f"{n} {s}" for s, n in sorted(queue.get(e.id, {}).items())) or "empty"
            )
            active = "active" if e.active else "paused"
            print(f"{e.id}\t{active}\t{e.url}\t{e.event_types}\t{states}")
        return 0


def cmd_webhook_remove(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        webhooks.remove_endpoint(engine, args.id)
        print(f"removed webhook {args.id}")
        return 0


def cmd_webhook_pause(settings: Settings, args: argparse.Namespace) -> int:
    return _set_webhook_active(settings, args.id, False)


def cmd_webhook_resume(settings: Settings, args: argparse.Namespace) -> int:
    return _set_webhook_active(settings, args.id, True)


def _set_webhook_active(settings: Settings, endpoint_id: int, active: bool) -> int:
    from shared import webhooks

    with database(settings) as engine:
        webhooks.set_active(engine, endpoint_id, active)
        print(f"webhook {endpoint_id} {'resumed' if active else 'paused'}")
        return 0


def cmd_webhook_test(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    from shared import webhooks

    with database(settings) as engine:
        try:
            code, ms = asyncio.run(webhooks.send_test(settings, engine, args.id))
        except httpx.HTTPError as exc:
            raise CommandError(f"webhook {args.id}: {type(exc).__name__}: {exc}") from None
        print(f"webhook {args.id} answered {code} in {ms} ms")
        return 0 if 200 <= code < 300 else 1


def cmd_webhook_log(settings: Settings, args: argparse.Namespace) -> int:
    from shared import webhooks

    with database(settings) as engine:
        for a in webhooks.delivery_log(engine, args.endpoint, args.limit):
            reply = a.reply_code if a.reply_code is not None else "-"
            print(
                f"{a.started_at:%Y-%m-%d %H:%M:%S}\t{a.channel}:{a.target}\t{a.event_type}\t"
                f"#{a.attempt}\t{a.status}\t{reply}\t{a.latency_ms} ms\t{a.row_status}"
                + (f"\t{a.error}" if a.error else "")
            )
        return 0


def cmd_token_create(settings: Settings, args: argparse.Namespace) -> int:
    from shared import apitokens

    with database(settings) as engine:
        token, row = apitokens.create_token(engine, args.user, args.name)
        print(f"created API token {row.id} ({row.prefix}...) for {args.user}")
        print(f"token (shown once): {token}")
        return 0


def cmd_token_list(settings: Settings, args: argparse.Namespace) -> int:
    from shared import apitokens

    with database(settings) as engine:
        for t, username in apitokens.list_tokens(engine):
            used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
            state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
            print(f"{t.id}\t{t.prefix}...\t{t.name}\t{username}\t{used}\t{state}")
        return 0


def cmd_token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from shared import apitokens

    with database(settings) as engine:
        row = apitokens.revoke_token(engine, args.token)
        print(f"revoked API token {row.id} ({row.prefix}...)")
        return 0


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    from shared import privacy

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


def cmd_erase(settings: Settings, args: argparse.Namespace) -> int:
    from shared import privacy

    with database(settings) as engine:
        result = privacy.erase(engine, args.address, forget_suppression=args.forget_suppression)
        print("\n".join(result.lines()))
        return 0


def cmd_consent_add(settings: Settings, args: argparse.Namespace) -> int:
    from shared import consent

    with database(settings) as engine:
        added = consent.add_consent(engine, args.address, args.source)
        print(f"consent {'recorded' if added else 'was already recorded'} for {args.address}")
        return 0


def cmd_consent_remove(settings: Settings, args: argparse.Namespace) -> int:
    from shared import consent

    with database(settings) as engine:
        if not consent.remove_consent(engine, args.address):
            raise CommandError(f"no consent recorded for {args.address}")
        print(f"consent withdrawn for {args.address}")
        return 0


def cmd_consent_list(settings: Settings, args: argparse.Namespace) -> int:
    from shared import consent

    with database(settings) as engine:
        for domain, mode in sorted(consent.list_modes(engine).items()):
            print(f"mode\t{domain}\t{mode}")
        for c in consent.list_consents(engine):
            print(f"consent\t{c.address}\t{c.source}\t{c.created_at:%Y-%m-%d}")
        return 0


def cmd_consent_mode(settings: Settings, args: argparse.Namespace) -> int:
    from shared import consent

    with database(settings) as engine:
        if args.mode is None:
            modes = consent.list_modes(engine)
            if args.domain != "*":
                domain = consent.normalize_domain(args.domain)
                print(f"{domain}\t{consent.mode_for(modes, 'x@' + domain)}")
            else:
                for domain, mode in sorted(modes.items()):
                    print(f"{domain}\t{mode}")
            return 0
        if args.mode == "default":
            if args.domain == "*":
                consent.set_mode(engine, "opt-out")
            else:
                consent.clear_mode(engine, args.domain)
            print(f"{args.domain} now follows the default")
            return 0
        consent.set_mode(engine, args.mode, args.domain)
        print(f"consent mode for {args.domain} is now {args.mode}")
        return 0
