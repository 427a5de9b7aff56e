"""``trackrelay mailbox``: mailbox connections (kept by shared/mailbox.py).

``connect`` runs the OAuth device authorization grant (RFC 8628) through
shared/oauth.py: it prints the provider's verification URL and the user
code, one line each, waits until the person has consented there (or the
code expires: exit 1), and stores the grant for the relay user sending as
the address. ``list`` shows each connection, its method (``oauth`` or
``password``), state, and its last error with when it happened;
``disconnect`` revokes the grant at the provider and forgets it (a grant
the provider no longer knows is forgotten; one it cannot be asked about now
is kept, unless ``--force``). ``reseal`` seals every connection again with
the current TRACKRELAY_SECRET_KEY: run it before a key leaves
TRACKRELAY_OLD_SECRET_KEYS. ``--sent`` is set only when given: reconnecting
keeps the connection's Sent-folder mode.

Outside local auth mode (TRACKRELAY_AUTH_MODE) the relay sends nothing
through connections: ``connect`` says so first, on stderr.

Google's device flow does not allow the ``https://mail.google.com/`` scope
(its device grant answers ``invalid_scope``): Google accounts connect on the
dashboard's Mailbox page; the command says so when a provider answers that.

``connect --app-password`` (a provider whose table has ``app_passwords =
true``) reads the app password from stdin: asked without echo when stdin is a
terminal, else its first line; never from the arguments or the environment,
where other users and logs would see it. The password is tried once at the
provider's smtp before it is kept (shared/mailbox.py ``connect_password``):
exit 0 once stored, exit 1 with one line saying what is wrong otherwise
(nothing is stored), as every command's user error (trackrelay/cli.py).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from shared import mailbox, oauth
from shared.config import Settings
from shared.isotime import iso
from shared.models import MailboxConnection
from shared.oauth import OAuthRefused, ProviderUnavailable
from trackrelay.commands import CommandError, Commands, command, group
from trackrelay.commands.tables import listing
from trackrelay.database import database

ENDED = {
    "expired_token": "the code expired before it was confirmed; run the command again",
    "access_denied": "the person declined at the provider; nothing was stored",
}
DEVICE_SCOPE = (
    "the provider refused the scopes for the device flow (invalid_scope{why}); Google's "
    "device flow does not allow https://mail.google.com/: connect Google accounts on the "
    "dashboard's Mailbox page"
)


def register(commands: Commands) -> None:
    mailboxes = group(
        commands, "mailbox", "mailbox connections (OAuth 2.0, app passwords) addresses send through"
    )
    p = command(
        mailboxes,
        "connect",
        mailbox_connect,
        "connect an address to its mailbox: prints a URL and a code, waits for the consent",
    )
    p.add_argument("address")
    p.add_argument("--provider", required=True, metavar="NAME", help="an [oauth.NAME] table")
    p.add_argument("--user", required=True, metavar="USERNAME", help="the relay user sending")
    p.add_argument(
        "--sent",
        choices=("clean", "leave"),
        default=None,
        help="clean: one pristine copy in the Sent folder; leave: as the provider keeps it "
        "(default: what the connection has; clean for a new one)",
    )
    p.add_argument(
        "--app-password",
        action="store_true",
        help="connect with an app password, read from stdin (the provider's app_passwords)",
    )
    p.add_argument(
        "--login", default="", metavar="NAME", help="the user name at the provider (the address)"
    )
    command(mailboxes, "list", listing(mailbox.list_connections, _line), "list connections")
    p = command(mailboxes, "disconnect", mailbox_disconnect, "revoke at the provider and forget")
    p.add_argument("address")
    p.add_argument(
        "--force",
        action="store_true",
        help="forget it even when the provider cannot be asked to revoke it now",
    )
    command(
        mailboxes,
        "reseal",
        mailbox_reseal,
        "seal every connection again with the current TRACKRELAY_SECRET_KEY",
    )


def mailbox_connect(settings: Settings, args: argparse.Namespace) -> int:
    unused = mailbox.unused(settings)
    if unused:
        print(f"trackrelay: warning: {unused}", file=sys.stderr, flush=True)
    if args.app_password:
        return _connect_password(settings, args)
    if args.login:
        raise CommandError("--login is for --app-password (an OAuth grant names its account)")
    provider = mailbox.provider(settings, args.provider)
    if provider.password_only:
        raise CommandError(
            f"[oauth.{args.provider}] has no OAuth client (app_passwords only): use --app-password"
        )
    with database(settings) as engine:
        address = mailbox.check_owner(engine, args.user, args.address)
        try:
            device = oauth.start_device(provider)
            print(f"To connect {address}, open this page and enter the code:")
            print(f"verification URL: {device.verification_uri}")
            print(f"user code: {device.user_code}")
            print("waiting for the consent...", flush=True)
            token = oauth.poll_device(provider, device)
        except OAuthRefused as exc:
            if exc.error == "invalid_scope":
                why = f": {exc.description}" if exc.description else ""
                raise CommandError(DEVICE_SCOPE.format(why=why)) from None
            raise CommandError(ENDED.get(exc.error, f"the provider refused: {exc}")) from None
        except ProviderUnavailable as exc:
            raise CommandError(f"cannot reach the provider: {exc}") from None
        mailbox.store(engine, settings, args.user, address, args.provider, token, args.sent)
    print(f"connected {address} for user {args.user} through {args.provider}")
    return 0


def _connect_password(settings: Settings, args: argparse.Namespace) -> int:
    """Anything wrong is a UserError/CommandError (exit 1, one line): nothing is stored."""
    mailbox.provider(settings, args.provider)  # named before the password is asked for
    password = _read_password(args.address)
    with database(settings) as engine:
        row = mailbox.connect_password(
            engine, settings, args.user, args.address, args.provider,
            password, login=args.login, sent=args.sent,
        )  # fmt: skip
    print(f"connected {row.address} for user {args.user} through {args.provider} (app password)")
    return 0


def _read_password(address: str) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass(f"app password for {address}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("no app password on stdin (give it on the first line)")
    return password


def mailbox_disconnect(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        try:
            said = mailbox.disconnect(engine, settings, args.address, force=args.force)
        except mailbox.NotRevoked as exc:
            raise CommandError(f"{exc}: --force forgets it without revoking") from None
    print(f"{args.address}: {said}")
    sys.stdout.flush()
    return 0


def mailbox_reseal(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        done = mailbox.reseal(engine, settings)
    print(f"sealed again: {done.sealed}; already under the current key: {done.current}")
    if done.unreadable:
        raise CommandError(
            f"no configured key opens the grant of {', '.join(done.unreadable)}: list its key "
            "in TRACKRELAY_OLD_SECRET_KEYS and run this again (else connect it again)"
        )
    return 0


def _line(row: tuple[MailboxConnection, str]) -> str:
    """Address, provider, method, user, state (``broken: why``) and, when there is one,
    ``last error AT: WHAT``."""
    connection, username = row
    state = connection.state
    if state == "broken":
        state = f"broken: {connection.reason}"
    fields = [connection.address, connection.provider, connection.method, username, state]
    if connection.last_error:
        when = iso(connection.last_error_at) if connection.last_error_at else "?"
        fields.append(f"last error {when}: {connection.last_error}")
    return "\t".join(fields)
