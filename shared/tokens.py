"""Sign and verify open and click tokens; the relay and the receiver share this.

A token is URL-safe base64 (no padding) of::

    version(1) key_id(1) kind(1) message_id(8) recipient(2) [link(2) flag(1) url]  mac(16)

* ``mac`` is HMAC-SHA256 truncated to 128 bits over a purpose label and the
  payload. The kind is inside the payload and the label, so an open token can
  never be replayed as a click token, nor the other way round.
* ``key_id`` is derived from the key, so tokens signed with a retired key keep
  verifying while that key is listed in ``TRACKRELAY_OLD_SECRET_KEYS``.
* Click tokens carry their destination URL (raw-deflated when that is
  shorter): a redirect works without the database and can only go to a URL
  that was signed into the message.
* ``recipient`` is the 1-based RCPT position of a per-recipient copy, 0 for
  a message-level token; ``link`` is the link's position in the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

VERSION = 1
KIND_OPEN = 1
KIND_CLICK = 2
MAC_SIZE = 16
MAX_URL_BYTES = 8192

_HEAD = struct.Struct(">BBBQH")  # version, key id, kind, message id, recipient
_CLICK = struct.Struct(">HB")  # link position, url flag
_URL_RAW, _URL_DEFLATED = 0, 1
_LABELS = {KIND_OPEN: b"trackrelay/open\0", KIND_CLICK: b"trackrelay/click\0"}


class InvalidToken(ValueError):
    """Forged, truncated, of the other kind, or signed with an unknown key."""


@dataclass(frozen=True)
class OpenToken:
    message_id: int
    recipient: int


@dataclass(frozen=True)
class ClickToken:
    message_id: int
    recipient: int
    link: int
    url: str


def new_message_id() -> int:
    """A random 63-bit id (fits a signed BIGINT), never 0."""
    return secrets.randbits(63) or 1


def key_id(key: bytes) -> int:
    return hashlib.sha256(b"trackrelay key id\0" + key).digest()[0]


class Signer:
    """Signs with the first key; verifies with any of them."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys or not keys[0]:
            raise ValueError("a signing key is required")
        self._key_id = key_id(keys[0])
        self._mac = _KeyedMac(keys[0])
        self._keys: dict[int, list[_KeyedMac]] = {}
        for key in keys:
            self._keys.setdefault(key_id(key), []).append(_KeyedMac(key))

    # --- signing ---

    def open_token(self, message_id: int, recipient: int = 0) -> str:
        head = _HEAD.pack(VERSION, self._key_id, KIND_OPEN, message_id, recipient)
        return self._seal(KIND_OPEN, head)

    def click_token(self, message_id: int, recipient: int, link: int, url: str) -> str:
        flag, body = _url_body(url)
        head = _HEAD.pack(VERSION, self._key_id, KIND_CLICK, message_id, recipient)
        return self._seal(KIND_CLICK, head + _CLICK.pack(link, flag) + body)

    def _seal(self, kind: int, payload: bytes) -> str:
        mac = self._mac(kind, payload)
        return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")

    # --- verifying ---

    def verify_open(self, token: str) -> OpenToken:
        payload = self._open(token, KIND_OPEN)
        if len(payload) != _HEAD.size:
            raise InvalidToken("bad length")
        _, _, _, message_id, recipient = _HEAD.unpack(payload)
        return OpenToken(message_id, recipient)

    def verify_click(self, token: str) -> ClickToken:
        payload = self._open(token, KIND_CLICK)
        if len(payload) < _HEAD.size + _CLICK.size:
            raise InvalidToken("bad length")
        _, _, _, message_id, recipient = _HEAD.unpack_from(payload)
        link, flag = _CLICK.unpack_from(payload, _HEAD.size)
        body = payload[_HEAD.size + _CLICK.size :]
        if flag == _URL_DEFLATED:
            body = _inflate(body)
        elif flag != _URL_RAW:
            raise InvalidToken("bad url flag")
        try:
            url = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidToken("bad url") from exc
        return ClickToken(message_id, recipient, link, url)

    def _open(self, token: str, kind: int) -> bytes:
        """Decode and authenticate; return the payload without the MAC."""
        if not token.isascii() or len(token) > 2 * MAX_URL_BYTES:
            raise InvalidToken("not a token")
        try:
            # = base64.urlsafe_b64decode(token + padding), without its Python layers
            # (a pixel hit verifies one token: this is its hot path).
            data = binascii.a2b_base64(
                token.encode("ascii").translate(_FROM_URLSAFE) + _PADDING[len(token) % 4]
            )
        except (binascii.Error, ValueError) as exc:
            raise InvalidToken("not base64") from exc
        if len(data) < _HEAD.size + MAC_SIZE:
            raise InvalidToken("truncated")
        payload, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        version, kid, found_kind = payload[0], payload[1], payload[2]
        if version != VERSION:
            raise InvalidToken("unknown version")
        if found_kind != kind:
            raise InvalidToken("wrong kind")
        for keyed in self._keys.get(kid, ()):
            if hmac.compare_digest(mac, keyed(kind, payload)):
                return payload
        raise InvalidToken("bad signature")


class _KeyedMac:
    """HMAC-SHA256 (RFC 2104) with the keyed inner and outer states computed once.

    ``hmac.digest`` sets up an OpenSSL HMAC context on every call (~8 us);
    copying two ready SHA-256 states costs ~1.3 us, for the same bytes. Every
    pixel hit verifies one MAC and every copy of a newsletter signs ~30. The
    inner state has the purpose label already hashed in, one per kind.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = {
            kind: hashlib.sha256(key.translate(_IPAD) + label) for kind, label in _LABELS.items()
        }
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def __call__(self, kind: int, payload: bytes) -> bytes:
        inner = self._inner[kind].copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:MAC_SIZE]


_BLOCK = 64  # SHA-256 block size
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"===", b"==", b"=")  # by len(token) % 4
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _mac(key: bytes, kind: int, payload: bytes) -> bytes:
    """The reference computation (:class:`_KeyedMac` must always equal it)."""
    return hmac.digest(key, _LABELS[kind] + payload, "sha256")[:MAC_SIZE]


@lru_cache(maxsize=1024)
def _url_body(url: str) -> tuple[int, bytes]:
    """A URL as a click token carries it: (flag, raw or deflated bytes).

    Cached: every per-recipient copy of a message, and every message of a
    newsletter sent one recipient at a time, signs the same URLs again.
    """
    raw = url.encode("utf-8")
    packed = _deflate(raw)
    return (_URL_DEFLATED, packed) if len(packed) < len(raw) else (_URL_RAW, raw)


def _deflate(data: bytes) -> bytes:
    """Raw deflate with a 4 KiB window and small memory level.

    URLs are short: the default 32 KiB window and memLevel 8 compress them no
    better but cost ~85 us per call in buffer setup, against ~7 us here, and a
    newsletter signs ~30 of them per copy. ``_inflate`` (window 15) reads both.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -12, 4)
    return compressor.compress(data) + compressor.flush()


def _inflate(data: bytes) -> bytes:
    decompressor = zlib.decompressobj(-15)
    try:
        out = decompressor.decompress(data, MAX_URL_BYTES)
    except zlib.error as exc:
        raise InvalidToken("bad url") from exc
    if decompressor.unconsumed_tail or not decompressor.eof:
        raise InvalidToken("bad url")
    return out
