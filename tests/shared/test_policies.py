"""Policy and suppression storage (shared with the dashboard) and the CLI."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine

import receiver
from shared.addresses import normalize_address
from shared.db import session_scope
from shared.errors import UserError
from shared.models import Policy
from shared.outbox import sender_wants_mail
from shared.policies import (
    DEFAULT_POLICY,
    SUPPRESSION_SOURCES,
    PolicyError,
    add_suppression,
    check_mode,
    check_recipient_cap,
    list_policies,
    list_suppressions,
    load_snapshot,
    normalize_pattern,
    policy_by_id,
    remove_policy,
    remove_suppression,
    resolve,
    set_policy,
    suppression_by_id,
)
from trackrelay.cli import main


@pytest.mark.parametrize(
    ("pattern", "normal"),
    [
        ("*", "*"),
        (" Ann@Example.COM ", "ann@example.com"),
        ("@Example.com.", "@example.com"),
        ("@bücher.example", "@xn--bcher-kva.example"),
        ("@straße.example", "@xn--strae-oqa.example"),  # UTS 46, not IDNA 2003's strasse
        ("<bob@example.org>", "bob@example.org"),
    ],
)
def test_patterns(pattern: str, normal: str) -> None:
    assert normalize_pattern(pattern) == normal


@pytest.mark.parametrize("pattern", ["", "ann", "@", "@localhost", "a b@example.com", "@a..b"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(PolicyError):
        normalize_pattern(pattern)


def test_resolution_order() -> None:
    policies = {
        p.pattern: p
        for p in (
            Policy(pattern="ann@example.com", mode="never"),
            Policy(pattern="@example.com", mode="always"),
            Policy(pattern="*", mode="header"),
        )
    }
    assert resolve(policies, "Ann@EXAMPLE.com").mode == "never"
    assert resolve(policies, "bob@example.com").mode == "always"
    assert resolve(policies, "bob@sub.example.com").mode == "header"
    assert resolve({}, "x@y.z") is DEFAULT_POLICY
    assert resolve(policies, "not an address").pattern == "*"


def test_crud(engine: Engine) -> None:
    set_policy(engine, "@example.com", mode="always", recipient_cap=5)
    updated = set_policy(engine, "@EXAMPLE.com", allow_clicks=False)
    assert (updated.mode, updated.recipient_cap, updated.allow_clicks) == ("always", 5, False)
    set_policy(engine, "*")
    set_policy(engine, "ann@example.com", mode="never")
    assert [p.pattern for p in list_policies(engine)] == ["ann@example.com", "@example.com", "*"]
    with pytest.raises(PolicyError, match="mode must be one of"):
        set_policy(engine, "*", mode="sometimes")
    with pytest.raises(PolicyError, match="recipient cap"):
        set_policy(engine, "*", recipient_cap=0)
    remove_policy(engine, "*")
    with pytest.raises(PolicyError, match="no policy"):
        remove_policy(engine, "*")
    add_suppression(engine, "Bob@Example.org")
    add_suppression(engine, "bob@example.org", source="public")  # idempotent
    assert [s.address for s in list_suppressions(engine)] == ["bob@example.org"]
    snapshot = load_snapshot(engine)
    assert snapshot.is_suppressed("<BOB@example.org>")
    assert snapshot.policy_for("ann@example.com").mode == "never"
    remove_suppression(engine, "bob@example.org")
    with pytest.raises(PolicyError, match="not suppressed"):
        remove_suppression(engine, "bob@example.org")


def test_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKRELAY_VAR_DIR", str(tmp_path / "var"))
    assert (
        main(["policy", "set", "@Example.com", "--mode", "always", "--no-clicks", "--cap", "3"])
        == 0
    )
    assert main(["policy", "set", "*", "--text-links"]) == 0
    assert main(["policy", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "@example.com\tmode=always opens per-recipient cap=3",
        "*\tmode=header opens clicks text-links per-recipient cap=20",
    ]
    assert main(["policy", "set", "nobody"]) == 1
    assert "'nobody' is not an email address" in capsys.readouterr().err
    assert main(["policy", "remove", "@example.com"]) == 0
    assert main(["suppress", "add", "Carol@Example.net"]) == 0
    assert main(["suppress", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("carol@example.net\tcli\t")
    assert main(["suppress", "remove", "carol@example.net"]) == 0
    assert main(["suppress", "remove", "carol@example.net"]) == 1


def test_forms_add_and_edit_by_id(engine: Engine) -> None:
    first = set_policy(engine, "@example.com", mode="always", new=True)
    with pytest.raises(PolicyError, match=r"already a policy for @example\.com") as caught:
        set_policy(engine, "@EXAMPLE.com", new=True)
    assert caught.value.field == "pattern"
    other = set_policy(engine, "ann@example.com", new=True)
    # an edit may change the pattern, but not onto another policy's
    moved = set_policy(engine, "@example.org", mode="never", policy_id=first.id)
    assert (moved.id, moved.pattern, moved.mode) == (first.id, "@example.org", "never")
    with pytest.raises(PolicyError, match=r"already a policy for ann@example\.com"):
        set_policy(engine, "ann@example.com", policy_id=first.id)
    assert other.id is not None
    assert policy_by_id(engine, other.id) is not None
    remove_policy(engine, "ann@example.com")
    with pytest.raises(PolicyError, match="no longer exists"):
        set_policy(engine, "bob@example.com", policy_id=other.id)


def test_suppression_search_and_strict_add(engine: Engine) -> None:
    for address in ("zoe@example.com", "zed@example.org", "per%cent@example.com"):
        add_suppression(engine, address, "dashboard", new=True)
    with pytest.raises(PolicyError, match="already on the list") as caught:
        add_suppression(engine, "ZOE@example.com", new=True)
    assert caught.value.field == "address"
    assert [s.address for s in list_suppressions(engine, "EXAMPLE.COM")] == [
        "per%cent@example.com",
        "zoe@example.com",
    ]
    assert [s.address for s in list_suppressions(engine, "%")] == ["per%cent@example.com"]
    assert len(list_suppressions(engine, limit=2)) == 2
    row = list_suppressions(engine, "zed")[0]
    assert row.id is not None
    assert suppression_by_id(engine, row.id) == row


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda: normalize_pattern("  "), "say who this applies to"),
        (lambda: normalize_pattern("sales at example"), "is not an email address (ann@"),
        (lambda: check_recipient_cap("ten"), "whole number from 1 to 1000"),
        (lambda: check_recipient_cap(1001), "whole number from 1 to 1000"),
        (lambda: check_mode("sometimes"), "mode must be one of header, always, never"),
    ],
)
def test_messages_for_people(call: Callable[[], object], text: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(text)):
        call()


@pytest.mark.parametrize(
    ("address", "text"),
    [
        ("@example.com", "not a whole domain"),
        ("", "enter an email address"),
        ("ann@localhost", "'localhost' is not a domain name"),
        ("ann@bü_cher.example", "is not a valid domain name"),
    ],
)
def test_address_messages_for_people(address: str, text: str) -> None:
    with pytest.raises(UserError, match=re.escape(text)) as caught:
        normalize_address(address)
    assert caught.value.field == "address"


def test_notification_mail_follows_policy_resolution(engine: Engine) -> None:

    set_policy(engine, "@bücher.example", notify=True)
    set_policy(engine, "*", notify=False)
    set_policy(engine, "ann@bücher.example", notify=False)
    with session_scope(engine) as session:
        assert sender_wants_mail(session, "Bob@BÜCHER.example")  # IDN domain, any case
        assert not sender_wants_mail(session, "ann@bücher.example")  # exact beats @domain
        assert not sender_wants_mail(session, "x@elsewhere.example")  # falls to *


def test_suppression_sources_are_what_the_writers_write(engine: Engine) -> None:
    """The public page writes source 'public' and the API 'api': both are valid
    sources, and the dashboard has a label for every one."""
    template = (
        Path(receiver.__file__).parent / "templates/dashboard/suppressions.html"
    ).read_text()
    for n, source in enumerate(SUPPRESSION_SOURCES):
        add_suppression(engine, f"r{n}@example.org", source=source)
        assert f'"{source}":' in template, source
    assert {"public", "api"} <= set(SUPPRESSION_SOURCES)


def test_adding_again_returns_the_first_row(engine: Engine) -> None:
    first = add_suppression(engine, "Carol@Example.net", "cli")
    again = add_suppression(engine, "carol@example.net", "public")
    assert (again.id, again.address, again.source) == (first.id, "carol@example.net", "cli")
    with pytest.raises(PolicyError, match="already on the list") as caught:
        add_suppression(engine, "CAROL@example.net", "dashboard", new=True)
    assert caught.value.field == "address"


def test_concurrent_adds_of_one_address_make_one_row(engine: Engine) -> None:
    """Two receivers taking the same "stop tracking me" request, or the CLI beside
    the dashboard: each add must succeed, and the list holds the address once."""
    workers, rounds = 6, 30
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def add(worker: int) -> None:
        for n in range(rounds):
            barrier.wait()
            try:
                add_suppression(engine, f"Race{n}@Example.org", ("cli", "public")[worker % 2])
            except Exception as exc:  # collected, asserted below
                errors.append(exc)

    threads = [threading.Thread(target=add, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = list_suppressions(engine)
    assert sorted(r.address for r in rows) == sorted(f"race{n}@example.org" for n in range(rounds))
