"""Attacks the other test files do not already cover (see the list below).

Covered elsewhere: open relay without AUTH (test_relay_handler.py::
test_never_an_open_relay), AUTH before STARTTLS (test_no_auth_before_starttls),
one upstream attempt per wrong password (test_wrong_password_is_one_upstream_
attempt_and_its_verdict), per-user AUTH limit (test_auth_failures_are_rate_
limited), smuggling (test_smuggling_payload_is_one_message, test_relay_smtp.py::
test_only_crlf_dot_crlf_ends_data), forged/truncated/kind-swapped tokens
(test_tokens.py, test_receiver_tracking.py::test_bad_click_tokens_get_a_404_
page_never_a_redirect), javascript:/data: targets at /c (test_only_http_and_
https_targets), dashboard session fixation, throttling, CSRF, IDOR, XSS
(test_dashboard.py), limits (test_recipient_limit, test_long_line_gets_500,
test_message_of_25_mb_and_the_size_limit), slowloris (test_faults.py).
"""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from receiver.app import create_app
from relay.prepared import Submission
from relay.track import Tracker
from shared.policies import set_policy
from shared.tokens import Signer
from shared.users import add_user
from tests.support.relaykit import (
    SIMPLE,
    MakeSettings,
    client,
    relay_settings,
    running_relay,
    signed_in,
)
from tests.support.upstream import PASSWORD, USER, RecordingUpstream


def test_local_mode_cannot_send_as_another_users_address(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    settings = relay_settings(
        make_settings, upstream, auth_mode="local", upstream_user=USER, upstream_password=PASSWORD
    )
    add_user(db_engine, "carol", "carol-password", addresses=["carol@example.com"])
    add_user(db_engine, "dave", "dave-password", addresses=["dave@example.com", "@dave.example"])

    async def scenario() -> list[int]:
        codes = []
        async with signed_in(settings, db_engine, user="carol", password="carol-password") as smtp:
            for sender in ("dave@example.com", "x@dave.example", "DAVE@example.com"):
                with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
                    await smtp.mail(sender)
                codes.append(caught.value.code)
        return codes

    assert asyncio.run(scenario()) == [553, 553, 553]
    assert upstream.messages == []


def test_auth_failures_are_limited_per_ip_across_usernames(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    """Password spraying: a new username per guess still hits the per-IP limit."""
    settings = relay_settings(
        make_settings, upstream, auth_failures_per_ip=3, auth_failures_per_user=50
    )

    async def scenario() -> list[int]:
        codes = []
        async with running_relay(settings, db_engine) as relay:
            for i in range(5):
                async with client(relay) as smtp:
                    await smtp.ehlo()
                    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as caught:
                        await smtp.auth_plain(f"user{i}@example.com", "guess")
                    codes.append(caught.value.code)
        return codes

    assert asyncio.run(scenario()) == [535, 535, 535, 454, 454]
    assert len(upstream.auth_attempts) == 3  # blocked guesses never reach the upstream


def test_passthrough_one_upstream_attempt_per_client_attempt_in_one_session(
    make_settings: MakeSettings, upstream: RecordingUpstream, db_engine: Engine
) -> None:
    async def scenario() -> None:
        async with (
            running_relay(relay_settings(make_settings, upstream), db_engine) as relay,
            client(relay) as smtp,
        ):
            await smtp.ehlo()
            for mechanism in (smtp.auth_plain, smtp.auth_login, smtp.auth_plain):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await mechanism(USER, "wrong")
            await smtp.auth_login(USER, PASSWORD)
            await smtp.sendmail(USER, ["bob@example.net"], SIMPLE)

    asyncio.run(scenario())
    assert upstream.auth_attempts == [
        ("PLAIN", USER),
        ("LOGIN", USER),
        ("PLAIN", USER),
        ("LOGIN", USER),
    ]
    assert len(upstream.messages) == 1


HOSTILE = [
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "java&#x09;script:alert(1)",
    "java\tscript:alert(1)",
    "&#106;avascript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "vbscript:msgbox(1)",
    "//evil.example/x",
    "/relative",
    "https:evil.example",
]


def test_the_injector_never_produces_non_http_targets(
    make_settings: MakeSettings, db_engine: Engine
) -> None:
    set_policy(db_engine, "*", mode="always")
    tracker = Tracker(make_settings(public_url="https://t.example.net"), db_engine)
    anchors = "".join(f'<a href="{url}">x</a>' for url in HOSTILE)
    html = f'<html><body>{anchors}<a href="https://ok.example/">ok</a></body></html>'
    data = f"From: a@example.com\r\nContent-Type: text/html\r\n\r\n{html}\r\n".encode()
    prepared = asyncio.run(
        tracker.prepare(Submission(5, "a@example.com", ["b@example.org"], data, "", ""))
    )
    assert [link.url for link in prepared.links] == ["https://ok.example/"]
    out = prepared.copies[0].data.decode()
    for url in HOSTILE:
        assert f'href="{url}"' in out  # left exactly as written, never wrapped in a token


def test_a_click_goes_only_where_its_token_says(
    make_settings: MakeSettings, db_engine: Engine
) -> None:
    """Open-redirect attempts: extra parameters, paths and encodings are ignored or 404."""
    settings = make_settings()
    signer = Signer(settings.signing_keys())
    token = signer.click_token(9, 1, 1, "https://example.com/landing")
    with TestClient(create_app(settings, db_engine)) as http:
        for suffix in (
            "?url=https://evil.example/",
            "?next=//evil.example",
            "?redirect=javascript:alert(1)",
            "#https://evil.example",
            "/https://evil.example",  # what follows the token (e.g. ".gif") is ignored
            ".evil.example",
        ):
            response = http.get(f"/c/{token}{suffix}", follow_redirects=False)
            assert response.status_code == 302, suffix
            assert response.headers["location"] == "https://example.com/landing", suffix
        for path in (
            f"/c/{token[:-1]}%2F..%2Fevil",
            "/c/https://evil.example",
            "/c/%2F%2Fevil.example",
            "/c/",
        ):
            response = http.get(path, follow_redirects=False)
            assert response.status_code == 404, path
            assert "location" not in response.headers, path
