"""Users and the addresses they may send as (relay local mode, dashboard)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from sqlalchemy import Engine
from sqlmodel import select

from shared.db import session_scope
from shared.models import User, UserAddress
from shared.passwords import hash_password, verify_password

ROLES = ("admin", "sender")


class UserError(ValueError):
    """A user operation that cannot be done; the message is for people."""


def normalize_address(address: str) -> str:
    """Lower-case an address or ``@domain`` pattern, checking its shape."""
    value = address.strip().lower()
    local, at, domain = value.rpartition("@")
    if not at or not domain or "." not in domain or " " in value or (local and "@" in local):
        raise UserError(f"{address!r} is not an email address or @domain")
    return value


def add_user(
    engine: Engine,
    username: str,
    password: str,
    role: str = "sender",
    addresses: Sequence[str] = (),
) -> User:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not username.strip():
        raise UserError("a username is required")
    if len(password) < 8:
        raise UserError("the password must have at least 8 characters")
    patterns = [normalize_address(a) for a in addresses]
    with session_scope(engine) as session:
        if session.exec(select(User).where(User.username == username)).first():
            raise UserError(f"user {username!r} already exists")
        user = User(username=username, password_hash=hash_password(password), role=role)
        session.add(user)
        session.flush()
        assert user.id is not None
        for pattern in dict.fromkeys(patterns):
            session.add(UserAddress(user_id=user.id, address=pattern))
    return user


def remove_user(engine: Engine, username: str) -> None:
    with session_scope(engine) as session:
        user = session.exec(select(User).where(User.username == username)).first()
        if user is None:
            raise UserError(f"no user {username!r}")
        for row in session.exec(select(UserAddress).where(UserAddress.user_id == user.id)):
            session.delete(row)
        session.flush()  # addresses first: the FK cascade would otherwise delete them twice
        session.delete(user)


def list_users(engine: Engine) -> list[tuple[User, list[str]]]:
    with session_scope(engine) as session:
        users = session.exec(select(User).order_by(User.username)).all()
        rows = session.exec(select(UserAddress)).all()
    by_user: dict[int, list[str]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row.address)
    return [(u, sorted(by_user.get(u.id or 0, []))) for u in users]


def authenticate(engine: Engine, username: str, password: str) -> User | None:
    with session_scope(engine) as session:
        user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        verify_password(password, _dummy_hash())  # same work whether or not the user exists
        return None
    return user if verify_password(password, user.password_hash) else None


def user_addresses(engine: Engine, user_id: int) -> list[str]:
    with session_scope(engine) as session:
        rows = session.exec(select(UserAddress.address).where(UserAddress.user_id == user_id))
        return list(rows.all())


def may_send_as(patterns: list[str], address: str) -> bool:
    """True when ``address`` matches one of the exact or ``@domain`` patterns."""
    address = address.lower()
    domain = "@" + address.rpartition("@")[2]
    return any(p == address or p == domain for p in patterns)


@cache
def _dummy_hash() -> str:
    return hash_password("dummy password for timing")
