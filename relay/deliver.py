"""Deliver the prepared copies upstream: the step between prepare and record.

One copy for exactly the recipients the client gave: DATA in the upstream
transaction whose MAIL and RCPTs the client saw answered live, so each
refusal already reached the client verbatim. Several copies (per-recipient
attribution, Bcc recipients, suppressed recipients): RSET, then one full
transaction per copy on the same connection; a recipient the upstream
refuses there is refused in its :class:`Delivery`, and the client gets the
upstream's 250 when any copy was accepted (else the first refusal). An
upstream that vanishes gives 451 4.4.1: the client keeps the mail and retries.
"""

from __future__ import annotations

from relay import upstream
from relay.headers import Segment
from relay.prepared import Copy, Prepared, Submission
from relay.record import Delivery
from relay.upstream import UNAVAILABLE, Reply, UpstreamUnavailable


async def deliver(
    connection: upstream.Connection,
    submission: Submission,
    prepared: Prepared,
    options: list[str],
    refused_at_rcpt: list[tuple[str, Reply]],
) -> Delivery:
    """Send ``prepared.copies`` on ``connection`` (opened by MAIL); a reply per recipient."""
    copies = prepared.copies
    if len(copies) == 1 and sorted(copies[0].recipients) == sorted(submission.recipients):
        # One copy: DATA in the transaction whose RCPTs were checked live.
        reply = await _data(connection, copies[0].segments)
        replies = dict.fromkeys(submission.recipients, reply)
    else:
        # Per-recipient copies: one full transaction each, same connection.
        await connection.rset()
        replies = {}
        for copy in copies:
            replies.update(await _send_copy(connection, submission.sender, options, copy))
        # Back in RCPT order: the recorded positions are what the tokens carry,
        # whatever order the copies went out in (untracked copies go last).
        replies = {rcpt: replies[rcpt] for rcpt in submission.recipients if rcpt in replies}
    return Delivery(replies, refused_at_rcpt, _client_reply(replies))


async def _send_copy(
    connection: upstream.Connection, sender: str, options: list[str], copy: Copy
) -> dict[str, Reply]:
    try:
        reply = await connection.mail(sender, options)
        if not reply.ok:
            return dict.fromkeys(copy.recipients, reply)
        replies = {rcpt: await connection.rcpt(rcpt) for rcpt in copy.recipients}
        accepted = [rcpt for rcpt, r in replies.items() if r.ok]
        if not accepted:
            await connection.rset()
            return replies
        reply = await connection.data(copy.segments)
    except UpstreamUnavailable:
        return dict.fromkeys(copy.recipients, UNAVAILABLE)
    return {**replies, **dict.fromkeys(accepted, reply)}


async def _data(connection: upstream.Connection, segments: list[Segment]) -> Reply:
    try:
        return await connection.data(segments)
    except UpstreamUnavailable:
        return UNAVAILABLE


def _client_reply(replies: dict[str, Reply]) -> Reply:
    """250 (the upstream's) when any copy was accepted, else the first refusal."""
    for reply in replies.values():
        if reply.ok:
            return reply
    return next(iter(replies.values()), UNAVAILABLE)
