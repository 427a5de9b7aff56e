"""The Tracker: the relay's one way into the tracking pipeline, and where it fails open.

The handler calls :meth:`Tracker.prepare` once per DATA: it reads the policy
snapshot (PolicyCache: a message never waits on the database but for the
first load), runs the steps of relay/pipeline.py and returns the Prepared
copies. The steps are CPU only; a message above :data:`OFFLOAD_BYTES` runs
them in a worker thread, so a large attachment never stalls the event loop.

It fails open, here and only here (DESIGN.md section 5): any exception while
preparing gives one copy of the original bytes with only the trigger header
lines deleted (or the original bytes if even that fails), logged and counted
in :attr:`Tracker.metrics`. A rewriting bug never loses mail, and never leaks
the trigger headers upstream either.

The counters belong to the Tracker (one per relay; RelayServer.metrics), not
to the module: two relays in one process, or two tests, count apart.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Engine

from relay import pipeline
from relay.headers import delete_named, top_fields
from relay.links import ascii_host
from relay.policy import PolicyCache, PolicyUnavailable, trigger_names
from relay.prepared import Copy, MessageRecord, Prepared, Submission, message_record
from shared.config import Settings
from shared.policies import Snapshot
from shared.tokens import Signer, new_message_id

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 256 * 1024


@dataclass
class Counters:
    """For /metrics: messages prepared, tracked, and injection failures (sent untracked)."""

    prepared: int = 0
    tracked: int = 0
    failures: int = 0
    stamped_passed: int = 0  # gateway: already stamped here, passed on unchanged


class Tracker:
    """Prepares each submitted message for delivery (see module docstring)."""

    def __init__(self, settings: Settings, engine: Engine, cache_ttl: float = 5.0) -> None:
        base_url, host = _ascii_base(settings.base_url)
        self._setup = pipeline.Setup(
            Signer(settings.signing_keys()),
            base_url,
            host,
            settings.tracking_header,
            trigger_names(settings.tracking_header),
            settings.smtp_hostname,
        )
        self._policies = PolicyCache(engine, ttl=cache_ttl)
        self.metrics = Counters()

    async def prepare(self, submission: Submission) -> Prepared:
        """The copies to send for ``submission``; never raises."""
        self.metrics.prepared += 1
        try:
            try:
                snapshot: Snapshot | None = await self._policies.get()
            except PolicyUnavailable as exc:
                log.warning("message %d: %s; not tracking it", submission.message_id, exc)
                snapshot = None
            if len(submission.data) > OFFLOAD_BYTES:
                prepared = await asyncio.to_thread(self.prepare_sync, submission, snapshot)
            else:
                prepared = self.prepare_sync(submission, snapshot)
        except Exception:
            self.metrics.failures += 1
            log.exception(
                "message %d from %r: injection failed, sending it untracked",
                submission.message_id,
                submission.sender,
            )
            return self._fail_open(submission)
        if prepared.tracked_recipients:
            self.metrics.tracked += 1
        return prepared

    def prepare_sync(self, sub: Submission, snapshot: Snapshot | None) -> Prepared:
        """The steps of relay/pipeline.py on ``sub`` (it may raise: :meth:`prepare` does not)."""
        return pipeline.run(pipeline.Job.start(self._setup, sub, snapshot))

    def _fail_open(self, sub: Submission) -> Prepared:
        try:
            segments = delete_named(sub.data, self._setup.trigger_names)
        except Exception:
            log.exception("message %d: cannot even delete the trigger headers", sub.message_id)
            segments = [sub.data]
        copy = Copy(list(sub.recipients), segments)
        try:
            message = message_record(sub, top_fields(sub.data)[0])
        except Exception:
            message = MessageRecord(
                id=sub.message_id or new_message_id(), sender=sub.sender, listener=sub.listener
            )
        message.size_out = copy.size
        message.decision = json.dumps({"tracked": False, "reasons": ["injection failed"]})
        message.parts_modified = "[]"
        return Prepared([copy], message, [], set())


def _ascii_base(base_url: str) -> tuple[str, str]:
    """The receiver's base URL with an IDNA (UTS 46) host, and that host."""
    parts = urlsplit(base_url)
    host = ascii_host(parts.hostname or "")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), host
