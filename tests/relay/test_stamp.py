"""relay/stamp.py: the gateway's X-Trackrelay-Processed stamp, pure bytes."""

from __future__ import annotations

from relay import stamp
from relay.prepared import Copy

KEY, OLD = b"current key", b"retired key"
MESSAGE = b"From: a@contoso.example\r\nMessage-ID: <m1@contoso.example>\r\n\r\nbody\r\n"


def test_a_stamp_verifies_for_its_message_id_only() -> None:
    signer = stamp.Stamp([KEY])
    value = signer.value("<m1@contoso.example>")
    assert value.startswith("1.")
    assert signer.verify(value, "<m1@contoso.example>")
    assert not signer.verify(value, "<m2@contoso.example>")
    assert not stamp.Stamp([b"another deployment"]).verify(value, "<m1@contoso.example>")
    for broken in ("", "1", "2" + value[1:], value[:-2], "1.zz." + value.split(".")[2]):
        assert not signer.verify(broken, "<m1@contoso.example>")


def test_a_stamp_made_with_a_retired_key_still_verifies() -> None:
    old = stamp.Stamp([OLD]).value("<m1@contoso.example>")
    assert stamp.Stamp([KEY, OLD]).verify(old, "<m1@contoso.example>")
    assert not stamp.Stamp([KEY]).verify(old, "<m1@contoso.example>")


def test_read_finds_every_stamp_field_and_the_message_id() -> None:
    line = stamp.Stamp([KEY]).line("<m1@contoso.example>")
    seen = stamp.read(line + b"X-TRACKRELAY-PROCESSED: 1.00.forged\r\n" + MESSAGE)
    assert seen.message_id == "<m1@contoso.example>"
    assert len(seen.fields) == 2
    assert stamp.Stamp([KEY]).valid(seen)
    assert not stamp.Stamp([OLD]).valid(seen)
    assert stamp.read(MESSAGE).fields == []


def test_stamped_adds_one_line_in_front_and_changes_nothing_else() -> None:
    line = stamp.Stamp([KEY]).line("<m1@contoso.example>")
    [copy] = stamp.stamped([Copy(["b@x"], [memoryview(MESSAGE)])], line)
    assert copy.recipients == ["b@x"]
    assert copy.data == line + MESSAGE
    assert line.endswith(b"\r\n")
    assert line.startswith(b"X-Trackrelay-Processed: 1.")


def test_a_message_without_message_id_is_stamped_over_the_empty_string() -> None:
    data = b"From: a@contoso.example\r\n\r\nbody\r\n"
    signer = stamp.Stamp([KEY])
    assert signer.valid(stamp.read(signer.line("") + data))
