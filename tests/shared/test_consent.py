"""Consent modes: opt-out tracks everyone (suppression aside), opt-in only consenters."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from shared import consent
from shared.consent import ConsentCache, consent_allows
from shared.policies import load_snapshot


def test_default_is_opt_out(engine: Engine) -> None:
    assert consent.list_modes(engine) == {"*": "opt-out"}
    assert consent_allows(engine, "anyone@example.com")


def test_opt_in_domain_needs_a_consent(engine: Engine) -> None:
    consent.set_mode(engine, "opt-in", "@EU.example")
    assert not consent_allows(engine, "ana@eu.example")
    assert consent_allows(engine, "ana@us.example")  # other domains follow the default
    assert consent.add_consent(engine, "Ana@EU.example", source="web form")
    assert not consent.add_consent(engine, "ana@eu.example")
    assert consent_allows(engine, "ANA@eu.example")
    assert not consent_allows(engine, "ben@eu.example")
    assert [c.address for c in consent.list_consents(engine)] == ["ana@eu.example"]
    assert consent.remove_consent(engine, "ana@eu.example")
    assert not consent.remove_consent(engine, "ana@eu.example")
    assert not consent_allows(engine, "ana@eu.example")


def test_global_opt_in_with_a_domain_exception(engine: Engine) -> None:
    consent.set_mode(engine, "opt-in")
    consent.set_mode(engine, "opt-out", "partner.example")
    assert not consent_allows(engine, "x@anywhere.example")
    assert consent_allows(engine, "x@partner.example")
    assert consent.clear_mode(engine, "partner.example")
    assert not consent_allows(engine, "x@partner.example")
    assert consent.list_modes(engine) == {"*": "opt-in"}


def test_cache_answers_without_the_database_until_invalidated(engine: Engine) -> None:
    consent.set_mode(engine, "opt-in")
    cache = ConsentCache(engine, ttl=3600)
    assert not consent_allows(cache, "ana@eu.example")
    consent.add_consent(engine, "ana@eu.example")
    assert not consent_allows(cache, "ana@eu.example")  # cached answer
    cache.invalidate()
    assert consent_allows(cache, "ana@eu.example")
    consent.set_mode(engine, "opt-out")
    cache.invalidate()
    assert consent_allows(cache, "ben@eu.example")


def test_bad_input_is_refused(engine: Engine) -> None:
    with pytest.raises(consent.ConsentError):
        consent.set_mode(engine, "sometimes")
    with pytest.raises(consent.ConsentError):
        consent.set_mode(engine, "opt-in", "not a domain")
    with pytest.raises(consent.ConsentError):
        consent.add_consent(engine, "@eu.example")


def test_relay_snapshot_answers_like_the_database(engine: Engine) -> None:
    """The relay decides from its policy snapshot; it must agree with consent_allows."""
    assert load_snapshot(engine).consented == frozenset()  # opt-out: no addresses read
    consent.set_mode(engine, "opt-in", "eu.example")
    consent.add_consent(engine, "ana@eu.example")
    snapshot = load_snapshot(engine)
    for address in ("ana@eu.example", " ANA@EU.example", "ben@eu.example", "cy@us.example"):
        assert snapshot.consent_allows(address) == consent_allows(engine, address), address
    assert snapshot.consented == frozenset({"ana@eu.example"})
