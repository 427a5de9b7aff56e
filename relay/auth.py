"""Reading AUTH PLAIN / LOGIN credentials from the client, and failure limits.

aiosmtpd's ``authenticator`` callback is synchronous, but checking a password
against the upstream (or scrypt in a thread) is not: the handler implements
``auth_PLAIN`` / ``auth_LOGIN`` itself and uses :func:`read_plain` /
:func:`read_login` to get the raw credentials (bytes, exactly as sent, so
passthrough hands the upstream what the client typed).

:class:`FailureLimiter` counts failed logins per client IP and per user in a
sliding window, so the relay cannot be used to guess passwords of the
upstream's accounts. It lives in process memory: each relay replica counts
its own failures.
"""

from __future__ import annotations

import binascii
import time
from base64 import b64decode
from collections import deque
from collections.abc import Callable

from aiosmtpd.smtp import SMTP

Credentials = tuple[bytes, bytes]
MAX_TRACKED = 10_000


async def read_plain(server: SMTP, args: list[str]) -> Credentials | None:
    """``AUTH PLAIN [initial-response]``; None when an error was already sent."""
    blob = await _initial(server, args, "")
    if blob is None:
        return None
    parts = blob.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        await server.push("501 5.5.2 Can't split auth value")
        return None
    return parts[1], parts[2]


async def read_login(server: SMTP, args: list[str]) -> Credentials | None:
    """``AUTH LOGIN [username]`` then the password challenge."""
    username = await _initial(server, args, "Username:")
    if username is None:
        return None
    password = await server.challenge_auth("Password:")
    if not isinstance(password, bytes):
        return None
    return username, password


async def _initial(server: SMTP, args: list[str], challenge: str) -> bytes | None:
    """The initial response given with AUTH, else the answer to a challenge."""
    if len(args) == 1:
        answer = await server.challenge_auth(challenge)
        return answer if isinstance(answer, bytes) else None
    decoded = _decode(args[1])
    if decoded is None:
        await server.push("501 5.5.2 Can't decode base64")
    return decoded


def _decode(value: str) -> bytes | None:
    try:
        return b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


class FailureLimiter:
    """At most N failures per key within a sliding window of seconds."""

    def __init__(
        self,
        per_ip: int,
        per_user: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"ip": per_ip, "user": per_user}
        self._window = window
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def blocked(self, ip: str, user: str) -> bool:
        return self._count("ip", ip) >= self._limits["ip"] or (
            self._count("user", user.lower()) >= self._limits["user"]
        )

    def failed(self, ip: str, user: str) -> None:
        now = self._clock()
        if len(self._failures) > MAX_TRACKED:  # many one-off keys: forget the stale ones
            for key in [k for k, times in self._failures.items() if times[-1] < now - self._window]:
                del self._failures[key]
        for key in (("ip", ip), ("user", user.lower())):
            self._failures.setdefault(key, deque()).append(now)

    def _count(self, kind: str, value: str) -> int:
        times = self._failures.get((kind, value))
        if not times:
            return 0
        horizon = self._clock() - self._window
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._failures[(kind, value)]
        return len(times)
