"""How many SMTP sessions one relay process serves: in all, and per client address.

Every session holds a socket, and one in a transaction a second one to the
upstream. Without a ceiling, one client opening ~1,100 idle connections (no
EHLO, each held for the idle timeout) used up an open-file limit of 1024:
SMTP, ``/healthz`` and the dashboard of the same process stopped answering,
and nothing was logged. So:

* at most ``TRACKRELAY_MAX_SESSIONS`` sessions per relay process and
  ``TRACKRELAY_MAX_SESSIONS_PER_IP`` from one client address; the next
  connection is greeted ``421 4.7.0`` and closed at once (RFC 5321 3.1: a
  server may answer the connection with 421 and close);
* an IPv6 client counts by its /64 (one host is commonly given a whole /64,
  so counting single addresses would not limit it); an IPv4-mapped address
  counts as the IPv4 address;
* a WARNING names the refused peer and the limit, at most once a minute per
  address and limit with the count refused meanwhile, so a flood of
  connections cannot flood the log as well;
* the greeting timeout (relay/smtp.py) and the TLS handshake timeout
  (relay/server.py) free a silent connection sooner than the idle timeout.

Why 300 and 50 by default: at the common soft limit of 1024 open files (not
raised, say under a service manager that sets it), 300 sessions use at most
600 descriptors (client + upstream), leaving ~400 for what else the process
holds — listening sockets, the database pool (SQLAlchemy's 5 + 10 overflow),
the event writer's pipe, journal files, and HTTP connections to the receiver
and dashboard. ``trackrelay serve`` raises the soft limit to the hard one at
start (typically 2^19 or more), where 300 is far from any limit. 50 per address
is Postfix's idea (``smtpd_client_connection_count_limit``, half its process
limit): a busy app server's pool fits, six addresses do not fill the relay.
Counted per process: ``TRACKRELAY_RELAY_WORKERS`` processes serve N times as
many, each within its own open-file limit.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_IP = "421 4.7.0 Too many connections from your address, try again later"
LOG_EVERY = 60.0  # seconds between two refusal lines for one address and limit


def client_key(ip: str) -> str:
    """What one client is, for the per-address limit: the IPv4 address, or the /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


class SessionLimits:
    """Counts the sessions of one relay process; :meth:`admit` then :meth:`release`."""

    def __init__(
        self, total: int, per_ip: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.per_ip = per_ip
        self._clock = clock
        self._active = 0
        self._by_ip: dict[str, int] = {}
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # -> (when, refused since)

    @property
    def active(self) -> int:
        return self._active

    def admit(self, ip: str, listener: str) -> str | None:
        """Count a new session from ``ip``; or the 421 to greet it with (then not counted)."""
        key = client_key(ip)
        if self._active >= self.total:
            self._refused(ip, key, listener, "TRACKRELAY_MAX_SESSIONS", self.total)
            return TOO_MANY_SESSIONS
        if self._by_ip.get(key, 0) >= self.per_ip:
            self._refused(ip, key, listener, "TRACKRELAY_MAX_SESSIONS_PER_IP", self.per_ip)
            return TOO_MANY_FROM_IP
        self._active += 1
        self._by_ip[key] = self._by_ip.get(key, 0) + 1
        return None

    def release(self, ip: str) -> None:
        """The session from ``ip`` that :meth:`admit` counted has ended."""
        ip = client_key(ip)
        self._active -= 1
        left = self._by_ip.get(ip, 0) - 1
        if left > 0:
            self._by_ip[ip] = left
        else:
            self._by_ip.pop(ip, None)

    def _refused(self, ip: str, client: str, listener: str, setting: str, limit: int) -> None:
        now = self._clock()
        key = (client, setting)
        last, since = self._logged.get(key, (now - LOG_EVERY, 0))
        if now - last < LOG_EVERY:
            self._logged[key] = (last, since + 1)
            return
        if len(self._logged) > 10_000:  # many one-off addresses: forget the old lines
            self._logged = {k: v for k, v in self._logged.items() if now - v[0] < LOG_EVERY}
        self._logged[key] = (now, 0)
        more = f" ({since} more refused since the last line)" if since else ""
        log.warning(
            "%s listener: refused %s: %s=%d sessions reached (%d open)%s",
            listener,
            ip,
            setting,
            limit,
            self._active,
            more,
        )
