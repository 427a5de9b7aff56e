"""One spelling of addresses and domains (shared/addresses.py), used by every store."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from receiver import public
from receiver.readmodel import visible
from shared import consent, policies, privacy, users
from shared.addresses import (
    address_key,
    normalize_address,
    normalize_domain,
    normalize_sender,
    spellings,
)
from shared.errors import UserError
from shared.identity import Viewer
from shared.models import Message, Recipient
from tests.support.seedrows import add_message

IDN = "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        (" Ann@Example.COM ", "ann@example.com"),
        ("<Jörg@Bücher.Example.>", f"jörg@{IDN}"),
        (f"jörg@{IDN.upper()}", f"jörg@{IDN}"),
        ("x@Straße.example", "x@xn--strae-oqa.example"),  # UTS 46, not IDNA 2003's strasse
    ],
)
def test_canonical_addresses(typed: str, canonical: str) -> None:
    assert normalize_address(typed) == canonical
    assert address_key(typed) == canonical


@pytest.mark.parametrize(
    "bad",
    ["", "ann", "@example.com", "a b@example.com", "a@b", "a@@example.com", "<b>@example.com"],
)
def test_not_addresses(bad: str) -> None:
    with pytest.raises(UserError):
        normalize_address(bad)
    assert address_key(bad) == bad.strip().lower()  # lookups never raise


def test_every_store_spells_alike() -> None:
    """Consent, consent domains, users, policies, suppressions and the public
    page all use the one function: the same input gives the same key."""
    assert consent.normalize_domain("@Bücher.example") == normalize_domain("bücher.example") == IDN
    assert users.normalize_addresses(["@Bücher.example", "Ann@bücher.example"]) == [
        f"@{IDN}",
        f"ann@{IDN}",
    ]
    assert policies.normalize_pattern("@Bücher.example") == normalize_sender("@bücher.example")
    assert public.normalize_address("Ann@Bücher.example") == f"ann@{IDN}"
    assert policies.lookup_key("Ann@Bücher.example") == (f"ann@{IDN}", f"@{IDN}")


def test_users_send_as_either_spelling() -> None:
    patterns = users.normalize_addresses(["@bücher.example"])
    assert users.may_send_as(patterns, f"Ann@{IDN}")
    assert users.may_send_as(patterns, "ann@Bücher.example")
    assert not users.may_send_as(patterns, "ann@example.com")


def test_spellings() -> None:
    assert spellings(f"ann@{IDN}") == [f"ann@{IDN}", "ann@bücher.example"]
    assert spellings(f"@{IDN}") == [f"@{IDN}", "@bücher.example"]
    assert spellings("ann@example.com") == ["ann@example.com"]


def test_consent_in_either_spelling(engine: Engine) -> None:
    consent.set_mode(engine, "opt-in", IDN)
    consent.add_consent(engine, "Ana@Bücher.example")
    assert not consent.add_consent(engine, f"ana@{IDN}")  # the same consent
    assert consent.consent_allows(engine, "ana@bücher.example")
    assert consent.consent_allows(engine, f"ana@{IDN}")
    assert not consent.consent_allows(engine, "ben@bücher.example")
    assert consent.list_modes(engine) == {"*": "opt-out", IDN: "opt-in"}
    consent.set_mode(engine, "opt-out", "bücher.example")  # the same domain
    assert consent.list_modes(engine) == {"*": "opt-out", IDN: "opt-out"}


def test_erase_finds_the_recipient_in_either_spelling(engine: Engine) -> None:
    add_message(engine, recipients=("jörg@bücher.example", f"Jörg@{IDN}", "carol@other.test"))
    result = privacy.erase(engine, "jörg@BÜCHER.example")
    assert result.address == f"jörg@{IDN}"
    assert result.counts["recipients"] == 2
    with Session(engine) as session:
        left = session.exec(select(col(Recipient.address))).all()
    assert left == ["carol@other.test"]


def test_a_sender_sees_mail_sent_in_either_spelling(engine: Engine) -> None:
    unicode_mail = add_message(engine, sender="ann@bücher.example")
    ascii_mail = add_message(engine, sender=f"ann@{IDN}")
    add_message(engine, sender="ann@example.com")
    viewer = Viewer(1, "ann", "sender", tuple(users.normalize_addresses(["@bücher.example"])))
    with Session(engine) as session:
        seen = session.exec(select(Message.id).where(visible(viewer))).all()
    assert sorted(seen) == sorted([unicode_mail.id, ascii_mail.id])
