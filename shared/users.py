"""Users and the addresses they may send as (relay local mode, dashboard)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from sqlalchemy import Engine, func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from shared.addresses import address_key, normalize_address, normalize_sender
from shared.db import session_scope
from shared.errors import UserError
from shared.models import User, UserAddress
from shared.passwords import hash_password, verify_password

ROLES = ("admin", "sender")


def normalize_addresses(addresses: Sequence[str]) -> list[str]:
    """Each address normalised, duplicates dropped; one error naming every bad one."""
    good, bad = [], []
    for address in addresses:
        try:
            good.append(normalize_sender(address))
        except UserError:
            bad.append(address)
    if bad:
        raise UserError("not an address or @domain: " + ", ".join(bad), "addresses")
    return list(dict.fromkeys(good))


def check_username(username: str) -> str:
    if not username.strip():
        raise UserError("enter a username", "username")
    if len(username) > 255 or any(c.isspace() for c in username):
        raise UserError("a username has no spaces and at most 255 characters", "username")
    return username


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}", "role")
    return role


def check_password(password: str) -> str:
    if len(password) < 8:
        raise UserError("the password needs at least 8 characters", "password")
    return password


def add_user(
    engine: Engine,
    username: str,
    password: str,
    role: str = "sender",
    addresses: Sequence[str] = (),
) -> User:
    check_role(role)
    check_username(username)
    check_password(password)
    patterns = normalize_addresses(addresses)
    with session_scope(engine) as session:
        if session.exec(select(User).where(User.username == username)).first():
            raise UserError(f"user {username!r} already exists", "username")
        return _insert_user(session, username, hash_password(password), role, patterns)


def _insert_user(
    session: Session, username: str, password_hash: str, role: str, patterns: Sequence[str]
) -> User:
    user = User(username=username, password_hash=password_hash, role=role)
    session.add(user)
    session.flush()
    assert user.id is not None
    for pattern in patterns:
        session.add(UserAddress(user_id=user.id, address=pattern))
    return user


def user_by_id(engine: Engine, user_id: int) -> tuple[User, list[str]] | None:
    """A user and the addresses they send as, or None."""
    with session_scope(engine) as session:
        user = session.get(User, user_id)
        if user is None:
            return None
        rows = session.exec(select(UserAddress.address).where(UserAddress.user_id == user_id))
        return user, sorted(rows.all())


def update_user(
    engine: Engine,
    user_id: int,
    *,
    role: str,
    addresses: Sequence[str],
    password: str = "",
    acting_user_id: int | None = None,
) -> User:
    """Change role, addresses and (if given) password; never the last admin away.

    ``acting_user_id``: who is asking; they cannot take their own admin role.
    """
    check_role(role)
    patterns = normalize_addresses(addresses)
    if password:
        check_password(password)
    with session_scope(engine) as session:
        user = session.get(User, user_id)
        if user is None:
            raise UserError("this user no longer exists")
        if user.role == "admin" and role != "admin":
            if user_id == acting_user_id:
                raise UserError("you cannot remove your own administrator role", "role")
            _keep_an_admin(session)
        user.role = role
        if password:
            user.password_hash = hash_password(password)
            user.session_version += 1  # a new password signs every old session out
        session.add(user)
        existing = session.exec(select(UserAddress).where(UserAddress.user_id == user_id)).all()
        for row in existing:
            if row.address not in patterns:
                session.delete(row)
        have = {row.address for row in existing}
        session.add_all(UserAddress(user_id=user_id, address=a) for a in patterns if a not in have)
        return user


def end_sessions(engine: Engine, user_id: int) -> None:
    """Sign the user out everywhere: every dashboard session made before now stops working."""
    with session_scope(engine) as session:
        session.connection().execute(
            update(User)
            .where(col(User.id) == user_id)
            .values(session_version=col(User.session_version) + 1)
        )


def check_removable(engine: Engine, user_id: int, *, acting_user_id: int) -> User:
    """The user ``acting_user_id`` may remove: not themselves, not the last admin."""
    with session_scope(engine) as session:
        user = session.get(User, user_id)
        if user is None:
            raise UserError("this user no longer exists")
        if user_id == acting_user_id:
            raise UserError("you cannot remove yourself")
        if user.role == "admin":
            _keep_an_admin(session)
        return user


def _keep_an_admin(session: Session) -> None:
    query = select(func.count()).select_from(User).where(User.role == "admin")
    if int(session.exec(query).one()) <= 1:
        raise UserError("there must always be at least one administrator")


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
    """True when ``address`` matches one of the exact or ``@domain`` patterns
    (stored canonical, see shared/addresses.py)."""
    address = address_key(address)
    domain = "@" + address.rpartition("@")[2]
    return any(p in (address, domain) for p in patterns)


@cache
def _dummy_hash() -> str:
    return hash_password("dummy password for timing")


# --- dashboard logins with the mail server's credentials (passthrough mode) ---

#: ``password_hash`` of a user made at their first dashboard login with their
#: mail account (checked by the upstream server). No password verifies
#: against it locally; an administrator who sets a password makes it local.
MAILBOX_LOGIN = "!mailbox"


def may_use_mailbox_login(engine: Engine, username: str) -> bool:
    """True for a username that no local account holds.

    A local account (an administrator made with ``user add``) never signs in
    through the mail server: whoever owns a mailbox called ``admin`` upstream
    must not become the local ``admin``.
    """
    with session_scope(engine) as session:
        user = session.exec(select(User).where(User.username == username)).first()
    return user is None or user.password_hash == MAILBOX_LOGIN


def mailbox_user(engine: Engine, username: str) -> User:
    """The user for a mailbox the upstream just accepted, made on first login.

    A sender who sees mail from their own address (when the username is one;
    an administrator can add more addresses or make them an administrator).
    """
    check_username(username)
    try:
        addresses = [normalize_address(username)]
    except UserError:
        addresses = []
    for _ in range(2):  # a concurrent first login of the same user wins the insert
        with session_scope(engine) as session:
            user = session.exec(select(User).where(User.username == username)).first()
            if user is not None:
                return user
        try:
            with session_scope(engine) as session:
                return _insert_user(session, username, MAILBOX_LOGIN, "sender", addresses)
        except IntegrityError:
            continue
    raise UserError(f"cannot create user {username!r}", "username")
