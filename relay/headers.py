"""Header blocks read and edited as bytes, never re-serialised.

The ``email`` package refolds headers and reorders nothing but still changes
bytes when it writes a message back, which breaks DKIM signatures and makes
"what did the relay change?" impossible to answer. So header blocks are scanned
for field offsets, and the only edit ever made is deleting whole fields (the
tracking trigger headers) or replacing one whole field line (a part's
Content-Transfer-Encoding when a body must move to quoted-printable).

Works with CRLF (SMTP DATA) and bare LF (files) line endings alike.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

# A message on its way out: views of the received bytes, and new bytes where
# something changed. Slicing a 35 MB message or joining it again copies all of
# it; a view list keeps one copy of the received message from socket to upstream.
Segment = bytes | memoryview

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(rb"[^\n]*(?:\n|\Z)")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class Field:
    """One header field: ``name`` lower-cased, ``start:end`` spans its lines."""

    name: str
    start: int
    end: int
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value (latin-1 so no byte is lost), stripped."""
        _, _, value = self.raw.partition(b":")
        return _FOLD.sub(b"", value).strip().decode("latin-1")


def addr_specs(field: Field) -> list[str]:
    """The addresses of an address field (From, To...); UTF-8 read as such, and an
    empty string for a part the parser cannot read."""
    _, _, value = field.raw.partition(b":")
    text = _FOLD.sub(b"", value).decode("utf-8", "replace")
    return [address for _, address in getaddresses([text])]


def header_end(data: bytes, start: int = 0) -> tuple[int, int]:
    """Return ``(end_of_fields, body_start)`` for the header block at ``start``.

    ``end_of_fields`` includes the last field's line ending; ``body_start`` is
    just after the blank line. With no blank line the whole rest is headers.
    """
    if data.startswith(b"\r\n", start):
        return start, start + 2
    if data.startswith(b"\n", start):
        return start, start + 1
    match = _BLANK_LINE.search(data, start)
    if match is None:
        return len(data), len(data)
    sep = match.group()
    first_eol = 2 if sep.startswith(b"\r") else 1
    return match.start() + first_eol, match.end()


def parse_fields(data: bytes, start: int, end: int) -> list[Field]:
    """The fields of the header block ``data[start:end]``, in order.

    A line without a colon that does not continue a field becomes a field with
    an empty name, so the spans always cover the whole block.
    """
    fields: list[Field] = []
    field_start = -1
    name = ""
    pos = start
    while pos < end:
        match = _LINE.match(data, pos, end)
        assert match is not None  # the pattern matches the empty string
        line_end = match.end()
        if line_end == pos:
            break
        if data[pos] not in b" \t" or field_start < 0:
            if field_start >= 0:
                fields.append(Field(name, field_start, pos, data[field_start:pos]))
            field_start = pos
            colon = data.find(b":", pos, line_end)
            name = data[pos:colon].strip().decode("latin-1").lower() if colon >= 0 else ""
        pos = line_end
    if field_start >= 0:
        fields.append(Field(name, field_start, pos, data[field_start:pos]))
    return fields


def top_fields(data: bytes) -> tuple[list[Field], int]:
    """The top-level header fields of a message and the offset of its body."""
    end, body = header_end(data)
    return parse_fields(data, 0, end), body


def first(fields: Iterable[Field], name: str) -> Field | None:
    name = name.lower()
    return next((f for f in fields if f.name == name), None)


def delete_fields(data: bytes, fields: Sequence[Field]) -> list[Segment]:
    """``data`` with the given fields' lines cut out, every other byte kept,
    as views of ``data`` (no copy of a large body; see :data:`Segment`)."""
    view = memoryview(data)
    out: list[Segment] = []
    pos = 0
    for field in sorted(fields, key=lambda f: f.start):
        if field.start > pos:
            out.append(view[pos : field.start])
        pos = field.end
    if pos < len(data) or not out:
        out.append(view[pos:])
    return out


def delete_named(data: bytes, names: Collection[str]) -> list[Segment]:
    """Delete every top-level field whose name is in ``names`` (any case).

    This is the fail-open path: it must work on anything, so it only needs a
    header block and a colon per field.
    """
    wanted = {n.lower() for n in names}
    fields, _ = top_fields(data)
    return delete_fields(data, [f for f in fields if f.name in wanted])


def dkim_signed_names(fields: Iterable[Field]) -> set[str] | None:
    """Header names covered by any DKIM-Signature (``h=`` tag), or None if unsigned."""
    covered: set[str] | None = None
    for field in fields:
        if field.name != "dkim-signature":
            continue
        covered = covered if covered is not None else set()
        for tag in field.value.split(";"):
            key, _, value = tag.partition("=")
            if key.strip().lower() == "h":
                covered.update(
                    n.strip().lower() for n in re.sub(r"\s", "", value).split(":") if n.strip()
                )
    return covered
