"""The tracking pipeline as data: :data:`STEPS`, the steps of one message in order.

Like Mailman's ``pipelines/builtin.py`` (an ordered tuple of step names), so
the road reads as a list, and a new step is one function and one line. Each
step takes the :class:`Job` (the message, and what the steps before it found)
and either returns the :class:`Prepared` outcome, which ends the pipeline —
a guard clause: the message goes out untracked, for the reason it records —
or ``None``, and the next step runs. The last step always returns.

Before them :meth:`Job.start` reads the top-level header fields, finds the
trigger headers and starts the message's record; then:

0. ``message_id``: a message without a Message-ID gets one, as a submission
   server may add it (RFC 6409 section 8.3), into every copy and the record:
   replies and bounces name it (shared/answers.py), and it is how they are
   matched to the message. ``<trackrelay.<message id, hex>@<From's domain>>``:
   unique (the id is), and the same for a replayed job. Not added when a DKIM
   signature lists Message-ID (an absent field a signer covers must stay
   absent). The field is one new segment atop every copy (:func:`run`), so
   the received bytes are neither copied nor their offsets moved;
1. ``dkim``: a DKIM signature covers a trigger header: deleting it would break
   the signature, so the message goes out untouched;
2. ``strip_triggers``: delete the trigger headers (always, tracked or not);
3. ``policy`` (relay/policy.py): header + Bcc commands + sender policy -> a Decision;
4. ``recipients``: suppressed recipients, and recipients in opt-in consent
   mode without a consent, are never tracked (they get one untracked copy:
   the message minus the trigger headers);
5. ``plan`` (relay/rewrite.py), once: the eligible parts, their links, the
   pixel spot, the link positions;
6. ``render``, per copy: tokens signed for its recipient position (0 =
   message level), spliced into the bodies; the record says what was done.

These steps are CPU only (the policy snapshot is read before, by the
Tracker); relay/track.py runs them, off the event loop for large messages,
and fails open. The rest of the road of one DATA is in relay/handler.py:
prepare (here) -> deliver (relay/deliver.py) -> record (relay/record.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import getaddresses, parseaddr
from typing import Any

from relay import rewrite
from relay.headers import Field, Segment, delete_fields, dkim_signed_names, first, top_fields
from relay.policy import Decision, decide, off, parse_triggers, with_commands
from relay.prepared import (
    Copy,
    LinkRow,
    MessageRecord,
    Prepared,
    Submission,
    decoded,
    message_record,
)
from shared.policies import Snapshot, lookup_key
from shared.tokens import Signer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What the steps read from the settings: made once per relay (Tracker)."""

    signer: Signer
    base_url: str  # the receiver's, with an IDNA host
    host: str  # its host: links to it are never tracked
    own_header: str  # the configured trigger header (X-Track)
    trigger_names: frozenset[str]  # every trigger header, lower case
    id_host: str = ""  # the right side of an added Message-ID when From has no domain


#: The decision before the ``policy`` step made one.
UNDECIDED = off("not decided yet")


@dataclass
class Job:
    """One message on its way through :data:`STEPS`."""

    setup: Setup
    sub: Submission
    snapshot: Snapshot | None  # None: the policy store is unavailable
    fields: list[Field]  # the top-level header fields
    triggers: list[Field]
    record: MessageRecord
    covered: set[str] | None  # header names a DKIM signature covers; None: not signed
    cleaned: list[Segment] = field(default_factory=list)  # the message minus triggers
    decision: Decision = UNDECIDED
    left_out: dict[str, str] = field(default_factory=dict)  # recipient -> why untracked
    candidates: list[str] = field(default_factory=list)  # recipients who may be tracked
    plan: rewrite.Plan | None = None
    added: bytes = b""  # a header field the relay adds atop every copy (Message-ID)

    @classmethod
    def start(cls, setup: Setup, sub: Submission, snapshot: Snapshot | None) -> Job:
        """The job of ``sub``: its header fields and trigger headers found, its record begun."""
        fields, _ = top_fields(sub.data)
        triggers = [f for f in fields if f.name in setup.trigger_names]
        record = message_record(sub, fields)
        return cls(setup, sub, snapshot, fields, triggers, record, dkim_signed_names(fields))


Step = Callable[[Job], Prepared | None]


def message_id(job: Job) -> None:
    if first(job.fields, "message-id") is not None:
        return
    if job.covered is not None and "message-id" in job.covered:
        log.info("message %d: no Message-ID, and DKIM covers one: none added", job.sub.message_id)
        return
    value = added_message_id(job.sub.message_id, _from_address(job.fields), job.setup.id_host)
    data = job.sub.data
    newline = data.find(b"\n")
    eol = b"\n" if newline > 0 and data[newline - 1] != 13 else b"\r\n"  # as its first line
    job.added = b"Message-ID: " + value.encode() + eol  # run() puts it atop every copy
    job.record.message_id_header = value


def added_message_id(message_id: int, from_address: str, fallback_host: str) -> str:
    """The Message-ID the relay gives a message that has none (module docstring, step 0)."""
    domain = from_address.rpartition("@")[2].strip().lower()
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?", domain):
        domain = fallback_host or "trackrelay.invalid"
    return f"<trackrelay.{message_id:016x}@{domain}>"


def dkim(job: Job) -> Prepared | None:
    covered = job.covered
    if covered is None:
        return None
    names = sorted({f.name for f in job.triggers if f.name in covered})
    if not names:
        return None
    reason = f"DKIM signature covers {', '.join(names)}: message not modified"
    return untracked(job, [job.sub.data], off(reason))


def strip_triggers(job: Job) -> None:
    job.cleaned = delete_fields(job.sub.data, job.triggers)  # views: no copy of the message


def policy(job: Job) -> Prepared | None:
    request = with_commands(parse_triggers(job.triggers, job.setup.own_header), job.sub.commands)
    if job.snapshot is None:
        return untracked(job, job.cleaned, off("policy store unavailable"))
    sender = job.sub.sender.strip("<>") or _from_address(job.fields)
    decision = decide(request, job.snapshot.policy_for(sender))
    if request.invalid:
        log.info("message %d: %s", job.sub.message_id, request.invalid)
    if job.covered is not None and decision.anything:
        decision = off("DKIM-signed: body not modified", None)
    job.decision = decision
    if not decision.anything:
        return untracked(job, job.cleaned, decision)
    return None


def recipients(job: Job) -> Prepared | None:
    assert job.snapshot is not None  # the policy step returned otherwise
    job.left_out = _left_out(job.sub.recipients, job.snapshot)
    job.candidates = [r for r in job.sub.recipients if r not in job.left_out]
    if job.candidates:
        return None
    why = "all recipients suppressed"
    if "no consent" in job.left_out.values():
        why = "no recipient may be tracked (suppressed, or no consent in opt-in mode)"
    return untracked(job, job.cleaned, job.decision, why)


def plan(job: Job) -> Prepared | None:
    # The received bytes, trigger lines included: render cuts them.
    job.plan = rewrite.plan(job.sub.data, job.decision, job.setup.host)
    if not job.plan.parts:
        return untracked(job, job.cleaned, job.decision, "nothing to track", job.plan)
    return None


def render(job: Job) -> Prepared:
    sub, the_plan, decision, tracked = job.sub, job.plan, job.decision, job.candidates
    assert the_plan is not None  # the plan step ran
    per_recipient = decision.per_recipient and len(sub.recipients) <= decision.recipient_cap
    # One copy for the recipients in To and Cc (message-level tokens), unless per
    # recipient; a Bcc recipient always gets a copy of their own.
    visible = _visible_addresses(job.fields)
    group = [] if per_recipient else [r for r in tracked if lookup_key(r)[0] in visible]
    position = {r: i + 1 for i, r in reversed(list(enumerate(sub.recipients)))}
    copies = [Copy(group, _render(job, the_plan, 0))] if group else []
    copies += [Copy([r], _render(job, the_plan, position[r])) for r in tracked if r not in group]
    if job.left_out:
        copies.append(Copy(list(job.left_out), job.cleaned))
    message = job.record
    message.track_opens = the_plan.pixel
    message.track_clicks = bool(the_plan.links)
    message.per_recipient = per_recipient
    message.size_out = max(c.size for c in copies)
    notes = {
        "tracked": True,
        "copies": len(copies),
        "bcc_copies": len([r for r in tracked if r not in group]) if group else 0,
        "suppressed": [r for r, why in job.left_out.items() if why == "suppressed"],
        "no_consent": [r for r, why in job.left_out.items() if why == "no consent"],
    }
    message.decision = _decision_json(decision, the_plan, notes)
    message.parts_modified = json.dumps([_part_json(p) for p in the_plan.parts])
    links = [LinkRow(sub.message_id, i, url) for i, url in enumerate(the_plan.links, start=1)]
    log.info(
        "message %d: tracking opens=%s links=%d copies=%d (%s)",
        sub.message_id,
        message.track_opens,
        len(links),
        len(copies),
        "; ".join(decision.reasons),
    )
    return Prepared(copies, message, links, set(tracked))


STEPS: tuple[Step, ...] = (message_id, dkim, strip_triggers, policy, recipients, plan, render)


def run(job: Job) -> Prepared:
    """Run :data:`STEPS` on ``job`` until one returns the outcome (it may raise)."""
    for step in STEPS:
        prepared = step(job)
        if prepared is not None:
            if job.added:
                for copy in prepared.copies:
                    copy.segments.insert(0, job.added)
                prepared.message.size_out += len(job.added)
            return prepared
    raise AssertionError("the last step returns the outcome")


# --- helpers of the steps -----------------------------------------------------


def untracked(
    job: Job,
    segments: list[Segment],
    decision: Decision,
    note: str = "",
    the_plan: rewrite.Plan | None = None,
) -> Prepared:
    """One copy for every recipient, ``segments`` as it is; the record says why."""
    copy = Copy(list(job.sub.recipients), segments)
    message = job.record
    message.size_out = copy.size
    notes: dict[str, Any] = {"tracked": False}
    if note:
        notes["why"] = note
    message.decision = _decision_json(decision, the_plan, notes)
    message.parts_modified = "[]"
    log.info(
        "message %d: not tracked (%s)",
        job.sub.message_id,
        "; ".join([*decision.reasons, note] if note else decision.reasons),
    )
    return Prepared([copy], message, [], set())


def _render(job: Job, the_plan: rewrite.Plan, recipient: int) -> list[Segment]:
    """The bytes of one copy, with tokens for ``recipient`` (0: message level)."""
    signer, base_url, mid = job.setup.signer, job.setup.base_url, job.sub.message_id

    def link_url(position: int, url: str) -> str:
        return f"{base_url}/c/{signer.click_token(mid, recipient, position, url)}"

    pixel = f"{base_url}/o/{signer.open_token(mid, recipient)}.gif"
    return rewrite.render_segments(job.sub.data, the_plan, link_url, pixel, job.triggers)


def _from_address(fields: list[Field]) -> str:
    f = first(fields, "from")
    return parseaddr(f.value)[1] if f else ""


def _left_out(recipients: list[str], snapshot: Snapshot) -> dict[str, str]:
    """Recipients never tracked, in RCPT order, with why: suppressed, or in opt-in
    consent mode without a recorded consent (DESIGN.md section 4, first rule)."""
    out: dict[str, str] = {}
    for rcpt in recipients:
        if snapshot.is_suppressed(rcpt):
            out[rcpt] = "suppressed"
        elif not snapshot.consent_allows(rcpt):
            out[rcpt] = "no consent"
    return out


def _visible_addresses(fields: list[Field]) -> set[str]:
    """Normalised addresses in To and Cc (everyone else is a Bcc recipient)."""
    values = [decoded(f.value) for f in fields if f.name in ("to", "cc")]
    return {lookup_key(addr)[0] for _, addr in getaddresses(values) if addr}


def _part_json(p: rewrite.PartPlan) -> dict[str, Any]:
    part = p.body.part
    return {
        "part": part.path,
        "type": part.content_type,
        "encoding": part.cte,
        "charset": p.body.codec,
        "links": len(p.links),
        "pixel": p.pixel,
    }


def _decision_json(decision: Decision, the_plan: rewrite.Plan | None, notes: dict[str, Any]) -> str:
    out: dict[str, Any] = {**notes, **decision.as_dict()}
    if the_plan is not None:
        out["links_tracked"] = len(the_plan.links)
        out["pixel"] = the_plan.pixel
        if the_plan.skipped:
            out["links_skipped"] = the_plan.skipped
        if the_plan.left_alone:
            out["parts_left_alone"] = the_plan.left_alone
        if the_plan.disagreements:
            out["links_left_alone"] = the_plan.disagreements
    return json.dumps(out)
