"""How many SMTP sessions one relay serves: in all, and per client address.

Every session holds a socket, and one in a transaction a second one to the
upstream. Without a ceiling, one client opening ~1,100 idle connections (no
EHLO, each held for the idle timeout) used up an open-file limit of 1024:
SMTP, ``/healthz`` and the dashboard of the same process stopped answering,
and nothing was logged. So:

* at most ``TRACKRELAY_MAX_SESSIONS`` sessions per relay (all its workers) and
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
Counted per relay, not per process: with ``TRACKRELAY_RELAY_WORKERS`` > 1 the
parent makes one :class:`SharedCounts` before it forks, and every worker's
:class:`SessionLimits` counts in it, so N workers admit the limits in all,
whichever worker the kernel hands a connection to (a per-address limit split
N ways would not hold: one client's connections do not spread evenly).
:class:`SharedCounts` is a file-backed shared mapping: a total per worker and
an open-addressing table of the client keys' 64-bit hashes with a count per
worker, changed under ``lockf`` on its file, a lock the kernel releases when
its holder dies. A worker's column is its own, so the parent zeroes the
column of a worker that died (:meth:`SharedCounts.forget`) and its slots are
free again. What it costs per admit + release: BENCHMARKS.md ("Session limits
across workers").
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import mmap
import os
import struct
import tempfile
import time
import weakref
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


ADMITTED, OVER_TOTAL, OVER_PER_IP = 0, 1, 2  # what a count says of one more session


class SharedCounts:
    """Session counts shared by the worker processes of one relay (the module docstring).

    Made by the parent before it forks; each worker takes its column with
    :meth:`of_worker`. Layout of the mapping: ``workers`` totals (int64), then
    ``slots`` slots of a key hash (uint64, 0: empty) and a count per worker
    (int32). At most ``total`` sessions hold keys and ``slots`` > 2 x ``total``,
    so the table is never more than half full; an emptied slot is deleted by
    backward shift, so probes stay short and no tombstones pile up.
    """

    def __init__(self, total: int, workers: int) -> None:
        self.workers = workers
        self.worker = 0  # this process's column (of_worker)
        self.slots = 64
        while self.slots <= 2 * total:
            self.slots *= 2
        self._mask = self.slots - 1
        self._totals = struct.Struct(f"<{workers}q")
        self._slot = struct.Struct(f"<Q{workers}i")
        self._base = self._totals.size
        size = self._base + self.slots * self._slot.size
        fd, path = tempfile.mkstemp(prefix="trackrelay-sessions-")
        os.unlink(path)  # only the descriptor, inherited by the workers, names it
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        os.ftruncate(fd, size)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)

    def of_worker(self, number: int) -> SharedCounts:
        """This process is worker ``number`` (in the child, after the fork)."""
        self.worker = number
        return self

    @property
    def active(self) -> int:
        return sum(self._totals.unpack_from(self._map, 0))

    def admit(self, key: str, total: int, per_ip: int) -> int:
        """Count one more session of ``key`` if both limits allow: ADMITTED, else which one."""
        digest = _digest(key)
        with self._locked():
            totals = list(self._totals.unpack_from(self._map, 0))
            if sum(totals) >= total:
                return OVER_TOTAL
            index, entry = self._find(digest)
            if entry[0] == digest:
                if sum(entry[1:]) >= per_ip:
                    return OVER_PER_IP
                counts = list(entry[1:])
            else:  # a new key: its empty slot
                counts = [0] * self.workers
            counts[self.worker] += 1
            self._slot.pack_into(self._map, self._offset(index), digest, *counts)
            totals[self.worker] += 1
            self._totals.pack_into(self._map, 0, *totals)
        return ADMITTED

    def release(self, key: str) -> None:
        """One session of ``key`` that this worker admitted has ended."""
        digest = _digest(key)
        with self._locked():
            index, entry = self._find(digest)
            if entry[0] != digest or entry[1 + self.worker] <= 0:
                return  # not counted here (forgotten): nothing to give back
            counts = list(entry[1:])
            counts[self.worker] -= 1
            totals = list(self._totals.unpack_from(self._map, 0))
            totals[self.worker] -= 1
            self._totals.pack_into(self._map, 0, *totals)
            if any(counts):
                self._slot.pack_into(self._map, self._offset(index), digest, *counts)
            else:
                self._delete(index)

    def forget(self, worker: int) -> None:
        """Worker ``worker`` has ended (the parent): its sessions ended with it."""
        with self._locked():
            live = []
            for index in range(self.slots):
                digest, *counts = self._slot.unpack_from(self._map, self._offset(index))
                counts[worker] = 0
                if digest and any(counts):
                    live.append((digest, counts))
            self._map[self._base :] = bytes(len(self._map) - self._base)
            for digest, counts in live:
                index, _ = self._find(digest)
                self._slot.pack_into(self._map, self._offset(index), digest, *counts)
            totals = list(self._totals.unpack_from(self._map, 0))
            totals[worker] = 0
            self._totals.pack_into(self._map, 0, *totals)

    def _offset(self, index: int) -> int:
        return self._base + index * self._slot.size

    def _find(self, digest: int) -> tuple[int, tuple[int, ...]]:
        """The slot holding ``digest``, else the empty slot where it would go."""
        index = digest & self._mask
        while True:
            entry = self._slot.unpack_from(self._map, self._offset(index))
            if entry[0] == digest or entry[0] == 0:
                return index, entry
            index = (index + 1) & self._mask

    def _delete(self, hole: int) -> None:
        """Empty slot ``hole``, moving back the entries whose probe passed it."""
        index = hole
        while True:
            index = (index + 1) & self._mask
            entry = self._slot.unpack_from(self._map, self._offset(index))
            if entry[0] == 0:
                break
            home = entry[0] & self._mask
            # may the entry at index live at hole (hole lies between home and index)?
            if (index - home) & self._mask >= (index - hole) & self._mask:
                self._slot.pack_into(self._map, self._offset(hole), *entry)
                hole = index
        self._slot.pack_into(self._map, self._offset(hole), 0, *([0] * self.workers))

    def _locked(self) -> _FileLock:
        return _FileLock(self._fd)


class _FileLock:
    """``lockf`` on the shared file: between processes, released by the kernel if its
    holder dies (a worker killed mid-admit cannot stop the others)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


def _digest(key: str) -> int:
    """A client key's 64-bit hash, the same in every worker (0 marks an empty slot)."""
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return value or 1


class SessionLimits:
    """Counts the sessions of one relay; :meth:`admit` then :meth:`release`.

    In this process alone, or with ``shared`` in the :class:`SharedCounts` of
    all the relay's worker processes.
    """

    def __init__(
        self,
        total: int,
        per_ip: int,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCounts | None = None,
    ) -> None:
        self.total = total
        self.per_ip = per_ip
        self._clock = clock
        self._shared = shared
        self._active = 0
        self._by_ip: dict[str, int] = {}
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # -> (when, refused since)

    @property
    def active(self) -> int:
        """Sessions counted: this relay's (all its workers' when shared)."""
        return self._shared.active if self._shared is not None else self._active

    def admit(self, ip: str, listener: str) -> str | None:
        """Count a new session from ``ip``; or the 421 to greet it with (then not counted)."""
        key = client_key(ip)
        verdict = self._count(key)
        if verdict == OVER_TOTAL:
            self._refused(ip, key, listener, "TRACKRELAY_MAX_SESSIONS", self.total)
            return TOO_MANY_SESSIONS
        if verdict == OVER_PER_IP:
            self._refused(ip, key, listener, "TRACKRELAY_MAX_SESSIONS_PER_IP", self.per_ip)
            return TOO_MANY_FROM_IP
        return None

    def _count(self, key: str) -> int:
        if self._shared is not None:
            return self._shared.admit(key, self.total, self.per_ip)
        if self._active >= self.total:
            return OVER_TOTAL
        if self._by_ip.get(key, 0) >= self.per_ip:
            return OVER_PER_IP
        self._active += 1
        self._by_ip[key] = self._by_ip.get(key, 0) + 1
        return ADMITTED

    def release(self, ip: str) -> None:
        """The session from ``ip`` that :meth:`admit` counted has ended."""
        ip = client_key(ip)
        if self._shared is not None:
            self._shared.release(ip)
            return
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
            self.active,
            more,
        )
