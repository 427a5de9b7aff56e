"""``trackrelay token``: JSON API tokens (kept by shared/apitokens.py)."""

from __future__ import annotations

import argparse

from shared import apitokens
from shared.config import Settings
from shared.models import ApiToken
from trackrelay.commands import Commands, command, group
from trackrelay.commands.tables import listing
from trackrelay.database import database


def register(commands: Commands) -> None:
    token = group(commands, "token", "JSON API tokens")
    p = command(token, "create", token_create, "create a token for a user (shown once)")
    p.add_argument("name", help="what the token is for")
    p.add_argument("--user", required=True, help="the user the token acts as (and its role)")
    command(token, "list", listing(apitokens.list_tokens, _line), "list tokens")
    p = command(token, "revoke", token_revoke, "revoke a token by id or prefix")
    p.add_argument("token", metavar="ID_OR_PREFIX")


def token_create(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        token, row = apitokens.create_token(engine, args.user, args.name)
    print(f"created API token {row.id} ({row.prefix}...) for {args.user}")
    print(f"token (shown once): {token}")
    return 0


def _line(row: tuple[ApiToken, str]) -> str:
    t, username = row
    used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
    state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
    return f"{t.id}\t{t.prefix}...\t{t.name}\t{username}\t{used}\t{state}"


def token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    with database(settings) as engine:
        row = apitokens.revoke_token(engine, args.token)
    print(f"revoked API token {row.id} ({row.prefix}...)")
    return 0
