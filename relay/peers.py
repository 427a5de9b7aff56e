"""Who may talk to a listener: client networks, and a verified TLS client name.

One owner for "this port serves only these peers", used by every restricted
listener (the plain port: the trusted networks; the gateway: the
organisation's MTA; any listener that needs the same). A :class:`Peers` is
asked twice:

* when the connection is made, :meth:`Peers.refuse_address`: a client
  address outside :attr:`Peers.networks` gets ``554 5.7.1`` instead of the
  greeting and is disconnected;
* when TLS is up (implicit TLS at once, STARTTLS after the handshake),
  :meth:`Peers.refuse_certificate`, if :attr:`Peers.client_names` is set:
  the client certificate must have verified (the listener's context asks
  for one, :func:`ask_for_certificates`) and name one of them, else
  ``554 5.7.1`` and the connection is closed. A listener that checks names
  requires STARTTLS before MAIL (aiosmtpd answers ``530`` until then), so a
  client can never send mail without showing its certificate.

A certificate that does not verify (unknown CA, expired) fails the TLS
handshake itself: OpenSSL gives no way to finish a handshake on a
certificate it could not verify while asking for one. The peer's MTA sees a
TLS failure and keeps the mail queued; the refusal is logged.

Each refusal is logged at WARNING with the listener, the peer and why: the
operator reads there why an MTA's mail does not arrive.

Names are compared case-insensitively and literally with the certificate's
DNS names (subjectAltName dNSName entries, else the subject's commonName): a
wildcard name in a certificate (``*.example.com``) matches only the same
wildcard written in the setting, never a name it would cover.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import IPNetwork, SettingsError

log = logging.getLogger(__name__)

REFUSED = "554 5.7.1 {reason}"


@dataclass(frozen=True)
class Peers:
    """The peers one listener serves (see the module docstring)."""

    listener: str  # for the log line: "plain", "gateway"...
    networks: tuple[IPNetwork, ...]
    client_names: frozenset[str] = field(default_factory=frozenset)  # lower case
    serves: str = "the listed networks"  # who, in the refusal: "trusted networks"

    @classmethod
    def of(
        cls,
        listener: str,
        networks: Iterable[IPNetwork],
        names: Iterable[str] = (),
        serves: str = "",
    ) -> Peers:
        return cls(
            listener,
            tuple(networks),
            frozenset(n.lower() for n in names),
            serves or "the listed networks",
        )

    @property
    def needs_certificate(self) -> bool:
        return bool(self.client_names)

    def refuse_address(self, ip: str) -> str | None:
        """The reply line refusing a client at ``ip``, or None if it may connect."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            address = None
        if address is not None and any(address in network for network in self.networks):
            return None
        return self._refuse(ip, f"This port only serves {self.serves}", "not in the networks")

    def refuse_certificate(self, ip: str, peercert: dict[str, Any] | None) -> str | None:
        """The reply line refusing the TLS client at ``ip``, or None if its certificate
        (``SSLObject.getpeercert()``, verified by the handshake) names a client we serve."""
        if not self.client_names:
            return None
        names = certificate_names(peercert)
        if not names:
            return self._refuse(
                ip, "A TLS client certificate is required here", "no client certificate"
            )
        if not self.client_names.intersection(n.lower() for n in names):
            return self._refuse(
                ip,
                "TLS client certificate not accepted here",
                f"certificate names {', '.join(names)} are not in the accepted client names",
            )
        return None

    def _refuse(self, ip: str, text: str, why: str) -> str:
        log.warning("%s listener: refused %s (%s)", self.listener, ip or "?", why)
        return REFUSED.format(reason=text)


def certificate_names(peercert: dict[str, Any] | None) -> list[str]:
    """The DNS names a (verified) peer certificate carries: its subjectAltName
    dNSName entries, or else its subject commonName (RFC 6125 order)."""
    if not peercert:
        return []
    alt = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    if alt:
        return list(alt)
    return [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]


def ask_for_certificates(context: ssl.SSLContext, ca: Path | None, setting: str) -> None:
    """Make a listener's server ``context`` ask TLS clients for a certificate and
    verify it against the system CAs and ``ca`` (a PEM file or a directory of
    them). A server context from ``create_default_context`` has none loaded."""
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    if ca is None:
        return
    try:
        if ca.is_dir():
            context.load_verify_locations(capath=str(ca))
        else:
            context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"{setting}: cannot read {ca}: {exc}") from None
