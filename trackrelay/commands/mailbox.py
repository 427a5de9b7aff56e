"""``trackrelay mailbox``: mailbox connections (kept by shared/mailbox.py).

``connect`` runs the OAuth device authorization grant (RFC 8628) through
shared/oauth.py: it prints the provider's verification URL and the user
code, one line each, waits until the person has consented there (or the
code expires: exit 1), and stores the grant for the relay user sending as
the address. ``list`` shows each connection, its method (``oauth`` or
``password``) and state; ``disconnect`` revokes the grant at the provider and
forgets it.

``connect --app-password`` (a provider whose table has ``app_passwords =
true``) reads the app password from stdin: asked without echo when stdin is a
terminal, else its first line; never from the arguments or the environment,
where other users and logs would see it. The password is tried once at the
provider's smtp before it is kept (shared/mailbox.py ``connect_password``):
exit 0 once stored, exit 2 with one line saying what is wrong otherwise
(nothing is stored).
"""

from __future__ import annotations

import argparse
import getpass
import sys

from shared import mailbox, oauth
from shared.config import Settings
from shared.errors import UserError
from shared.models import MailboxConnection
from shared.oauth import OAuthRefused, ProviderUnavailable
from trackrelay.commands import CommandError, Commands, command, group
from trackrelay.commands.tables import listing
from trackrelay.database import database

ENDED = {
    "expired_token": "the code expired before it was confirmed; run the command again",
    "access_denied": "the person declined at the provider; nothing was stored",
}


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
        default="clean",
        help="clean: one pristine copy in the Sent folder; leave: as the provider keeps it",
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


def mailbox_connect(settings: Settings, args: argparse.Namespace) -> int:
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
            raise CommandError(ENDED.get(exc.error, f"the provider refused: {exc}")) from None
        except ProviderUnavailable as exc:
            raise CommandError(f"cannot reach the provider: {exc}") from None
        mailbox.store(engine, settings, args.user, address, args.provider, token, args.sent)
    print(f"connected {address} for user {args.user} through {args.provider}")
    return 0


def _connect_password(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 2 with one line on anything wrong: nothing is stored then."""
    try:
        mailbox.provider(settings, args.provider)  # named before the password is asked for
        password = _read_password(args.address)
        with database(settings) as engine:
            row = mailbox.connect_password(
                engine, settings, args.user, args.address, args.provider,
                password, login=args.login, sent=args.sent,
            )  # fmt: skip
    except (UserError, CommandError) as exc:
        print(f"trackrelay: {exc}", file=sys.stderr)
        return 2
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
        said = mailbox.disconnect(engine, settings, args.address)
    print(f"{args.address}: {said}")
    sys.stdout.flush()
    return 0


def _line(row: tuple[MailboxConnection, str]) -> str:
    connection, username = row
    state = connection.state
    if state == "broken":
        state = f"broken: {connection.reason}"
    return f"{connection.address}\t{connection.provider}\t{connection.method}\t{username}\t{state}"
