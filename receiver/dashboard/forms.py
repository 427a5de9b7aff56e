"""Reading the admin forms: text fields in, values and messages by field out.

The rules live once, in shared/ (policies, users, webhooks, consent); a form
only turns strings and checkboxes into values, asks those rules about every
field, and collects each :class:`~shared.users.UserError` under the field it
names, so the page shows every message next to its input at once. The
messages are the shared ones, written as sentences; only radio-button choices
get their own wording (``say``), because the person sees labels there, not values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TypeVar

from sqlalchemy import Engine

from shared import policies
from shared.errors import UserError
from shared.models import Policy
from shared.users import (
    check_password,
    check_role,
    check_username,
    normalize_addresses,
)

T = TypeVar("T")

MODE_LABELS = {
    "header": "Track when the message asks (X-Track header)",
    "always": "Always track",
    "never": "Never track",
}
ROLE_LABELS = (
    ("sender", "Sender — sees mail from their own addresses"),
    ("admin", "Administrator"),
)


def sentence(text: str) -> str:
    """A shared message (``'x' is not ...``) as a sentence for a page."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def message(exc: UserError) -> str:
    return sentence(str(exc))


class Errors(dict[str, str]):
    """Messages by field ('' for the form as a whole); the first per field wins."""

    def add(self, exc: UserError, say: str = "") -> None:
        self.setdefault(exc.field, say or message(exc))

    def check(self, rule: Callable[..., T], *args: object, say: str = "") -> T | None:
        """``rule(*args)``, or None with its message (or ``say``) kept."""
        try:
            return rule(*args)
        except UserError as exc:
            self.add(exc, say)
            return None


@contextmanager
def filed_under(name: str) -> Iterator[None]:
    """A :class:`UserError` raised inside is about ``name``: the input (or the form) it came from.

    For rules that cannot know which input they checked: ``no user 'x'`` is
    about the token form's user list, a bad mode about the consent form it came from.
    """
    try:
        yield
    except UserError as exc:
        exc.field = name
        raise


def text(form: Mapping[str, str], name: str) -> str:
    return form.get(name, "").strip()


def checked(form: Mapping[str, str], name: str) -> bool:
    return form.get(name) == "on"


def lines(value: str) -> list[str]:
    """A textarea of addresses: one per line (commas work too)."""
    return [item for item in value.replace(",", "\n").split() if item]


# --- policies ---


@dataclass
class PolicyForm:
    pattern: str = ""
    mode: str = "header"
    allow_opens: bool = True
    allow_clicks: bool = True
    allow_text_links: bool = False
    per_recipient: bool = True
    recipient_cap: str = "20"
    notify: bool = False

    @classmethod
    def of(cls, policy: Policy) -> PolicyForm:
        values = {f.name: getattr(policy, f.name) for f in fields(cls)}
        return cls(**values | {"recipient_cap": str(policy.recipient_cap)})

    @classmethod
    def parse(cls, form: Mapping[str, str]) -> tuple[PolicyForm, Errors]:
        data = cls(
            pattern=text(form, "pattern"),
            mode=form.get("mode", ""),
            allow_opens=checked(form, "allow_opens"),
            allow_clicks=checked(form, "allow_clicks"),
            allow_text_links=checked(form, "allow_text_links"),
            per_recipient=checked(form, "per_recipient"),
            recipient_cap=text(form, "recipient_cap"),
            notify=checked(form, "notify"),
        )
        errors = Errors()
        data.pattern = errors.check(policies.normalize_pattern, data.pattern) or data.pattern
        # radio buttons: say what to choose in the words the person sees
        errors.check(
            policies.check_mode,
            data.mode,
            say="Choose when to track: when asked, always, or never.",
        )
        errors.check(policies.check_recipient_cap, data.recipient_cap)
        return data, errors

    def save(self, engine: Engine, policy_id: int | None = None) -> Policy:
        """Add (``policy_id`` None) or change a policy; PolicyError as shared says."""
        values = policies.policy_values(self)
        values["recipient_cap"] = policies.check_recipient_cap(self.recipient_cap)
        return policies.set_policy(
            engine, self.pattern, **values, new=policy_id is None, policy_id=policy_id
        )


# --- users ---


@dataclass
class UserForm:
    username: str = ""
    role: str = "sender"
    addresses: list[str] = field(default_factory=list)
    password: str = ""

    @classmethod
    def parse(cls, form: Mapping[str, str], *, new: bool) -> tuple[UserForm, Errors]:
        data = cls(
            username=text(form, "username"),
            role=form.get("role", ""),
            addresses=lines(form.get("addresses", "")),
            password=form.get("password", ""),
        )
        errors = Errors()
        if new:
            errors.check(check_username, data.username)
        errors.check(check_role, data.role, say="Choose a role: administrator or sender.")
        data.addresses = errors.check(normalize_addresses, data.addresses) or data.addresses
        if new or data.password:
            errors.check(check_password, data.password)
        return data, errors
