"""``trackrelay mailbox``: mailbox connections (kept by shared/mailbox.py).

``connect`` runs the OAuth device authorization grant (RFC 8628) through
shared/oauth.py: it prints the provider's verification URL and the user
code, one line each, waits until the person has consented there (or the
code expires: exit 1), and stores the grant for the relay user sending as
the address. ``list`` shows each connection and its state; ``disconnect``
revokes the grant at the provider and forgets it.
"""

from __future__ import annotations

import argparse
import sys

from shared import mailbox, oauth
from shared.config import Settings
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
    mailboxes = group(commands, "mailbox", "mailbox connections (OAuth 2.0) addresses send through")
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
    command(mailboxes, "list", listing(mailbox.list_connections, _line), "list connections")
    p = command(mailboxes, "disconnect", mailbox_disconnect, "revoke at the provider and forget")
    p.add_argument("address")


def mailbox_connect(settings: Settings, args: argparse.Namespace) -> int:
    provider = mailbox.provider(settings, args.provider)
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
    return f"{connection.address}\t{connection.provider}\t{username}\t{state}"
