"""Who gets tracked: trigger headers + sender policy + suppression -> a Decision.

Trigger headers (all removed before forwarding, tracked or not):

* the configured header (default ``X-Track``): ``opens``/``open``,
  ``clicks``/``click``, ``all``/``on``/``yes``, ``none``/``off``/``no``,
  comma-separated, any case, white space (spaces, tabs, folding) ignored.
  The list is complete: ``opens`` alone means opens and not clicks;
* Mailgun's ``X-Mailgun-Track`` (yes/no), ``-Track-Opens`` (yes/no),
  ``-Track-Clicks`` (yes/no/htmlonly) and Postmark's ``X-PM-TrackOpens``
  (true/false), ``X-PM-TrackLinks`` (None/HtmlAndText/HtmlOnly/TextOnly), so
  tools written for those ESPs work unchanged.

An unknown value makes the message untracked, and the reason says which
header and value. When two headers disagree, "off" wins.

Bcc commands, for clients that cannot add a header (Outlook, phones,
webmail): a recipient at ``TRACKRELAY_COMMAND_DOMAIN`` (``trackrelay.invalid``
by default, a name that can never be delivered) is a command, never a
recipient (the handler answers 250 and forwards it nowhere):
``track@`` (opens and clicks), ``opens@``, ``clicks@``, ``notrack@``. Several
are one list (``opens@`` + ``clicks@`` = both); ``track@`` with ``notrack@``
contradicts itself and leaves the message untracked. With a header they are
combined like two headers (off wins). The decision's reasons name them:
"Bcc command track@trackrelay.invalid".

Precedence (DESIGN.md section 4): a suppressed recipient, or one without
consent in opt-in mode (shared/consent.py), is never tracked (the tracker
applies that per recipient); policy ``never`` or a ceiling
(``allow_*``) turns tracking off; a header may switch tracking on (mode
``header``) or off; otherwise the policy default (``always`` = on,
``header`` = off). Text-part links are tracked only when clicks are and the
policy allows text links (a header can still restrict them).

Policies, suppressions and consent state are read from the database through
:class:`PolicyCache`: a snapshot of those tables, loaded off the event loop
with ``asyncio.to_thread`` and kept for a few seconds. A message never waits
on the database except for the very first load; after that, a stale snapshot
is served while a background refresh runs (stale-while-revalidate), so a
policy, suppression or consent change takes effect within ``ttl`` seconds and a
database outage keeps the last known rules instead of blocking mail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Engine

from relay.headers import Field
from shared.models import Policy
from shared.policies import Snapshot, load_snapshot

log = logging.getLogger(__name__)

DIALECT_HEADERS = (
    "x-mailgun-track",
    "x-mailgun-track-opens",
    "x-mailgun-track-clicks",
    "x-pm-trackopens",
    "x-pm-tracklinks",
)
_YES = {"yes", "true", "on", "1"}
_NO = {"no", "false", "off", "0"}
# opens, html links, text links; None = "not said"
_Ask = tuple[bool | None, bool | None, bool | None]
_PM_LINKS: dict[str, _Ask] = {
    "none": (None, False, False),
    "htmlandtext": (None, True, True),
    "htmlonly": (None, True, False),
    "textonly": (None, False, True),
}


#: Bcc command local part -> what it asks, in the words of the tracking header.
COMMANDS = {"track": "all", "opens": "opens", "clicks": "clicks", "notrack": "none"}


def command_of(address: str, domain: str) -> str | None:
    """The local part (lower case) if ``address`` is at the command ``domain``, else None.

    The caller answers an unknown local part (not in :data:`COMMANDS`) itself."""
    local, at, host = address.rpartition("@")
    if not at or host.rstrip(".").lower() != domain:
        return None
    return local.lower()


def trigger_names(tracking_header: str) -> frozenset[str]:
    """Lower-case names of every header that asks for (or against) tracking."""
    return frozenset({tracking_header.lower(), *DIALECT_HEADERS})


@dataclass(frozen=True)
class Request:
    """What the message's headers asked for; None means "not said"."""

    opens: bool | None = None
    html_links: bool | None = None
    text_links: bool | None = None
    headers: tuple[tuple[str, str], ...] = ()
    invalid: str = ""
    commands: tuple[str, ...] = ()  # Bcc command addresses, in RCPT order

    @property
    def said_anything(self) -> bool:
        return any(v is not None for v in (self.opens, self.html_links, self.text_links))


def _squeeze(value: str) -> str:
    """Lower case, without any white space: a field folded with a tab (RFC 5322
    2.2.3 unfolding keeps the WSP after the CRLF) reads as one folded with a space."""
    return "".join(value.split()).lower()


def _own_header(value: str) -> _Ask | None:
    words = {_squeeze(w) for w in value.split(",")} - {""}
    if not words:
        return None
    opens = clicks = False
    for word in words:
        if word in ("opens", "open"):
            opens = True
        elif word in ("clicks", "click"):
            clicks = True
        elif word in ("all", "on", "yes"):
            opens = clicks = True
        elif word not in ("none", "off", "no"):
            return None
    if words & {"none", "off", "no"} and (opens or clicks):
        return None  # "none, opens" contradicts itself
    return opens, clicks, None if clicks else False


def _ask(name: str, value: str, own: str) -> _Ask | None:
    """What one header asks, or None if its value is not understood."""
    word = _squeeze(value)
    if name == own:
        return _own_header(value)
    if name == "x-mailgun-track":
        return (
            (True, True, None) if word in _YES else (False, False, False) if word in _NO else None
        )
    if name == "x-mailgun-track-opens" or name == "x-pm-trackopens":
        return (True, None, None) if word in _YES else (False, None, None) if word in _NO else None
    if name == "x-mailgun-track-clicks":
        if word == "htmlonly":
            return None, True, False
        return (None, True, None) if word in _YES else (None, False, False) if word in _NO else None
    if name == "x-pm-tracklinks":
        return _PM_LINKS.get(word)
    return None


def _combine(old: bool | None, new: bool | None) -> bool | None:
    if new is None:
        return old
    if old is None:
        return new
    return old and new  # off wins


def parse_triggers(fields: Iterable[Field], tracking_header: str) -> Request:
    """Read the trigger headers among ``fields`` (other fields are ignored)."""
    own = tracking_header.lower()
    names = trigger_names(tracking_header)
    opens = html = text = None
    seen: list[tuple[str, str]] = []
    for f in fields:
        if f.name not in names:
            continue
        value = f.value
        display = f.raw.partition(b":")[0].decode("latin-1").strip()
        seen.append((display, value))
        asked = _ask(f.name, value, own)
        if asked is None:
            return Request(headers=tuple(seen), invalid=f"{display}: {value!r} is not understood")
        opens = _combine(opens, asked[0])
        html = _combine(html, asked[1])
        text = _combine(text, asked[2])
    return Request(opens, html, text, tuple(seen))


def with_commands(request: Request, commands: Iterable[str]) -> Request:
    """``request`` with the Bcc ``commands`` (addresses at the command domain) added."""
    commands = tuple(commands)
    if not commands:
        return request
    words = ",".join(COMMANDS[address.rpartition("@")[0].lower()] for address in commands)
    asked = _own_header(words)
    if request.invalid or asked is None:
        invalid = request.invalid or f"Bcc commands {', '.join(commands)} contradict each other"
        return replace(request, commands=commands, invalid=invalid)
    return replace(
        request,
        opens=_combine(request.opens, asked[0]),
        html_links=_combine(request.html_links, asked[1]),
        text_links=_combine(request.text_links, asked[2]),
        commands=commands,
    )


@dataclass(frozen=True)
class Decision:
    """What may be tracked for a message (before suppression and content)."""

    opens: bool
    html_links: bool
    text_links: bool
    per_recipient: bool
    recipient_cap: int
    notify: bool
    policy: str  # the pattern that matched, or 'default'
    mode: str
    reasons: tuple[str, ...] = field(default=())

    @property
    def clicks(self) -> bool:
        return self.html_links or self.text_links

    @property
    def anything(self) -> bool:
        return self.opens or self.clicks

    def as_dict(self) -> dict[str, Any]:
        return {
            "opens": self.opens,
            "html_links": self.html_links,
            "text_links": self.text_links,
            "per_recipient": self.per_recipient,
            "recipient_cap": self.recipient_cap,
            "policy": self.policy,
            "mode": self.mode,
            "reasons": list(self.reasons),
        }


def off(reason: str, policy: Policy | None = None) -> Decision:
    """Nothing tracked, for ``reason``."""
    return Decision(
        False,
        False,
        False,
        False,
        policy.recipient_cap if policy else 0,
        policy.notify if policy else False,
        (policy.pattern or "default") if policy else "",
        policy.mode if policy else "",
        (reason,),
    )


def decide(request: Request, policy: Policy) -> Decision:
    """Combine what the headers asked with the sender's policy (precedence above)."""
    name = policy.pattern or "default"
    where = f"policy {name}"
    if request.invalid:
        return off(f"untracked: {request.invalid}", policy)
    if policy.mode == "never":
        return off(f"{where}: mode never", policy)
    reasons: list[str] = []
    always = policy.mode == "always"
    opens = html = always
    text: bool | None = None if always else False
    if always:
        reasons.append(f"{where}: mode always")
    if request.said_anything:
        if request.headers:
            reasons.append("header " + ", ".join(f"{n}: {v}" for n, v in request.headers))
        reasons += [f"Bcc command {address}" for address in request.commands]
        opens = request.opens if request.opens is not None else opens
        html = request.html_links if request.html_links is not None else html
        text = request.text_links if request.text_links is not None else (None if html else text)
    elif not always:
        reasons.append(f"{where}: mode header, no tracking header")
    if text is None:
        text = html and policy.allow_text_links
    for wanted, allowed, what in (
        (opens, policy.allow_opens, "opens"),
        (html or text, policy.allow_clicks, "clicks"),
        (text, policy.allow_text_links or not policy.allow_clicks, "text links"),
    ):
        if wanted and not allowed:
            reasons.append(f"{where}: {what} not allowed")
    opens = opens and policy.allow_opens
    html = html and policy.allow_clicks
    text = bool(text) and policy.allow_clicks and policy.allow_text_links
    return Decision(
        opens,
        html,
        text,
        policy.per_recipient,
        policy.recipient_cap,
        policy.notify,
        name,
        policy.mode,
        tuple(reasons),
    )


class PolicyUnavailable(Exception):
    """No policy snapshot could be loaded (the database is down at start)."""


class PolicyCache:
    """A short-lived snapshot of policies and suppressions (see module docstring)."""

    def __init__(self, engine: Engine, ttl: float = 5.0, retry: float = 1.0) -> None:
        self._engine = engine
        self._ttl = ttl
        self._retry = retry
        self._snapshot: Snapshot | None = None
        self._loaded_at = 0.0
        self._failed_at = -retry
        self._refresh: asyncio.Task[None] | None = None

    async def get(self) -> Snapshot:
        now = time.monotonic()
        if self._snapshot is None:
            if now - self._failed_at < self._retry:
                raise PolicyUnavailable("the policy store was unreachable a moment ago")
            await self._start_refresh()
            if self._snapshot is None:
                raise PolicyUnavailable("cannot read policies from the database")
        elif now - self._loaded_at > self._ttl and now - self._failed_at > self._retry:
            self._start_refresh()  # serve the stale snapshot meanwhile
        return self._snapshot

    def invalidate(self) -> None:
        """Make the next ``get`` refresh (e.g. after this process changed a policy)."""
        self._loaded_at = 0.0

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._load())
        return self._refresh

    async def _load(self) -> None:
        try:
            snapshot = await asyncio.to_thread(load_snapshot, self._engine)
        except Exception as exc:
            self._failed_at = time.monotonic()
            log.warning("cannot refresh tracking policies, keeping the last ones: %s", exc)
            return
        self._snapshot = snapshot
        self._loaded_at = time.monotonic()
