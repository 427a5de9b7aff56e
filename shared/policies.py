"""Per-sender tracking policies and the suppression list: storage and validation.

Shared by the relay (which reads a cached snapshot, see relay/policy.py), the
CLI, the JSON API and the dashboard (which add, edit and remove). Every rule
lives here once: validation errors are :class:`PolicyError` with a message
meant for people and the ``field`` it is about, so a form shows it next to the
input and the CLI and the API print it as it is.

A policy pattern is an exact address (``ann@example.com``), a whole domain
(``@example.com``, that domain only, not its subdomains) or ``*``. The most
specific pattern wins: exact, then ``@domain``, then ``*``. With no matching
policy the relay uses :data:`DEFAULT_POLICY` (track when the header asks).
Patterns and suppressed addresses are stored in the one canonical form of
shared/addresses.py (IDNA domain), so ``@bücher.example`` and
``@xn--bcher-kva.example`` are the same policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from shared import consent
from shared.addresses import address_key, normalize_address, normalize_sender
from shared.db import insert_ignoring, session_scope
from shared.errors import UserError
from shared.models import Policy, Suppression, utcnow

MODES = ("header", "always", "never")
MAX_RECIPIENT_CAP = 1000
# who added a suppression: "public" = the recipient, on the receiver's public page
SUPPRESSION_SOURCES = ("cli", "dashboard", "public", "api")
DEFAULT_POLICY = Policy(pattern="", mode="header")
_FLAGS = ("allow_opens", "allow_clicks", "allow_text_links", "per_recipient", "notify")
# what set_policy() takes besides the pattern, by the names of Policy's columns
POLICY_FIELDS = ("mode", *_FLAGS, "recipient_cap")


class PolicyError(UserError):
    """A policy or suppression operation that cannot be done; message for people."""


def normalize_pattern(pattern: str) -> str:
    """``a@b.c``, ``@b.c`` or ``*``, normalised; PolicyError otherwise."""
    value = pattern.strip()
    if value == "*":
        return value
    if not value:
        raise PolicyError(
            "say who this applies to: an address, @domain or * for everyone", "pattern"
        )
    try:
        return normalize_sender(value, field="pattern")
    except UserError:
        raise PolicyError(
            f"{pattern!r} is not an email address (ann@example.com), "
            "a domain (@example.com) or * for everyone",
            "pattern",
        ) from None


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise PolicyError(f"mode must be one of {', '.join(MODES)}, not {mode!r}", "mode")
    return mode


def check_recipient_cap(cap: int | str) -> int:
    """The per-recipient cap as a number (a form or the CLI may give a string)."""
    try:
        value = int(cap)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_RECIPIENT_CAP:
        raise PolicyError(
            f"the per-recipient cap must be a whole number from 1 to {MAX_RECIPIENT_CAP}",
            "recipient_cap",
        )
    return value


def lookup_key(address: str) -> tuple[str, str]:
    """(exact, @domain) keys for an address, without raising on junk."""
    exact = address_key(address)
    return exact, "@" + exact.rpartition("@")[2]


def resolve(policies: dict[str, Policy], address: str) -> Policy:
    """The policy for a sender address: exact > @domain > * > default."""
    exact, domain = lookup_key(address)
    for key in (exact, domain, "*"):
        policy = policies.get(key)
        if policy is not None:
            return policy
    return DEFAULT_POLICY


# --- policies -----------------------------------------------------------------


def set_policy(
    engine: Engine,
    pattern: str,
    *,
    mode: str | None = None,
    allow_opens: bool | None = None,
    allow_clicks: bool | None = None,
    allow_text_links: bool | None = None,
    per_recipient: bool | None = None,
    recipient_cap: int | None = None,
    notify: bool | None = None,
    new: bool = False,
    policy_id: int | None = None,
) -> Policy:
    """Create or update the policy for ``pattern``; None leaves a value as it is
    (or at its default for a new policy). Returns the stored policy.

    ``new``: refuse when ``pattern`` already has a policy (a form that adds).
    ``policy_id``: update that policy, whose pattern may change, unless
    another policy has the new one (a form that edits).
    """
    key = normalize_pattern(pattern)
    if mode is not None:
        check_mode(mode)
    if recipient_cap is not None:
        check_recipient_cap(recipient_cap)
    values: dict[str, Any] = {
        "mode": mode,
        "allow_opens": allow_opens,
        "allow_clicks": allow_clicks,
        "allow_text_links": allow_text_links,
        "per_recipient": per_recipient,
        "recipient_cap": recipient_cap,
        "notify": notify,
    }
    with session_scope(engine) as session:
        policy = session.exec(select(Policy).where(Policy.pattern == key)).first()
        if policy is not None and (new or (policy_id is not None and policy.id != policy_id)):
            raise PolicyError(f"there is already a policy for {key}; edit that one", "pattern")
        if policy_id is not None and policy is None:
            policy = session.get(Policy, policy_id)
            if policy is None:
                raise PolicyError("this policy no longer exists")
            policy.pattern = key
        if policy is None:
            policy = Policy(pattern=key)
        for name, value in values.items():
            if value is not None:
                setattr(policy, name, value)
        policy.updated_at = utcnow()
        session.add(policy)
        session.flush()
        session.refresh(policy)
    return policy


def policy_by_id(engine: Engine, policy_id: int) -> Policy | None:
    with session_scope(engine) as session:
        return session.get(Policy, policy_id)


def list_policies(engine: Engine) -> list[Policy]:
    """All policies, most specific first (addresses, domains, then ``*``)."""
    with session_scope(engine) as session:
        policies = list(session.exec(select(Policy)).all())
    return sorted(policies, key=_specificity)


def _specificity(policy: Policy) -> tuple[int, str]:
    if policy.pattern == "*":
        return 2, ""
    return (1 if policy.pattern.startswith("@") else 0), policy.pattern


def remove_policy(engine: Engine, pattern: str) -> None:
    key = normalize_pattern(pattern)
    _remove(engine, select(Policy).where(Policy.pattern == key), f"no policy for {key!r}")


def _remove(engine: Engine, query: SelectOfScalar[Any], missing: str) -> None:
    """Delete the row ``query`` finds; PolicyError(``missing``) when there is none."""
    with session_scope(engine) as session:
        row = session.exec(query).first()
        if row is None:
            raise PolicyError(missing)
        session.delete(row)


def describe(policy: Policy) -> str:
    """One line for people: ``@b.c  mode=always opens clicks per-recipient<=20``."""
    flags = [n.removeprefix("allow_").replace("_", "-") for n in _FLAGS if getattr(policy, n)]
    cap = f"cap={policy.recipient_cap}" if policy.per_recipient else ""
    return " ".join(p for p in (f"mode={policy.mode}", *flags, cap) if p)


def policy_values(source: object) -> dict[str, Any]:
    """The :data:`POLICY_FIELDS` of ``source`` (a form, the CLI's parsed
    arguments: anything with those attributes), for ``set_policy(**...)``."""
    return {name: getattr(source, name) for name in POLICY_FIELDS}


# --- suppressions ---------------------------------------------------------------


def add_suppression(
    engine: Engine, address: str, source: str = "cli", *, new: bool = False
) -> Suppression:
    """Never track ``address`` again; adding it twice is not an error unless ``new``.
    Returns the stored row (the first one when it was already there).

    Safe when two writers add the same address at once (two receivers taking one
    "stop tracking me" request, the CLI beside the dashboard): the insert does
    nothing on a conflict, so the later one finds the first's row instead of
    failing on the unique address.
    """
    key = normalize_address(address)
    if source not in SUPPRESSION_SOURCES:
        raise PolicyError(f"source must be one of {', '.join(SUPPRESSION_SOURCES)}")
    table = Suppression.__table__  # type: ignore[attr-defined]
    insert = insert_ignoring(table, "address", engine.dialect.name).returning(table.c.id)
    with session_scope(engine) as session:
        values = {"address": key, "source": source, "created_at": utcnow()}
        added = session.connection().execute(insert, values).first() is not None
        if not added and new:
            raise PolicyError(f"{key} is already on the list", "address")
        return session.exec(select(Suppression).where(Suppression.address == key)).one()


def list_suppressions(
    engine: Engine, search: str = "", limit: int | None = None
) -> list[Suppression]:
    """Suppressed addresses in order; ``search``: those containing that text."""
    query = select(Suppression).order_by(Suppression.address)
    if text := search.strip().lower():
        query = query.where(col(Suppression.address).contains(text, autoescape=True))
    with session_scope(engine) as session:
        return list(session.exec(query.limit(limit)).all())


def suppression_by_id(engine: Engine, suppression_id: int) -> Suppression | None:
    with session_scope(engine) as session:
        return session.get(Suppression, suppression_id)


def remove_suppression(engine: Engine, address: str) -> None:
    key = normalize_address(address)
    query = select(Suppression).where(Suppression.address == key)
    _remove(engine, query, f"{key!r} is not suppressed")


# --- the relay's view -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything the relay needs to decide, read in one go.

    Consent (shared/consent.py) is part of it, so the relay answers "may this
    recipient be tracked?" from memory: with no domain in opt-in mode it holds
    no addresses at all; otherwise every consented address.
    """

    policies: dict[str, Policy]
    suppressed: frozenset[str]
    consent_modes: Mapping[str, str] = field(default_factory=dict)
    consented: frozenset[str] = frozenset()

    def policy_for(self, address: str) -> Policy:
        return resolve(self.policies, address)

    def is_suppressed(self, address: str) -> bool:
        return lookup_key(address)[0] in self.suppressed

    def consent_allows(self, address: str) -> bool:
        """False only for a recipient in opt-in mode without a recorded consent."""
        return consent.allowed_by(self.consent_modes, self.consented, address)


def load_snapshot(engine: Engine) -> Snapshot:
    """Read all policies, suppressions and consent state (blocking: call it off
    the event loop)."""
    with session_scope(engine) as session:
        policies = list(session.exec(select(Policy)).all())
        suppressed = list(session.exec(select(Suppression.address)).all())
        modes, consented = consent.load_state(session)
    return Snapshot({p.pattern: p for p in policies}, frozenset(suppressed), modes, consented)


def snapshot_of(
    policies: Iterable[Policy],
    suppressed: Iterable[str] = (),
    consent_modes: Mapping[str, str] | None = None,
    consented: Iterable[str] = (),
) -> Snapshot:
    """A snapshot from values (tests, or a caller that already has the rows)."""
    return Snapshot(
        {normalize_pattern(p.pattern): p for p in policies},
        frozenset(lookup_key(a)[0] for a in suppressed),
        dict(consent_modes or {}),
        frozenset(address_key(a) for a in consented),
    )
