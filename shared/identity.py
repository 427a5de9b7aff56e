"""Who is asking: one identity for the dashboard's signed-in user and an API token.

Both act as a user with that user's dashboard role: ``admin`` sees and manages
everything; ``sender`` sees only mail whose envelope sender matches one of
their addresses (an address, or ``@domain``). The read model
(receiver/readmodel/) scopes every query by this object, so the dashboard and
the API cannot drift apart on who sees what. It lives in shared/ because the
token check (shared/apitokens.py) builds it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Viewer:
    """A user, their role, the addresses they send as, and the token they used."""

    user_id: int
    username: str
    role: str
    addresses: tuple[str, ...]
    token_id: int | None = None  # set when the caller came with an API token

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"
