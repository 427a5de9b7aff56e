"""Text as the database can keep it: what is STORED is sanitised, never what is relayed.

PostgreSQL ``text`` cannot hold NUL (psycopg refuses the whole statement), and
a Subject or From that decodes to NUL (``=?utf-8?q?nul=00inside?=``, or a raw
NUL byte) would make the relay's record end in the journal's rejected file:
the message then never shows in the dashboard or the API, on PostgreSQL only.
Other C0 controls (an escape sequence in a subject) and lone surrogates (from
undecodable bytes) are no better to keep. Each is replaced by U+FFFD, so the
reader sees that something was there; tab and newline stay (multi-line reply
texts). The message itself goes upstream byte for byte.
"""

from __future__ import annotations

import re

_UNSTORABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def storable(text: str) -> str:
    """``text`` with NUL, other C0 controls (not tab, newline), DEL and surrogates replaced."""
    return _UNSTORABLE.sub(REPLACEMENT, text)
