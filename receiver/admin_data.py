"""Policies, suppressions and users as the dashboard edits them, with validation.

Every function validates first and raises :class:`ValidationFailed` with
messages written for the person filling in the form (keyed by field), so the
dashboard can show them next to the inputs. Kept in one module so it can be
replaced by a shared policy module without touching the pages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, func
from sqlmodel import col, select

from shared.db import session_scope
from shared.models import Policy, Suppression, User, UserAddress, utcnow
from shared.passwords import hash_password
from shared.users import ROLES, UserError, normalize_address

MODES = {
    "header": "Track when the message asks (X-Track header)",
    "always": "Always track",
    "never": "Never track",
}
MAX_RECIPIENT_CAP = 1000


class ValidationFailed(ValueError):
    """``errors`` maps a form field ('' for the whole form) to a sentence."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = errors


@dataclass
class PolicyInput:
    pattern: str = ""
    mode: str = "header"
    allow_opens: bool = True
    allow_clicks: bool = True
    allow_text_links: bool = False
    per_recipient: bool = True
    recipient_cap: int = 20
    notify: bool = False

    @classmethod
    def from_policy(cls, policy: Policy) -> PolicyInput:
        return cls(
            pattern=policy.pattern,
            mode=policy.mode,
            allow_opens=policy.allow_opens,
            allow_clicks=policy.allow_clicks,
            allow_text_links=policy.allow_text_links,
            per_recipient=policy.per_recipient,
            recipient_cap=policy.recipient_cap,
            notify=policy.notify,
        )


def parse_policy(form: Mapping[str, str]) -> tuple[PolicyInput, dict[str, str]]:
    """Read a submitted form; return what was understood and the errors."""
    errors: dict[str, str] = {}
    data = PolicyInput(
        pattern=form.get("pattern", "").strip(),
        mode=form.get("mode", ""),
        allow_opens=form.get("allow_opens") == "on",
        allow_clicks=form.get("allow_clicks") == "on",
        allow_text_links=form.get("allow_text_links") == "on",
        per_recipient=form.get("per_recipient") == "on",
        notify=form.get("notify") == "on",
    )
    if not data.pattern:
        errors["pattern"] = "Enter who this applies to: an address, @domain, or * for everyone."
    elif data.pattern != "*":
        try:
            data.pattern = normalize_address(data.pattern)
        except UserError:
            errors["pattern"] = (
                f"“{data.pattern}” is not an email address (ann@example.com), "
                "a domain (@example.com) or * for everyone."
            )
    if data.mode not in MODES:
        errors["mode"] = "Choose when to track: when asked, always, or never."
    cap = form.get("recipient_cap", "").strip()
    try:
        data.recipient_cap = int(cap)
        if not 1 <= data.recipient_cap <= MAX_RECIPIENT_CAP:
            raise ValueError
    except ValueError:
        errors["recipient_cap"] = (
            f"The per-recipient limit must be a whole number from 1 to {MAX_RECIPIENT_CAP}."
        )
    return data, errors


def list_policies(engine: Engine) -> list[Policy]:
    with session_scope(engine) as session:
        rows = session.exec(select(Policy)).all()
    # Most specific first, the order in which they apply: address, @domain, *.
    return sorted(rows, key=lambda p: (p.pattern == "*", p.pattern.startswith("@"), p.pattern))


def get_policy(engine: Engine, policy_id: int) -> Policy | None:
    with session_scope(engine) as session:
        return session.get(Policy, policy_id)


def save_policy(engine: Engine, data: PolicyInput, policy_id: int | None = None) -> Policy:
    """Create (``policy_id`` None) or update a policy; patterns are unique."""
    with session_scope(engine) as session:
        clash = session.exec(select(Policy).where(Policy.pattern == data.pattern)).first()
        if clash is not None and clash.id != policy_id:
            raise ValidationFailed(
                {"pattern": f"There is already a policy for {data.pattern}; edit that one."}
            )
        policy = (
            Policy(pattern=data.pattern) if policy_id is None else session.get(Policy, policy_id)
        )
        if policy is None:
            raise ValidationFailed({"": "This policy no longer exists."})
        for name, value in vars(data).items():
            setattr(policy, name, value)
        policy.updated_at = utcnow()
        session.add(policy)
        session.flush()
        session.refresh(policy)
        return policy


def delete_policy(engine: Engine, policy_id: int) -> Policy | None:
    with session_scope(engine) as session:
        policy = session.get(Policy, policy_id)
        if policy is not None:
            session.delete(policy)
        return policy


def list_suppressions(engine: Engine, search: str = "") -> list[Suppression]:
    with session_scope(engine) as session:
        query = select(Suppression).order_by(col(Suppression.created_at).desc())
        if search:
            query = query.where(col(Suppression.address).contains(search.strip().lower()))
        return list(session.exec(query.limit(500)).all())


def add_suppression(engine: Engine, address: str, source: str = "dashboard") -> Suppression:
    try:
        value = normalize_address(address)
    except UserError:
        raise ValidationFailed(
            {"address": f"“{address.strip()}” is not an email address (like ann@example.com)."}
        ) from None
    if value.startswith("@"):
        raise ValidationFailed(
            {"address": "Suppress one recipient address at a time, not a whole domain."}
        )
    with session_scope(engine) as session:
        if session.exec(select(Suppression).where(Suppression.address == value)).first():
            raise ValidationFailed({"address": f"{value} is already on the list."})
        row = Suppression(address=value, source=source)
        session.add(row)
        return row


def delete_suppression(engine: Engine, suppression_id: int) -> Suppression | None:
    with session_scope(engine) as session:
        row = session.get(Suppression, suppression_id)
        if row is not None:
            session.delete(row)
        return row


@dataclass
class UserInput:
    username: str = ""
    role: str = "sender"
    addresses: list[str] = field(default_factory=list)
    password: str = ""


def parse_user(form: Mapping[str, str], *, new: bool) -> tuple[UserInput, dict[str, str]]:
    errors: dict[str, str] = {}
    data = UserInput(
        username=form.get("username", "").strip(),
        role=form.get("role", ""),
        password=form.get("password", ""),
    )
    raw = [a for a in form.get("addresses", "").replace(",", "\n").split() if a]
    bad: list[str] = []
    for address in raw:
        try:
            data.addresses.append(normalize_address(address))
        except UserError:
            bad.append(address)
    data.addresses = list(dict.fromkeys(data.addresses))
    if new and not data.username:
        errors["username"] = "Enter a username."
    elif new and (len(data.username) > 255 or any(c.isspace() for c in data.username)):
        errors["username"] = "A username has no spaces and at most 255 characters."
    if data.role not in ROLES:
        errors["role"] = "Choose a role: administrator or sender."
    if bad:
        errors["addresses"] = "Not an address or @domain: " + ", ".join(bad) + ". Use one per line."
    if (new or data.password) and len(data.password) < 8:
        errors["password"] = "The password needs at least 8 characters."  # noqa: S105
    return data, errors


def get_user(engine: Engine, user_id: int) -> tuple[User, list[str]] | None:
    with session_scope(engine) as session:
        user = session.get(User, user_id)
        if user is None:
            return None
        rows = session.exec(select(UserAddress.address).where(UserAddress.user_id == user_id))
        return user, sorted(rows.all())


def update_user(engine: Engine, user_id: int, data: UserInput, *, acting_user_id: int) -> None:
    """Change role, addresses and (if given) password; never the last admin away."""
    with session_scope(engine) as session:
        user = session.get(User, user_id)
        if user is None:
            raise ValidationFailed({"": "This user no longer exists."})
        if user.role == "admin" and data.role != "admin":
            if user_id == acting_user_id:
                raise ValidationFailed({"role": "You cannot remove your own administrator role."})
            _keep_an_admin(session_admins(engine))
        user.role = data.role
        if data.password:
            user.password_hash = hash_password(data.password)
        session.add(user)
        existing = session.exec(select(UserAddress).where(UserAddress.user_id == user_id)).all()
        for row in existing:
            if row.address not in data.addresses:
                session.delete(row)
        have = {row.address for row in existing}
        for address in data.addresses:
            if address not in have:
                session.add(UserAddress(user_id=user_id, address=address))


def check_removable(engine: Engine, user_id: int, *, acting_user_id: int) -> User:
    with session_scope(engine) as session:
        user = session.get(User, user_id)
    if user is None:
        raise ValidationFailed({"": "This user no longer exists."})
    if user_id == acting_user_id:
        raise ValidationFailed({"": "You cannot remove yourself."})
    if user.role == "admin":
        _keep_an_admin(session_admins(engine))
    return user


def session_admins(engine: Engine) -> int:
    with session_scope(engine) as session:
        query = select(func.count()).select_from(User).where(User.role == "admin")
        return int(session.exec(query).one())


def _keep_an_admin(admins: int) -> None:
    if admins <= 1:
        raise ValidationFailed({"": "There must always be at least one administrator."})


def user_choices() -> Sequence[tuple[str, str]]:
    return (("sender", "Sender — sees mail from their own addresses"), ("admin", "Administrator"))
