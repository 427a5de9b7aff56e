"""The message page's "Tracking decision" panel in words a sales person reads.

Pure: :class:`receiver.readmodel.DecisionFacts` (the decision record the relay
stored, the parts it changed, the delivery outcomes) goes in, sentences and
the technical record come out; the template only prints them. The panel
once printed the record field by field ("Policy: default", "Mode: header",
raw JSON); the people reading this page sell things, so it now says what
happened and why ("Opens and clicks tracked because the message asked for it
(X-Track)."), and the fields stay one click away for ops (:func:`technical`).

The relay words its reasons in relay/policy.py and relay/pipeline.py (the
receiver may not import the relay, and old records keep their old words):
each reason it can record is matched here by its words and said as a
sentence; a reason not matched is left to the technical record.
tests/receiver/dashboard/test_decision.py runs the real pipeline for every
shape, so a reworded reason fails a test here.

:data:`SENTENCES` is the panel's order, one function per fact, each giving
zero or more sentences; a new fact is one function and one line there (as
:func:`came_in`, the listener a message came in on).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from receiver.readmodel import DecisionFacts, Outcome

Sentence = Callable[[DecisionFacts], list[str]]

_POLICY = re.compile(r"^policy (?P<name>.*): (?P<what>[^:]*)$")
_INVALID = re.compile(r"^untracked: (?P<name>[^:]+): (?P<value>.*) is not understood$")
_HEADER_NAME = re.compile(r"(?:^|, )([A-Za-z0-9-]+): ")
_CEILINGS = {
    "opens not allowed": "open tracking",
    "clicks not allowed": "click tracking",
    "text links not allowed": "tracking links in the plain-text part",
}
_FIXED = {  # reasons that are the whole story of an untracked message
    "policy store unavailable": (
        "Not tracked: the tracking rules could not be read from the database when it was sent."
    ),
    "injection failed": (
        "Not tracked: adding tracking failed, so the message went out as written "
        "(only the tracking header removed)."
    ),
    "DKIM-signed: body not modified": (
        "Not tracked: the message is DKIM-signed, and changing its body would break "
        "the signature. Only the tracking header was removed."
    ),
}
_PART_KIND = {"text/html": "HTML part", "text/plain": "plain-text part"}
_LEFT_ALONE = {  # relay/mime.py's reasons a part is never touched
    "signed": "it is digitally signed",
    "encrypted": "it is encrypted",
    "report": "it is a delivery report",
    "tnef": "it is in Outlook's TNEF format",
    "calendar": "it is a calendar invitation",
    "message/rfc822": "it is a forwarded message",
    "attachment": "it is an attachment",
}
_SKIPPED = {  # relay/links.py's skip reasons, grouped as a reader sees them
    "sensitive": ("unsubscribe, password or signed link", "unsubscribe, password or signed links"),
    "placeholder": ("mail-merge placeholder", "mail-merge placeholders"),
    "scheme:mailto": ("email address link", "email address links"),
    "scheme:tel": ("phone number link", "phone number links"),
    "tracking-host": ("link to the tracking server", "links to the tracking server"),
}
_UNSAFE = "its format could not be changed safely"
_OTHER_LINK = ("link that is not a web address", "links that are not web addresses")
_NAMES_SHOWN = 3


def plural(count: int, one: str, many: str = "") -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


# --- the record, read ----------------------------------------------------------


def _reasons(f: DecisionFacts) -> list[str]:
    reasons = f.record.get("reasons", [])
    return [str(r) for r in reasons] if isinstance(reasons, list) else []


def _policy_phrase(name: str) -> str:
    if name in ("", "default"):
        return "the default policy"
    if name == "*":
        return "the policy for all senders"
    return f"the policy for {name}"


def _policy_says(reasons: Iterable[str]) -> list[tuple[str, str]]:
    """(who, what) of each ``policy NAME: WHAT`` reason, who as a phrase."""
    found = (_POLICY.match(r) for r in reasons)
    return [(_policy_phrase(m["name"]), m["what"]) for m in found if m]


def _asked_by(reasons: Iterable[str]) -> str:
    """The trigger headers the message carried ("X-Track") and the Bcc commands it was
    sent to ("Bcc track@trackrelay.invalid"), '' if none."""
    asked: list[str] = []
    for reason in reasons:
        if reason.startswith("header "):
            asked += _HEADER_NAME.findall(reason[len("header ") :])
        elif reason.startswith("Bcc command "):
            asked.append("Bcc " + reason[len("Bcc command ") :])
    return ", ".join(dict.fromkeys(asked))


def _tracked(f: DecisionFacts) -> bool:
    tracked = f.record.get("tracked")
    if isinstance(tracked, bool):
        return tracked
    return f.message.track_opens or f.message.track_clicks  # a record without the key


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def _names(addresses: list[str]) -> str:
    if len(addresses) > _NAMES_SHOWN:
        return plural(len(addresses), "recipient")
    if len(addresses) == 1:
        return addresses[0]
    return f"{', '.join(addresses[:-1])} and {addresses[-1]}"


def _addresses(f: DecisionFacts, key: str) -> list[str]:
    value = f.record.get(key, [])
    return [str(a) for a in value] if isinstance(value, list) else []


def _number(f: DecisionFacts, key: str) -> int:
    value = f.record.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- the sentences, in the panel's order -----------------------------------------


def why(f: DecisionFacts) -> list[str]:
    """What was tracked and why, or why nothing was."""
    reasons = _reasons(f)
    if not _tracked(f):
        return [_not_tracked(f, reasons)]
    m = f.message
    what = {
        (True, True): "Opens and clicks tracked",
        (True, False): "Opens tracked (not clicks)",
        (False, True): "Clicks tracked (not opens)",
    }.get((m.track_opens, m.track_clicks), "Tracked")
    asked = _asked_by(reasons)
    if asked:
        return [f"{what} because the message asked for it ({asked})."]
    always = [who for who, said in _policy_says(reasons) if said == "mode always"]
    if always:
        return [f"{what} because {always[0]} tracks every message."]
    return [f"{what}."]


def _not_tracked(f: DecisionFacts, reasons: list[str]) -> str:  # noqa: C901 - one guard per reason
    note = str(f.record.get("why", ""))
    if note == "all recipients suppressed":
        return "Not tracked: every recipient is on the suppression list."
    if note.startswith("no recipient may be tracked"):
        return (
            "Not tracked: no recipient may be tracked (on the suppression list, "
            "or no consent where consent is required)."
        )
    if note == "nothing to track":
        return "Not tracked: there was nothing in the message that could be tracked."
    for reason in reasons:
        if reason in _FIXED:
            return _FIXED[reason]
        if invalid := _INVALID.match(reason):
            return (
                f"Not tracked: the message's {invalid['name']} header says "
                f"“{_literal(invalid['value'])}”, which the relay does not understand."
            )
        if reason.startswith("DKIM signature covers "):
            names = reason[len("DKIM signature covers ") :].partition(":")[0]
            return (
                "Not tracked, and sent exactly as written: its DKIM signature covers the "
                f"tracking header ({_header_case(names)}), so removing it would break "
                "the signature."
            )
    for who, said in _policy_says(reasons):
        if said == "mode never":
            return f"Not tracked: {who} never tracks."
        if said == "mode header, no tracking header":
            return (
                f"Not tracked: the message did not ask for it, and {who} tracks only "
                "messages that do."
            )
    asked = _asked_by(reasons)
    if asked and any(said in _CEILINGS for _, said in _policy_says(reasons)):
        return f"Not tracked: the message asked for it ({asked}), but the policy does not allow it."
    if asked:
        return f"Not tracked: the message asked not to be ({asked})."
    return "Not tracked."


def _literal(value: str) -> str:
    try:
        text = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return text if isinstance(text, str) else value


def _header_case(names: str) -> str:
    words = (name.strip().split("-") for name in names.split(","))
    return ", ".join("-".join(w.capitalize() for w in name) for name in words)


def ceilings(f: DecisionFacts) -> list[str]:
    """What the sender's policy did not allow although it was asked for."""
    return [
        f"{_first_upper(who)} does not allow {_CEILINGS[said]}."
        for who, said in _policy_says(_reasons(f))
        if said in _CEILINGS
    ]


def left_out(f: DecisionFacts) -> list[str]:
    """Recipients of a tracked message who were never tracked."""
    out = []
    if suppressed := _addresses(f, "suppressed"):
        verb = "is" if len(suppressed) == 1 else "are"
        out.append(
            f"{_names(suppressed)} {verb} on the suppression list and got the message untracked."
        )
    if no_consent := _addresses(f, "no_consent"):
        verb = "has" if len(no_consent) == 1 else "have"
        out.append(
            f"{_names(no_consent)} {verb} not consented to tracking (consent is required "
            "for their address) and got the message untracked."
        )
    return out


def copies(f: DecisionFacts) -> list[str]:
    """How many tracked copies went out, and why one each or one for everyone."""
    if not _tracked(f) or "copies" not in f.record:
        return []
    untracked = 1 if _addresses(f, "suppressed") or _addresses(f, "no_consent") else 0
    tracked = _number(f, "copies") - untracked
    own = _number(f, "bcc_copies")
    if f.message.per_recipient:
        return [f"One copy per recipient: {plural(tracked, 'copy', 'copies')}."]
    if tracked - own > 1:  # no shared copy: every tracked recipient was in Bcc
        return [f"One copy per recipient (all in Bcc): {plural(tracked, 'copy', 'copies')}."]
    shared = "One copy for everyone, so opens and clicks count for the whole message"
    cap = _number(f, "recipient_cap")
    if f.record.get("per_recipient") is True and cap:
        shared += f" (more than {plural(cap, 'recipient')}: too many for one copy each)"
    if own:
        shared += f"; and {plural(own, 'own copy', 'own copies')} for Bcc recipients"
    return [f"{shared}: {plural(tracked, 'copy', 'copies')}."]


def changes(f: DecisionFacts) -> list[str]:
    """What tracking changed in the message: links and the pixel, and what it could not."""
    if not _tracked(f) and f.record.get("why") != "nothing to track":
        return []
    links: dict[str, int] = {}
    pixel = ""
    for part in f.parts:
        kind = _PART_KIND.get(str(part.get("type", "")), "part " + str(part.get("part", "")))
        count = part.get("links", 0)
        if isinstance(count, int) and count:
            links[kind] = links.get(kind, 0) + count
        if part.get("pixel") is True:
            pixel = pixel or f"pixel added in the {kind}"
    done = []
    if links:
        total = plural(sum(links.values()), "link")
        if len(links) > 1:
            where = ", ".join(f"{n} in the {kind}" for kind, n in links.items())
            done.append(f"{total} tracked ({where})")
        elif "HTML part" in links:
            done.append(f"{total} tracked")
        else:
            done.append(f"{total} tracked in the {next(iter(links))}")
    if pixel:
        done.append(pixel)
    out = [_first_upper(", ".join(done)) + "."] if done else []
    return out + _not_done(f, bool(links), bool(pixel))


def _not_done(f: DecisionFacts, links: bool, pixel: bool) -> list[str]:
    """Asked for but not done, when no other sentence says why."""
    out = []
    html_left_alone = any(p.get("type") == "text/html" for p in _left_alone(f))
    if f.record.get("opens") is True and not pixel and not html_left_alone:
        out.append("The message has no HTML part to carry the open pixel.")
    wanted = f.record.get("html_links") is True or f.record.get("text_links") is True
    explained = ("links_skipped", "links_left_alone", "parts_left_alone")
    if wanted and not links and not any(f.record.get(key) for key in explained):
        out.append("The message has no links to track.")
    return out


def _left_alone(f: DecisionFacts) -> list[dict[str, Any]]:
    parts = f.record.get("parts_left_alone", [])
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def left_as_written(f: DecisionFacts) -> list[str]:
    """Parts and links tracking did not touch, and why."""
    out = []
    for part in _left_alone(f):
        kind = _PART_KIND.get(str(part.get("type", "")), "part")
        why_not = _LEFT_ALONE.get(str(part.get("why", "")), _UNSAFE)
        out.append(f"The {kind} was left as written: {why_not}.")
    out = list(dict.fromkeys(out))
    skipped = f.record.get("links_skipped", {})
    if isinstance(skipped, dict) and skipped:
        groups: dict[tuple[str, str], int] = {}
        for reason, count in skipped.items():
            if isinstance(count, int):
                key = _SKIPPED.get(str(reason), _OTHER_LINK)
                groups[key] = groups.get(key, 0) + count
        details = ", ".join(plural(n, one, many) for (one, many), n in groups.items())
        total = sum(groups.values())
        out.append(f"{plural(total, 'link')} left as written, as always for these: {details}.")
    disagreements = f.record.get("links_left_alone", [])
    if isinstance(disagreements, list) and disagreements:
        out.append(
            "The links of the HTML part were left as written: its HTML could not be read "
            "with certainty, and a wrong link would be worse than an untracked one."
        )
    return out


def delivery(f: DecisionFacts) -> list[str]:
    """How many copies the server accepted."""
    total = f.accepted + f.refused
    if not total:
        return []
    if not f.refused:
        return [f"Delivered: {f.accepted} of {total} accepted by the server."]
    if not f.accepted:
        return [f"Not delivered: the server refused {'it' if total == 1 else f'all {total}'}."]
    return [
        f"Partly delivered: {f.accepted} of {total} accepted by the server, {f.refused} refused."
    ]


_CAME_IN = {
    "gateway": "Came in through the gateway, from the organisation's mail server.",
    "plain": "Came in on the plain port, from a trusted network.",
}


def came_in(f: DecisionFacts) -> list[str]:
    """The listener, where it is not a person's own submission (STARTTLS or TLS)."""
    said = _CAME_IN.get(f.message.listener)
    return [said] if said else []


SENTENCES: tuple[Sentence, ...] = (
    came_in,
    why,
    ceilings,
    left_out,
    copies,
    changes,
    left_as_written,
    delivery,
)


def sentences(f: DecisionFacts) -> list[str]:
    """The panel's sentences for ``f``, in :data:`SENTENCES` order, none twice."""
    return list(dict.fromkeys(s for say in SENTENCES for s in say(f)))


# --- the technical record --------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Technical:
    """The stored fields as they are, for ops: names as in the database."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


_MESSAGE_FIELDS = (
    "auth_user", "client_ip", "message_id_header", "size_in", "size_out", "status",
    "upstream_reply",
)  # fmt: skip


def technical(f: DecisionFacts) -> Technical:
    """Every field of the decision record and the message's delivery columns; lists
    of objects (parts changed, parts left alone) as tables."""
    out = Technical()
    for name in _MESSAGE_FIELDS:
        out.fields.append((name, _value(getattr(f.message, name))))
    if f.record:
        for key, value in f.record.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                out.tables.append(_table(key, value))
            else:
                out.fields.append((key, _value(value)))
    elif f.message.decision.strip():
        out.fields.append(("decision", f.message.decision))  # not JSON: as stored
    if f.parts:
        out.tables.append(_table("parts_modified", f.parts))
    return out


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return Table(title, columns, [[_value(row.get(c, "")) for c in columns] for row in rows])


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "; ".join(_value(v) for v in value) or "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) or "—"
    return "—" if value in ("", None) else str(value)


# --- the panel -------------------------------------------------------------------


@dataclass
class Panel:
    sentences: list[str]
    outcomes: list[Outcome]
    more: str  # recipients beyond the outcomes listed, '' if none
    technical: Technical


def panel(f: DecisionFacts) -> Panel:
    """Everything the "Tracking decision" panel prints."""
    more = ""
    if f.not_shown > 0:
        more = f"And {plural(f.not_shown, 'more recipient')}: see the recipients list."
    return Panel(sentences(f), f.outcomes, more, technical(f))
