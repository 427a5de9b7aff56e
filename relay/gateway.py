"""The gateway listener's handler: the organisation's MTA hands over its outgoing mail.

Exchange Online (outbound connector + mail flow rule), Google Workspace
(routing rule) and Postfix (after-queue content filter) send the
organisation's mail here and take it back on their return path. It is the
relay's handler (relay/handler.py: MAIL and RCPT forwarded live, DATA =
prepare -> deliver -> record, the same pipeline, deliverer and recorder) with
four differences, no more:

* who may send: no AUTH (the listener admits only the MTA's networks and TLS
  client names, relay/peers.py), and MAIL FROM must be in one of
  ``TRACKRELAY_GATEWAY_DOMAINS`` (550 5.7.1 otherwise, the null sender
  included): a mis-scoped connector must not make an open relay;
* where mail goes: ``TRACKRELAY_GATEWAY_UPSTREAM`` (default the upstream),
  without a login; plaintext only to loopback (shared/config.py); over TLS the
  relay's certificate (``TRACKRELAY_TLS_CERT``) is presented to a server that
  asks for a client certificate (an Exchange Online inbound connector with
  ``-TlsSenderCertificateName`` identifies the gateway by it);
* recipients are not limited (an organisation's mail to a large list);
* the stamp (relay/stamp.py): a message already carrying a valid
  ``X-Trackrelay-Processed`` is passed on byte for byte, counted
  (``Counters.stamped_passed``) and not recorded again (its first pass was);
  an invalid stamp is removed and the message handled as any other; every
  copy passed on carries a new stamp, tracked or not, also when the pipeline
  failed open (else the rule would route it here again).

Lossless as the rest of the relay: the MTA gets 250 only once the return path
accepted and the record is stored or journaled; a return path that is down or
refuses gives the MTA the 4xx/5xx, and the mail stays in its queue.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from sqlalchemy import Engine

from relay import stamp, upstream
from relay.handler import RelayHandler
from relay.headers import delete_fields
from relay.prepared import Copy, Prepared, Submission, message_record
from relay.record import Recorder
from relay.smtp import RelaySession
from relay.track import Tracker
from relay.upstream import Capabilities
from shared.config import Settings, Upstream

log = logging.getLogger(__name__)


class GatewayHandler(RelayHandler):
    """The relay's handler for the gateway listener (see the module docstring)."""

    def __init__(
        self, settings: Settings, engine: Engine, tracker: Tracker, recorder: Recorder
    ) -> None:
        super().__init__(settings, engine, tracker, recorder)
        self.target = settings.gateway_upstream_target
        self.domains = settings.gateway_domain_list
        self.stamp = stamp.Stamp(settings.signing_keys())
        self.offers_auth = False
        self.max_recipients = None
        self.capabilities = Capabilities(smtputf8=self.target.is_sink)
        self.client_cert: tuple[Path, Path] | None = None  # the relay's, set at start

    def use_certificate(self, cert: Path, key: Path) -> None:
        """Present the relay's certificate on the return path, to a server that asks
        (an Exchange Online inbound connector with TlsSenderCertificateName)."""
        self.client_cert = (cert, key)

    def refuse_sender(self, session: RelaySession, address: str) -> str | None:
        domain = address.strip("<>").rpartition("@")[2].rstrip(".").lower()
        if domain in self.domains:
            return None
        log.warning(
            "gateway: MAIL FROM %s from %s refused: not one of the gateway's domains",
            address,
            session.client_ip,
        )
        return f"550 5.7.1 <{address.strip('<>')}>: sender domain not served by this gateway"

    def connect_upstream(self) -> upstream.Connection:
        return upstream.connect(self.settings, target=self.target, client_cert=self.client_cert)

    async def probe_upstream(self, target: Upstream | None = None) -> None:
        await super().probe_upstream(target or self.target)

    async def prepare(self, submission: Submission) -> Prepared:
        seen = stamp.read(submission.data)
        if self.stamp.valid(seen):
            self.tracker.metrics.stamped_passed += 1
            log.info(
                "message %d: stamped by this deployment already, passed on unchanged",
                submission.message_id,
            )
            return _unchanged(submission)
        if seen.fields:
            log.info("message %d: an invalid %s removed", submission.message_id, stamp.HEADER)
            data = b"".join(delete_fields(submission.data, seen.fields))
            submission = replace(submission, data=data)
        prepared = await self.tracker.prepare(submission)
        line = self.stamp.line(seen.message_id)
        prepared.copies = stamp.stamped(prepared.copies, line)
        prepared.message.size_out += len(line)
        return prepared


def _unchanged(sub: Submission) -> Prepared:
    """One copy of the received bytes for every recipient, not recorded again."""
    message = message_record(sub, [])
    return Prepared([Copy(list(sub.recipients), [sub.data])], message, [], set(), record=False)
