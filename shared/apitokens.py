"""Bearer tokens for the JSON API: created by admins, shown once, revocable.

A token acts as its user, with that user's dashboard role: ``admin`` sees
everything, ``sender`` only messages from the addresses in user_addresses.
Only the SHA-256 of a token is stored: tokens carry 256 random bits, so a
slow password hash would add nothing but latency to every API call.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from sqlalchemy import Engine, update
from sqlmodel import col, select

from shared.db import session_scope
from shared.errors import UserError
from shared.identity import Viewer
from shared.models import ApiToken, User, UserAddress, utcnow

log = logging.getLogger(__name__)

TOKEN_PREFIX = "trk_"  # noqa: S105 - a marker, not a secret
_TOUCH_EVERY = timedelta(minutes=1)  # last_used_at precision: no write per request


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, username: str, name: str) -> tuple[str, ApiToken]:
    """A new token for ``username``; the clear token is returned once, never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(engine) as session:
        user = session.exec(select(User).where(col(User.username) == username)).first()
        if user is None or user.id is None:
            raise UserError(f"no user {username!r}")
        row = ApiToken(
            name=name or "api",
            token_hash=token_hash(token),
            prefix=token[:12],
            user_id=user.id,
        )
        session.add(row)
    log.info("API token %s (%s) created for %s", row.prefix, row.name, username)
    return token, row


def list_tokens(engine: Engine) -> list[tuple[ApiToken, str]]:
    """Every token with its user's name, newest first."""
    with session_scope(engine) as session:
        rows = session.exec(
            select(ApiToken, col(User.username))
            .join(User, col(User.id) == col(ApiToken.user_id))
            .order_by(col(ApiToken.id).desc())
        ).all()
    return [(token, username) for token, username in rows]


def revoke_token(engine: Engine, ident: str) -> ApiToken:
    """Revoke by id or by the prefix shown in lists."""
    with session_scope(engine) as session:
        where = col(ApiToken.prefix) == ident
        if ident.isdigit():
            where = col(ApiToken.id) == int(ident)
        found = session.exec(select(ApiToken).where(where)).all()
        if not found:
            raise UserError(f"no API token {ident!r}")
        if len(found) > 1:
            raise UserError(f"{ident!r} matches several tokens; use the id")
        token = found[0]
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            session.add(token)
    log.info("API token %s revoked", token.prefix)
    return token


def authenticate_token(engine: Engine, token: str) -> Viewer | None:
    """Who holds a valid, unrevoked token; None otherwise."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    with session_scope(engine) as session:
        row = session.exec(
            select(ApiToken, User)
            .join(User, col(User.id) == col(ApiToken.user_id))
            .where(col(ApiToken.token_hash) == token_hash(token))
        ).first()
        if row is None:
            return None
        api_token, user = row
        if api_token.revoked_at is not None or user.id is None:
            return None
        addresses = session.exec(
            select(col(UserAddress.address)).where(col(UserAddress.user_id) == user.id)
        ).all()
        now = utcnow()
        if api_token.last_used_at is None or now - api_token.last_used_at > _TOUCH_EVERY:
            session.connection().execute(
                update(ApiToken).where(col(ApiToken.id) == api_token.id).values(last_used_at=now)
            )
        return Viewer(user.id, user.username, user.role, tuple(addresses), api_token.id)
