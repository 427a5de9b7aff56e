"""Policy and suppression storage (shared with the dashboard) and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

import receiver
from shared.models import Policy
from shared.policies import (
    DEFAULT_POLICY,
    SUPPRESSION_SOURCES,
    PolicyError,
    add_suppression,
    list_policies,
    list_suppressions,
    load_snapshot,
    normalize_pattern,
    remove_policy,
    remove_suppression,
    resolve,
    set_policy,
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
