"""The gateway's stamp: ``X-Trackrelay-Processed``, proof that this deployment passed
a message on, so the organisation's mail flow rule skips it and nothing loops.

Exchange Online's add-on pattern, Google's routing rule and Postfix's content
filter all send mail through the gateway and take it back; a rule that does
not recognise the returned mail would send it out again. The stamp is

    X-Trackrelay-Processed: 1.<key id, 2 hex>.<MAC, URL-safe base64>

where the MAC is HMAC-SHA256 (truncated to 128 bits) under the secret key
over a purpose label and the message's Message-ID, as shared/tokens.py signs
its tokens (a label per purpose, so a stamp can never pass for a token or the
other way round; the key id from ``shared.tokens.key_id``, so a stamp made
before a key rotation still verifies while the old key is listed in
``TRACKRELAY_OLD_SECRET_KEYS``). A message without a Message-ID is stamped
over the empty string: a copied stamp can at most make such a message pass
untracked, which is what an unstamped one risks anyway.

Pure bytes in, bytes out: :func:`read` finds the stamp fields of a message,
:meth:`Stamp.verify` judges them, :func:`stamped` puts the one new line in
front of each copy's bytes (the only header the gateway adds; trace fields
such as Received go on top too). Nothing here knows SMTP.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from relay.headers import Field, first, top_fields
from relay.prepared import Copy
from shared.tokens import key_id

HEADER = "X-Trackrelay-Processed"
NAME = HEADER.lower()
VERSION = "1"
_LABEL = b"trackrelay/processed\0"
_MAC_SIZE = 16


@dataclass(frozen=True)
class Seen:
    """A message's stamp fields and the Message-ID a stamp is made over."""

    fields: list[Field]  # every X-Trackrelay-Processed field, valid or not
    message_id: str


def read(data: bytes) -> Seen:
    """The stamp fields among the top-level header fields of ``data``."""
    fields, _ = top_fields(data)
    found = first(fields, "message-id")
    return Seen([f for f in fields if f.name == NAME], found.value if found else "")


class Stamp:
    """Makes stamps with the first key; verifies with any of them."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys or not keys[0]:
            raise ValueError("a signing key is required")
        self._key = keys[0]
        self._keys = {key_id(key): key for key in reversed(keys)}

    def value(self, message_id: str) -> str:
        return f"{VERSION}.{key_id(self._key):02x}.{_mac(self._key, message_id)}"

    def line(self, message_id: str) -> bytes:
        """The header line to add (CRLF: SMTP DATA)."""
        return f"{HEADER}: {self.value(message_id)}\r\n".encode("ascii")

    def verify(self, value: str, message_id: str) -> bool:
        version, _, rest = value.strip().partition(".")
        kid, _, mac = rest.partition(".")
        if version != VERSION or len(kid) != 2:
            return False
        try:
            key = self._keys.get(int(kid, 16))
        except ValueError:
            return False
        return key is not None and hmac.compare_digest(mac, _mac(key, message_id))

    def valid(self, seen: Seen) -> bool:
        """Whether any stamp field of the message was made here, for this Message-ID."""
        return any(self.verify(f.value, seen.message_id) for f in seen.fields)


def _mac(key: bytes, message_id: str) -> str:
    digest = hmac.digest(key, _LABEL + message_id.encode("utf-8", "surrogateescape"), "sha256")
    return base64.urlsafe_b64encode(digest[:_MAC_SIZE]).rstrip(b"=").decode("ascii")


def stamped(copies: list[Copy], line: bytes) -> list[Copy]:
    """Each copy with ``line`` in front of its bytes; nothing else changes."""
    return [Copy(copy.recipients, [line, *copy.segments]) for copy in copies]
