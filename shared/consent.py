"""Consent: who may be tracked when a recipient domain is in opt-in mode.

EU law expects recipients' consent to tracking. Each recipient domain (or the
global default ``*``) is in one of two modes (domains and addresses are stored
and looked up as shared/addresses.py spells them, so a mode or a consent for
``bücher.example`` holds for mail to ``xn--bcher-kva.example`` and back):

* ``opt-out`` (the default): track unless the recipient is suppressed;
* ``opt-in``: track only recipients with a recorded consent.

Suppression is separate (relay/policy.py checks it first: "suppressed / no
consent -> untracked"); :func:`consent_allows` answers only the consent half.
The relay asks once per recipient of every message and must not wait on the
database for it: it reads :func:`load_state` into its policy snapshot
(shared/policies.py, refreshed in the background) and answers with
:func:`allowed_by`. Other callers use :func:`consent_allows` with an engine, or
a :class:`ConsentCache` that keeps the mode table and recent answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass

from sqlalchemy import Engine, delete, func
from sqlmodel import Session, col, select

from shared import addresses
from shared.db import session_scope
from shared.errors import UserError
from shared.models import Consent, ConsentMode, utcnow

log = logging.getLogger(__name__)

MODES = ("opt-out", "opt-in")
GLOBAL = "*"


class ConsentError(UserError):
    """A consent operation that cannot be done; the message is for people."""


def normalize_domain(domain: str) -> str:
    """A recipient domain (IDNA, as shared/addresses.py spells it) or ``*``."""
    value = domain.strip().removeprefix("@")
    if value == GLOBAL:
        return value
    try:
        return addresses.normalize_domain(value)
    except UserError as exc:
        raise ConsentError(str(exc), exc.field) from None


def _address(address: str) -> str:
    if address.strip().startswith("@"):
        raise ConsentError(f"consent is recorded per address, not for a domain: {address!r}")
    try:
        return addresses.normalize_address(address)
    except UserError as exc:
        raise ConsentError(str(exc), exc.field) from None


def add_consent(engine: Engine, address: str, source: str = "cli") -> bool:
    """Record a consent; False when it was already recorded."""
    value = _address(address)
    with session_scope(engine) as session:
        if session.exec(select(Consent).where(Consent.address == value)).first():
            return False
        session.add(Consent(address=value, source=source[:64]))
    log.info("consent recorded for %s (source %s)", value, source)
    return True


def remove_consent(engine: Engine, address: str) -> bool:
    """Withdraw a consent; False when there was none."""
    value = _address(address)
    with session_scope(engine) as session:
        result = session.connection().execute(delete(Consent).where(col(Consent.address) == value))
    removed = bool(result.rowcount)
    if removed:
        log.info("consent withdrawn for %s", value)
    return removed


def list_consents(engine: Engine) -> list[Consent]:
    with session_scope(engine) as session:
        return list(session.exec(select(Consent).order_by(Consent.address)).all())


def set_mode(engine: Engine, mode: str, domain: str = GLOBAL) -> None:
    """Set the consent mode of ``domain`` (``*`` = the global default)."""
    if mode not in MODES:
        raise ConsentError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    key = normalize_domain(domain)
    with session_scope(engine) as session:
        row = session.get(ConsentMode, key)
        if row is None:
            session.add(ConsentMode(domain=key, mode=mode))
        else:
            row.mode = mode
            row.updated_at = utcnow()
            session.add(row)
    log.info("consent mode for %s is now %s", key, mode)


def clear_mode(engine: Engine, domain: str) -> bool:
    """Drop a per-domain mode so the global default applies again."""
    key = normalize_domain(domain)
    with session_scope(engine) as session:
        result = session.connection().execute(
            delete(ConsentMode).where(col(ConsentMode.domain) == key)
        )
    return bool(result.rowcount)


def list_modes(engine: Engine) -> dict[str, str]:
    """Every configured mode, ``*`` included (opt-out when absent)."""
    with session_scope(engine) as session:
        rows = session.exec(select(ConsentMode)).all()
    modes = {row.domain: row.mode for row in rows}
    modes.setdefault(GLOBAL, "opt-out")
    return modes


def mode_for(modes: Mapping[str, str], recipient: str) -> str:
    """The mode that applies to ``recipient``: its domain's, else the global one."""
    return modes.get(addresses.domain_of(recipient)) or modes.get(GLOBAL) or "opt-out"


def allowed_by(modes: Mapping[str, str], consented: Container[str], recipient: str) -> bool:
    """:func:`consent_allows` from values already read (see :func:`load_state`)."""
    address = addresses.address_key(recipient)
    return mode_for(modes, address) == "opt-out" or address in consented


def load_state(session: Session) -> tuple[dict[str, str], frozenset[str]]:
    """Every mode and, when any domain is in opt-in mode, every consented address.

    In opt-out everywhere (the default) no address is read: consents only
    matter in opt-in mode.
    """
    modes = {row.domain: row.mode for row in session.exec(select(ConsentMode)).all()}
    modes.setdefault(GLOBAL, "opt-out")
    if "opt-in" not in modes.values():
        return modes, frozenset()
    return modes, frozenset(session.exec(select(Consent.address)).all())


def _has_consent(engine: Engine, address: str) -> bool:
    with session_scope(engine) as session:
        count = session.exec(
            select(func.count()).select_from(Consent).where(Consent.address == address)
        ).one()
    return bool(count)


@dataclass
class ConsentCache:
    """Modes and answers kept ``ttl`` seconds, for the relay's hot path.

    A consent withdrawn takes effect within ``ttl`` seconds in every relay.
    """

    engine: Engine
    ttl: float = 30.0

    def __post_init__(self) -> None:
        self._modes: dict[str, str] = {}
        self._modes_at = float("-inf")
        self._answers: dict[str, tuple[float, bool]] = {}

    def modes(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._modes_at > self.ttl:
            self._modes = list_modes(self.engine)
            self._modes_at = now
        return self._modes

    def has_consent(self, address: str) -> bool:
        now = time.monotonic()
        cached = self._answers.get(address)
        if cached is not None and now - cached[0] <= self.ttl:
            return cached[1]
        answer = _has_consent(self.engine, address)
        if len(self._answers) > 10_000:
            self._answers.clear()
        self._answers[address] = (now, answer)
        return answer

    def invalidate(self) -> None:
        self._modes_at = float("-inf")
        self._answers.clear()


def consent_allows(source: Engine | ConsentCache, recipient: str) -> bool:
    """May ``recipient`` be tracked as far as consent goes?

    True in opt-out mode (suppression is checked separately); in opt-in mode
    True only with a recorded consent. Synchronous: async callers run it with
    ``asyncio.to_thread`` (or keep a :class:`ConsentCache`, whose hits do not
    touch the database).
    """
    address = addresses.address_key(recipient)
    if isinstance(source, ConsentCache):
        if mode_for(source.modes(), address) == "opt-out":
            return True
        return source.has_consent(address)
    if mode_for(list_modes(source), address) == "opt-out":
        return True
    return _has_consent(source, address)
