"""Mailbox connections: a relay user's address sending through its own mailbox account.

The one owner of the ``mailbox_connections`` rows (shared/models.py
MailboxConnection). The relay asks :func:`route` whether a sender address has
a connection and :func:`access_token` for a live token to speak XOAUTH2 with;
the CLI stores what a device grant gave (:func:`store`), lists and forgets.

* **App passwords** (``method = password``; a provider whose ``[oauth.NAME]``
  table has ``app_passwords = true``): :func:`connect_password` makes ONE
  trial AUTH (PLAIN or LOGIN) at the provider's ``smtp`` through
  shared/smtpclient.py, so a wrong password is an error at connect time, then
  keeps the password sealed like a grant (the same :func:`seal`, key and
  rotation). :func:`access_token` then answers the login and the password
  (mechanism PLAIN) instead of a token; there is nothing to refresh, and a
  provider refusing it marks the connection broken (relay/mailboxes.py).

* **At rest** the grant (the token set) is AES-GCM encrypted with a key
  derived by HKDF-SHA256 from ``TRACKRELAY_SECRET_KEY``, bound to the
  connection's address. A grant sealed with a key now listed in
  ``TRACKRELAY_OLD_SECRET_KEYS`` still opens and is sealed again with the
  current key when read, or by :func:`reseal` (``trackrelay mailbox reseal``)
  for every connection at once, before the old key is removed; one sealed
  with a key no longer listed marks the connection broken. Sealing again is
  an ``UPDATE ... WHERE grant = <the value read>``: a process that refreshed
  the grant in between (and so rotated its refresh token) wins, and the old
  refresh token is never written back. Tokens are never logged nor put in an
  error message.
* **Refresh** happens :attr:`Settings.mailbox_refresh_margin` seconds before
  the access token expires. Only one process refreshes a grant at a time: it
  takes a lease with ``UPDATE ... WHERE lease_until IS NULL OR lease_until <
  now`` (one row changed = ours; the same on SQLite and PostgreSQL), reads the
  row again under the lease (another may have just refreshed it), refreshes,
  and stores the new token set and frees the lease in one UPDATE. The others
  wait for the lease to end and use what it stored, so two relays never spend
  one rotating refresh token twice (which the provider answers with
  ``invalid_grant``).
* **Broken**: the provider's ``invalid_grant`` (revoked, expired, already
  used), or a grant without a refresh token, marks the connection ``broken``
  with a reason; it stays broken until it is connected again.
* **Not the grant's fault**: ``invalid_client``, ``unauthorized_client`` and
  ``unsupported_grant_type`` (oauth.CLIENT_ERRORS: an expired client secret,
  Entra's AADSTS7000222) say the relay's ``[oauth.NAME]`` client is wrong:
  nobody's connection breaks and nobody is told; an error is logged naming
  ``[oauth.NAME] client_id/client_secret``, the relay answers 454
  (:class:`MailboxMisconfigured`), and the next refresh after the operator
  fixed the table works. A provider that is away, an answer that cannot be
  read and a database that cannot be read are :class:`MailboxUnavailable`;
  each is kept as the connection's ``last_error`` (and ``last_error_at``).
* **Erased with the user**: ``user_id`` has ON DELETE CASCADE.

Neither tokens nor passwords are ever logged nor put in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Engine, or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from shared import oauth, outbox, users
from shared.addresses import normalize_address
from shared.config import Settings
from shared.db import session_scope
from shared.errors import UserError
from shared.isotime import iso
from shared.models import MailboxConnection, User, utcnow
from shared.oauth import OAuthRefused, ProviderUnavailable, Token
from shared.oauthproviders import OAuthProvider
from shared.smtpclient import SmtpClient, UpstreamUnavailable

log = logging.getLogger(__name__)

_INFO = b"trackrelay/mailbox-grant/v1"
_VERSION = "v1"
WAIT_STEP = 0.05  # seconds between looks at a grant another process is refreshing


class MailboxBroken(Exception):
    """The connection cannot send until it is connected again; str() is the reason."""


class MailboxUnavailable(Exception):
    """The provider could not be asked now (the grant may be fine): try again later."""


class MailboxMisconfigured(MailboxUnavailable):
    """The provider refused the relay's own client (its ``[oauth.NAME]`` client_id or
    client_secret): the operator must fix the config; no connection is broken."""


@dataclass(frozen=True)
class Route:
    """A connection a sender address goes out through."""

    id: int
    address: str
    provider: OAuthProvider | None  # None: its [oauth.NAME] table is gone from the config
    provider_name: str = ""
    method: str = "oauth"  # oauth | password


@dataclass(frozen=True)
class Access:
    """What the relay needs for one AUTH: the account name and a live access token
    (``XOAUTH2``), or the login and the app password (``PLAIN``; expires_at 0)."""

    address: str
    token: str
    expires_at: float
    mechanism: str = "XOAUTH2"

    def __repr__(self) -> str:  # never the secret, should one reach a log line
        return f"Access({self.address!r}, {self.mechanism}, expires_at={self.expires_at})"


# --- sealing the grant (or the app password) ---


def _key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"key-id\0" + key).hexdigest()[:8]


def seal(settings: Settings, address: str, secret: dict[str, Any]) -> str:
    """The connection's secret (a token set's ``as_dict()``, or ``{"password": ...}``)
    encrypted with the current key, bound to ADDRESS: ``v1.KEYID.base64(nonce+ciphertext)``."""
    key = _key(settings.signing_keys()[0])
    nonce = os.urandom(12)
    data = AESGCM(key).encrypt(nonce, json.dumps(secret).encode(), address.encode())
    blob = base64.urlsafe_b64encode(nonce + data).decode()
    return f"{_VERSION}.{_key_id(key)}.{blob}"


def unseal(settings: Settings, address: str, sealed: str) -> tuple[dict[str, Any], bool]:
    """The secret :func:`seal` was given and whether it was sealed with the current key.

    MailboxBroken when no configured key opens it (the secret was replaced
    without listing the old one in TRACKRELAY_OLD_SECRET_KEYS).
    """
    version, key_id, blob = [*sealed.split(".", 2), "", ""][:3]
    keys = [_key(secret) for secret in settings.signing_keys()]
    for position, key in enumerate(keys):
        if version != _VERSION or _key_id(key) != key_id:
            continue
        raw = base64.urlsafe_b64decode(blob)
        try:
            plain = AESGCM(key).decrypt(raw[:12], raw[12:], address.encode())
        except InvalidTag:
            break
        secret = json.loads(plain)
        return (secret if isinstance(secret, dict) else {}), position == 0
    raise MailboxBroken(
        "the grant (or app password) was stored under a secret key that is no longer configured "
        "(TRACKRELAY_SECRET_KEY, TRACKRELAY_OLD_SECRET_KEYS)"
    )


# --- providers ---


def provider(settings: Settings, name: str) -> OAuthProvider:
    """The ``[oauth.NAME]`` provider; UserError naming the setting when there is none."""
    found = settings.oauth.get(name)
    if not isinstance(found, OAuthProvider):
        known = ", ".join(sorted(settings.oauth)) or "none"
        raise UserError(
            f"no [oauth.{name}] table in the config (TRACKRELAY_OAUTH; configured: {known})",
            "provider",
        )
    return found


def unused(settings: Settings) -> str:
    """Why the relay sends no mail through connections under these settings, one
    sentence ("" when it does); relay/mailboxes.py ``find`` routes by it."""
    if settings.auth_mode != "local":
        return (
            "mailbox connections are used only in local auth mode (TRACKRELAY_AUTH_MODE=local); "
            f"this relay runs in {settings.auth_mode} mode, so no mail goes out through them"
        )
    if settings.upstream_target.is_sink:
        return (
            "this relay is in dev mode (TRACKRELAY_UPSTREAM is a Maildir): mail is kept "
            "there and does not go out through mailbox connections"
        )
    return ""


# --- storing, listing, forgetting ---


def check_owner(engine: Engine, username: str, address: str) -> str:
    """ADDRESS canonical, once relay user USERNAME may send as it (UserError otherwise)."""
    canonical = normalize_address(address)
    with session_scope(engine) as session:
        user = session.exec(select(User).where(User.username == username)).first()
    if user is None or user.id is None:
        raise UserError(f"no user {username!r}", "user")
    if not users.may_send_as(users.user_addresses(engine, user.id), canonical):
        raise UserError(
            f"user {username!r} may not send as {canonical}: give them the address first",
            "address",
        )
    return canonical


def store(
    engine: Engine,
    settings: Settings,
    username: str,
    address: str,
    provider_name: str,
    token: Token,
    sent: str | None = None,
) -> MailboxConnection:
    """Keep the grant for USERNAME sending as ADDRESS (replacing one for that address;
    ``sent`` None: what the connection had, ``clean`` for a new one).

    UserError when the grant has no refresh token: it would stop working with
    its access token, within the hour."""
    found = provider(settings, provider_name)  # it must exist
    _check_sent(sent)
    if not token.refresh_token:
        raise UserError(
            f"{provider_name} gave no refresh token, so the connection would stop within the "
            f"hour: ask for offline access in [oauth.{provider_name}] scopes "
            f"({_offline_hint(found)}); nothing was stored",
            "provider",
        )
    canonical = check_owner(engine, username, address)
    return _keep(
        engine, username, canonical, provider_name, sent,
        method="oauth", login=canonical, grant=seal(settings, canonical, token.as_dict()),
        scopes=token.scope, expires_at=_when(token.expires_at),
    )  # fmt: skip


def connect_password(
    engine: Engine,
    settings: Settings,
    username: str,
    address: str,
    provider_name: str,
    password: str,
    login: str = "",
    sent: str | None = None,
) -> MailboxConnection:
    """Check the app password with ONE trial login at the provider's smtp, then keep it
    sealed for USERNAME sending as ADDRESS (``login``: the user name at the provider,
    the address when not given). UserError naming the input when anything is wrong."""
    found = provider(settings, provider_name)
    if not found.app_passwords:
        raise UserError(
            f"[oauth.{provider_name}] app_passwords is not true: connect with OAuth instead",
            "provider",
        )
    _check_sent(sent)
    if not password or any(c in password for c in "\r\n\0"):
        raise UserError("the app password is empty (or not one line)", "password")
    canonical = check_owner(engine, username, address)
    login = login.strip() or canonical
    if len(login) > 320 or any(c.isspace() for c in login):
        raise UserError("the login is one word of at most 320 characters", "login")
    asyncio.run(try_password(settings, found, login, password))
    return _keep(
        engine, username, canonical, provider_name, sent,
        method="password", login=login, grant=seal(settings, canonical, {"password": password}),
        scopes="", expires_at=None,
    )  # fmt: skip


def _check_sent(sent: str | None) -> None:
    if sent is not None and sent not in ("clean", "leave"):
        raise UserError(f"sent must be clean or leave, not {sent!r}", "sent")


def _offline_hint(found: OAuthProvider) -> str:
    if found.preset == "google":
        return "Google gives one with access_type=offline, which the relay asks for"
    if "offline_access" not in found.scopes:
        return 'add "offline_access", as Microsoft and most providers need'
    return "offline_access is there: check the app registration allows it"


def _keep(
    engine: Engine,
    username: str,
    canonical: str,
    provider_name: str,
    sent: str | None,
    *,
    method: str,
    login: str,
    grant: str,
    scopes: str,
    expires_at: datetime | None,
) -> MailboxConnection:
    """The connection row for CANONICAL, made or replaced, ``ok``: one owner for both
    methods (a grant replaces an app password and the other way round). ``sent``
    None keeps what the connection had (a reconnect keeps the person's choice)."""
    with session_scope(engine) as session:
        user = session.exec(select(User).where(User.username == username)).first()
        if user is None or user.id is None:  # removed since the check
            raise UserError(f"no user {username!r}", "user")
        row = session.exec(
            select(MailboxConnection).where(MailboxConnection.address == canonical)
        ).first() or MailboxConnection(user_id=user.id, address=canonical, provider="", grant="")
        row.user_id = user.id
        row.provider = provider_name
        row.method, row.login, row.grant, row.scopes = method, login, grant, scopes
        row.expires_at = expires_at
        row.state, row.reason, row.last_error, row.last_error_at = "ok", "", "", None
        row.sent = sent or row.sent or "clean"
        row.last_refresh_at = utcnow()
        row.lease_until, row.lease_owner = None, ""
        session.add(row)
        session.flush()
        session.expunge(row)
        return row


async def try_password(settings: Settings, found: OAuthProvider, login: str, password: str) -> None:
    """ONE AUTH (PLAIN, or LOGIN when only that is offered) at the provider's smtp;
    UserError saying what went wrong (never the password)."""
    target = found.smtp_target
    client = SmtpClient(settings, target)
    try:
        try:
            await client.connect()
            reply = await client.authenticate("PLAIN", login.encode(), password.encode())
        except UpstreamUnavailable as exc:
            why = str(exc.reply) if exc.reply is not None else _short(exc)
            raise UserError(f"cannot reach {target} to check the app password: {why}") from None
    finally:
        await client.close()
    if not reply.ok:
        raise UserError(
            f"the provider refused the app password for {login} ({reply}, at {target}): "
            "nothing was stored",
            "password",
        )


def list_connections(engine: Engine) -> list[tuple[MailboxConnection, str]]:
    """Every connection with its user's name, by address."""
    with session_scope(engine) as session:
        rows = session.exec(
            select(MailboxConnection, User.username)
            .join(User, col(User.id) == col(MailboxConnection.user_id))
            .order_by(col(MailboxConnection.address))
        ).all()
        return [(row, username) for row, username in rows]


def connections_of(engine: Engine, user_id: int) -> list[MailboxConnection]:
    """The connections of one relay user, by address (the dashboard's Mailbox page)."""
    with session_scope(engine) as session:
        rows = session.exec(
            select(MailboxConnection)
            .where(MailboxConnection.user_id == user_id)
            .order_by(col(MailboxConnection.address))
        ).all()
        session.expunge_all()
        return list(rows)


def get_connection(engine: Engine, connection_id: int) -> MailboxConnection | None:
    with session_scope(engine) as session:
        row = session.get(MailboxConnection, connection_id)
        if row is not None:
            session.expunge(row)
        return row


def broken_of(engine: Engine, user_id: int) -> list[str]:
    """The addresses of the user's broken connections: one query on the user_id index
    (the dashboard's banner, on every page)."""
    with session_scope(engine) as session:
        rows = session.exec(
            select(MailboxConnection.address).where(
                MailboxConnection.user_id == user_id, MailboxConnection.state == "broken"
            )
        ).all()
        return sorted(rows)


def set_sent(engine: Engine, connection_id: int, sent: str) -> None:
    """The Sent-folder mode of a connection: ``clean`` or ``leave``."""
    _check_sent(sent)
    _update(engine, connection_id, sent=sent)


class NotRevoked(UserError):
    """The provider did not answer the revocation: the connection is kept; ``force``
    forgets it without revoking."""


def disconnect(engine: Engine, settings: Settings, address: str, *, force: bool = False) -> str:
    """Revoke the grant at the provider and forget the connection; what happened, said.

    A grant the provider no longer takes (``invalid_token``), or with nothing to
    revoke, is forgotten. NotRevoked when the provider cannot be asked now (the
    grant may still be live there): kept, unless ``force``."""
    canonical = normalize_address(address)
    with session_scope(engine) as session:
        row = session.exec(
            select(MailboxConnection).where(MailboxConnection.address == canonical)
        ).first()
        if row is None:
            raise UserError(f"no mailbox connection for {canonical}", "address")
        said = _revoke(settings, row, force)
        session.delete(row)
    return said


def _revoke(settings: Settings, row: MailboxConnection, force: bool) -> str:
    if row.method == "password":
        return "an app password: forgotten (revoke the app password in the account)"
    found = settings.oauth.get(row.provider)
    if not isinstance(found, OAuthProvider):
        return f"provider {row.provider!r} is no longer configured: forgotten, not revoked"
    try:
        secret, _ = unseal(settings, row.address, row.grant)
    except MailboxBroken:
        return "the grant cannot be read: forgotten, not revoked"
    refresh_token = str(secret.get("refresh_token") or "")
    if not refresh_token:
        return "the grant has no refresh token to revoke: forgotten"
    try:
        done = oauth.revoke(found, refresh_token, _timeout(settings))
    except (OAuthRefused, ProviderUnavailable) as exc:
        if force:
            return (
                f"the provider did not revoke the grant ({_short(exc)}): forgotten without "
                "revoking (remove the app's access in the account)"
            )
        raise NotRevoked(
            f"the provider did not revoke the grant ({_short(exc)}); kept, try again "
            "(or forget it without revoking)",
            "address",
        ) from None
    if done == "invalid":
        return "the provider no longer knows the grant (already revoked or expired): forgotten"
    if done == "unsupported":
        return "the provider has no revocation endpoint: forgotten (revoke it in the account)"
    return "revoked at the provider and forgotten"


# --- the relay's side ---


def route(engine: Engine, settings: Settings, username: str, address: str) -> Route | None:
    """The connection of relay user USERNAME for this sender address, if there is one."""
    if not settings.oauth or not username or not address or address == "<>":
        return None
    try:
        canonical = normalize_address(address)
    except UserError:
        return None
    with session_scope(engine) as session:
        row = session.exec(
            select(MailboxConnection)
            .join(User, col(User.id) == col(MailboxConnection.user_id))
            .where(MailboxConnection.address == canonical, User.username == username)
        ).first()
    if row is None or row.id is None:
        return None
    found = settings.oauth.get(row.provider)
    return Route(
        row.id,
        row.address,
        found if isinstance(found, OAuthProvider) else None,
        row.provider,
        row.method,
    )


def access_token(engine: Engine, settings: Settings, connection_id: int) -> Access:
    """A live access token for the connection, refreshed first when it is about to expire;
    for an app-password connection its login and password (mechanism PLAIN).

    MailboxBroken: the connection cannot send (reason in the message);
    MailboxUnavailable: the provider could not be asked now, or the database
    not read (MailboxMisconfigured: the provider refused the relay's client).
    """
    try:
        return _access_token(engine, settings, connection_id)
    except SQLAlchemyError as exc:
        raise _database_unavailable(connection_id, exc) from None


def _database_unavailable(connection_id: int, exc: SQLAlchemyError) -> MailboxUnavailable:
    """One line for the client (never the SQL), the details for the log."""
    log.warning("mailbox connection %d: the database failed: %s", connection_id, _short(exc))
    return MailboxUnavailable(f"the mailbox connection cannot be read now ({type(exc).__name__})")


def _access_token(engine: Engine, settings: Settings, connection_id: int) -> Access:
    owner = f"{socket.gethostname()}:{os.getpid()}:{id(object())}"[:64]
    deadline = time.monotonic() + settings.mailbox_lease + settings.upstream_timeout
    while True:
        row = _load(engine, connection_id)
        if row.method == "password":
            password = str(_secret(engine, settings, row).get("password") or "")
            return Access(row.login or row.address, password, 0.0, "PLAIN")
        token = _token(engine, settings, row)
        if _fresh(settings, row, token):
            return Access(row.address, token.access_token, token.expires_at)
        if _take_lease(engine, settings, connection_id, owner):
            return _refresh_held(engine, settings, connection_id)
        if time.monotonic() > deadline:
            raise MailboxUnavailable("another process has been refreshing the grant too long")
        time.sleep(WAIT_STEP)


def token_refused(engine: Engine, connection_id: int) -> None:
    """The provider refused the access token at AUTH: refresh it at the next use.
    MailboxUnavailable when the database cannot be written."""
    try:
        _update(engine, connection_id, expires_at=utcnow() - timedelta(seconds=1))
    except SQLAlchemyError as exc:
        raise _database_unavailable(connection_id, exc) from None


def note_error(engine: Engine, connection_id: int, error: str) -> None:
    """The connection's ``last_error`` (one line) and ``last_error_at`` (now): what went
    wrong at its last use that did not break it (``mailbox list``, the Mailbox page)."""
    _update(engine, connection_id, last_error=_line(error), last_error_at=utcnow())


def mark_broken(
    engine: Engine, connection_id: int, reason: str, *, notify_email: bool = False
) -> None:
    """ok -> broken with the reason; the one that makes the change announces it
    (``mailbox.disconnected``, in the same transaction; with ``notify_email``
    also the notification mail to the connection's address)."""
    now = utcnow()
    with session_scope(engine) as session:
        changed = session.execute(
            update(MailboxConnection)
            .where(col(MailboxConnection.id) == connection_id, col(MailboxConnection.state) == "ok")
            .values(state="broken", reason=reason, lease_until=None, lease_owner="")
        )
        if getattr(changed, "rowcount", 0) != 1:
            return  # already broken (or removed): announced then
        row = session.exec(
            select(MailboxConnection, User.username)
            .join(User, col(User.id) == col(MailboxConnection.user_id))
            .where(MailboxConnection.id == connection_id)
        ).one()
        connection, username = row
        outbox.enqueue_mailbox_disconnected(
            session,
            {
                "id": connection_id,
                "address": connection.address,
                "provider": connection.provider,
                "user": username,
                "reason": reason,
                "broken_at": iso(now),
            },
            notify_email=notify_email,
        )
    log.warning("mailbox connection %d is broken: %s", connection_id, reason)


def _load(engine: Engine, connection_id: int) -> MailboxConnection:
    with session_scope(engine) as session:
        row = session.get(MailboxConnection, connection_id)
        if row is None:
            raise MailboxBroken("the mailbox connection was removed")
        session.expunge(row)
    if row.state != "ok":
        raise MailboxBroken(row.reason or "the mailbox connection is broken")
    return row


def _token(engine: Engine, settings: Settings, row: MailboxConnection) -> Token:
    return Token.from_response(_secret(engine, settings, row))


def _secret(engine: Engine, settings: Settings, row: MailboxConnection) -> dict[str, Any]:
    """The row's unsealed secret; sealed again when a retired key opened it."""
    assert row.id is not None
    try:
        secret, current = unseal(settings, row.address, row.grant)
    except MailboxBroken as exc:
        mark_broken(engine, row.id, str(exc), notify_email=bool(settings.notify_from))
        raise
    if not current:  # sealed with a retired key: seal it again with the current one
        _reseal(engine, settings, row, secret)
    return secret


def _reseal(
    engine: Engine, settings: Settings, row: MailboxConnection, secret: dict[str, Any]
) -> bool:
    """Seal ROW's secret again with the current key, if the row still holds the grant
    it was read with (False: another process changed it in between, e.g. a refresh
    that rotated the refresh token; what it stored stays)."""
    with session_scope(engine) as session:
        result = session.execute(
            update(MailboxConnection)
            .where(col(MailboxConnection.id) == row.id, col(MailboxConnection.grant) == row.grant)
            .values(grant=seal(settings, row.address, secret))
        )
        return bool(getattr(result, "rowcount", 0) == 1)


@dataclass(frozen=True)
class Resealed:
    """What :func:`reseal` did: sealed again, already under the current key, and the
    addresses whose grant no configured key opens (left as they are)."""

    sealed: int
    current: int
    unreadable: list[str]


def reseal(engine: Engine, settings: Settings) -> Resealed:
    """Seal every connection's grant (or app password) again with the current key
    (``trackrelay mailbox reseal``: run it before a key leaves
    TRACKRELAY_OLD_SECRET_KEYS). Conditional like the re-seal at use: a connection
    that changed meanwhile is read again. Nothing is marked broken here: a grant
    no key opens is named, so the operator can list its key again."""
    sealed = current = 0
    unreadable: list[str] = []
    with session_scope(engine) as session:
        ids = list(session.exec(select(MailboxConnection.id).order_by(col(MailboxConnection.id))))
    for connection_id in ids:
        for _ in range(5):  # changed by another process meanwhile: read it again
            with session_scope(engine) as session:
                row = session.get(MailboxConnection, connection_id)
                if row is not None:
                    session.expunge(row)
            if row is None:
                break  # removed meanwhile
            try:
                secret, is_current = unseal(settings, row.address, row.grant)
            except MailboxBroken:
                unreadable.append(row.address)
                break
            if is_current:
                current += 1
                break
            if _reseal(engine, settings, row, secret):
                sealed += 1
                break
    return Resealed(sealed, current, unreadable)


def _fresh(settings: Settings, row: MailboxConnection, token: Token) -> bool:
    """Usable for a while yet: the row's ``expires_at`` rules (token_refused moves it)."""
    expires = row.expires_at.timestamp() if row.expires_at is not None else token.expires_at
    return bool(token.access_token) and (
        expires == 0 or expires - settings.mailbox_refresh_margin > time.time()
    )


def _take_lease(engine: Engine, settings: Settings, connection_id: int, owner: str) -> bool:
    now = utcnow()
    with session_scope(engine) as session:
        result = session.execute(
            update(MailboxConnection)
            .where(
                col(MailboxConnection.id) == connection_id,
                or_(
                    col(MailboxConnection.lease_until).is_(None),
                    col(MailboxConnection.lease_until) < now,
                ),
            )
            .values(lease_until=now + timedelta(seconds=settings.mailbox_lease), lease_owner=owner)
        )
        return bool(getattr(result, "rowcount", 0) == 1)


def _refresh_held(engine: Engine, settings: Settings, connection_id: int) -> Access:
    """Under our lease: read again, refresh if still needed, store and free the lease."""
    try:
        row = _load(engine, connection_id)
        token = _token(engine, settings, row)
    except BaseException:
        _update(engine, connection_id, lease_until=None, lease_owner="")
        raise
    if _fresh(settings, row, token):  # another process refreshed it just before our lease
        _update(engine, connection_id, lease_until=None, lease_owner="")
        return Access(row.address, token.access_token, token.expires_at)
    found = settings.oauth.get(row.provider)
    notify = bool(settings.notify_from)
    try:
        if not isinstance(found, OAuthProvider):
            raise OAuthRefused("invalid_grant", f"provider {row.provider!r} is not configured")
        if not token.refresh_token:
            reason = "the grant has no refresh token (it cannot be renewed): connect it again"
            mark_broken(engine, connection_id, reason, notify_email=notify)
            raise MailboxBroken(reason)
        new = oauth.refresh(found, token.refresh_token, _timeout(settings))
    except OAuthRefused as exc:
        reason = _reason(exc)
        if exc.error == "invalid_grant":
            mark_broken(engine, connection_id, reason, notify_email=notify)
            raise MailboxBroken(reason) from None
        if exc.error in oauth.CLIENT_ERRORS:
            reason = (
                f"the provider refused the relay's client ({exc.error}): "
                f"check [oauth.{row.provider}] client_id/client_secret"
            )
            log.error("mailbox connection %d: %s (%s)", connection_id, reason, _short(exc))
            _failed(engine, connection_id, reason)
            raise MailboxMisconfigured(reason) from None
        _failed(engine, connection_id, reason)
        raise MailboxUnavailable(reason) from None
    except ProviderUnavailable as exc:
        _failed(engine, connection_id, _short(exc))
        raise MailboxUnavailable(_short(exc)) from None
    except BaseException:
        _update(engine, connection_id, lease_until=None, lease_owner="")
        raise
    _update(
        engine,
        connection_id,
        grant=seal(settings, row.address, new.as_dict()),
        expires_at=_when(new.expires_at),
        last_refresh_at=utcnow(),
        last_error="",
        last_error_at=None,
        lease_until=None,
        lease_owner="",
    )
    return Access(row.address, new.access_token, new.expires_at)


def _failed(engine: Engine, connection_id: int, error: str) -> None:
    """The lease freed and the error kept, in one UPDATE."""
    _update(
        engine, connection_id, lease_until=None, lease_owner="",
        last_error=_line(error), last_error_at=utcnow(),
    )  # fmt: skip


def _update(engine: Engine, connection_id: int, **values: Any) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(MailboxConnection)
            .where(col(MailboxConnection.id) == connection_id)
            .values(**values)
        )


def _reason(exc: OAuthRefused) -> str:
    if exc.error == "invalid_grant":
        return f"the provider no longer accepts the grant (invalid_grant: {exc.description[:120]})"
    return _short(exc)


def _short(exc: BaseException) -> str:
    return _line(str(exc) or type(exc).__name__)


def _line(text: str) -> str:
    return " ".join(text.split())[:200]


def _when(epoch: float) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def _timeout(settings: Settings) -> float:
    """A refresh must end well inside the lease, or a second process would start one."""
    return max(1.0, min(oauth.DEFAULT_TIMEOUT, settings.mailbox_lease / 2))


# --- the IMAP side (relay/imapsession.py, relay/sentfolder.py, relay/inboxwatch.py) ---


@dataclass(frozen=True)
class Imap:
    """A connection whose provider has an IMAP server, and where its INBOX was left."""

    id: int
    address: str
    provider: OAuthProvider
    sent: str  # clean | leave
    uidvalidity: int
    last_uid: int
    created_at: datetime


def imap_connections(engine: Engine, settings: Settings) -> list[Imap]:
    """Every ``ok`` connection whose provider is configured with ``imap``, by id."""
    with session_scope(engine) as session:
        rows = session.exec(
            select(MailboxConnection)
            .where(MailboxConnection.state == "ok")
            .order_by(col(MailboxConnection.id))
        ).all()
        return [found for row in rows if (found := _imap(settings, row)) is not None]


def imap_connection(engine: Engine, settings: Settings, connection_id: int) -> Imap | None:
    """The connection, if it is ``ok`` and its provider has ``imap``."""
    with session_scope(engine) as session:
        row = session.get(MailboxConnection, connection_id)
        return _imap(settings, row) if row is not None and row.state == "ok" else None


def inbox_seen(engine: Engine, connection_id: int, uidvalidity: int, last_uid: int) -> None:
    """The INBOX watcher read everything up to LAST_UID (of that UIDVALIDITY)."""
    _update(engine, connection_id, inbox_uidvalidity=uidvalidity, inbox_last_uid=last_uid)


def _imap(settings: Settings, row: MailboxConnection) -> Imap | None:
    found = settings.oauth.get(row.provider)
    if row.id is None or not isinstance(found, OAuthProvider) or not found.imap:
        return None
    return Imap(
        row.id, row.address, found, row.sent,
        row.inbox_uidvalidity, row.inbox_last_uid, row.created_at,
    )  # fmt: skip
