"""One test per verdict rule, with user agents as real clients send them."""

from __future__ import annotations

import re

import pytest

from receiver import classify
from receiver.classify import (
    CLICK,
    OPEN,
    RULES,
    Hit,
    NetworkSet,
)
from receiver.classify import (
    classify as verdict_of,
)
from shared.verdicts import AUTOMATED, COUNTED, VERDICTS

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
IPHONE_SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0"
OUTLOOK_DESKTOP = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)"
APPLE_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
GMAIL_PREFETCH = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
BARRACUDA = "Barracuda Sentinel (EE)"
TOOLS = [
    "curl/8.5.0",
    "python-requests/2.31.0",
    "Go-http-client/1.1",
    "Java/17.0.2",
    "Wget/1.21.4",
    "libwww-perl/6.72",
    "okhttp/4.10.0",
    "Python/3.9 aiohttp/3.8.1",
    "",
]

HOME_IP = "198.51.100.23"
APPLE_IP = "17.58.63.1"  # Apple's own 17.0.0.0/8
APPLE_CDN_IP = "172.225.19.4"  # Akamai-operated Private Relay egress
MICROSOFT_IP = "40.94.31.18"  # Exchange Online Protection, 40.92.0.0/15


def check(hit: Hit, verdict: str, rule: str) -> None:
    result = verdict_of(hit)
    assert result.verdict == verdict, result
    assert classify.RULES_BY_NAME[rule].reason in result.reasons


def test_rules_table_is_well_formed() -> None:
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    for rule in RULES:
        assert rule.verdict in VERDICTS
        assert rule.kinds <= {OPEN, CLICK}
        assert rule.kinds
        assert rule.reason


def test_dashboard_user_is_self() -> None:
    check(Hit(OPEN, user_agent=CHROME, ip=HOME_IP, dashboard_user=True), "self", "dashboard_user")


def test_sender_ip_is_self() -> None:
    hit = Hit(CLICK, user_agent=THUNDERBIRD, ip="203.0.113.9", sender_ip="203.0.113.9")
    check(hit, "self", "sender_ip")
    # IPv4-mapped IPv6 and plain IPv4 are the same sender only when equal
    assert verdict_of(
        Hit(OPEN, user_agent=CHROME, ip=HOME_IP, sender_ip="203.0.113.9")
    ).verdict == ("human")


def test_head_request_is_scanner() -> None:
    check(Hit(OPEN, method="HEAD", user_agent=CHROME, ip=HOME_IP), "scanner", "head_request")


@pytest.mark.parametrize("purpose", ["prefetch", "prefetch;prerender"])
def test_prefetch_header_is_scanner(purpose: str) -> None:
    hit = Hit(CLICK, user_agent=CHROME, ip=HOME_IP, purpose=purpose)
    check(hit, "scanner", "prefetch_header")


@pytest.mark.parametrize("ip", [APPLE_IP, APPLE_CDN_IP, "2a02:26f7:b3c0:4000::1"])
def test_apple_mpp_is_machine(ip: str) -> None:
    check(Hit(OPEN, user_agent="Mozilla/5.0", ip=ip), "machine", "apple_mpp")


def test_apple_mpp_needs_the_exact_agent_and_apple_network() -> None:
    assert verdict_of(Hit(OPEN, user_agent="Mozilla/5.0", ip=HOME_IP)).verdict == "unknown"
    assert verdict_of(Hit(OPEN, user_agent=APPLE_MAIL, ip=APPLE_IP)).verdict == "human"


def test_gmail_prefetch_is_machine() -> None:
    check(Hit(OPEN, user_agent=GMAIL_PREFETCH, ip="66.249.84.10"), "machine", "gmail_prefetch")


@pytest.mark.parametrize("agent", [GMAIL_PROXY, YAHOO_PROXY])
def test_image_proxies_are_real_opens(agent: str) -> None:
    check(Hit(OPEN, user_agent=agent, ip="66.249.84.10"), "proxy", "image_proxy")
    assert "proxy" in COUNTED


def test_gateway_agent_is_scanner() -> None:
    check(Hit(CLICK, user_agent=BARRACUDA, ip=HOME_IP), "scanner", "gateway_agent")
    check(Hit(OPEN, user_agent=BARRACUDA, ip=HOME_IP), "scanner", "gateway_agent")


@pytest.mark.parametrize("agent", TOOLS)
def test_tool_or_missing_agent_is_scanner(agent: str) -> None:
    check(Hit(CLICK, user_agent=agent, ip=HOME_IP), "scanner", "tool_agent")


def test_fast_click_is_scanner() -> None:
    hit = Hit(CLICK, user_agent=CHROME, ip=HOME_IP, seconds_after_send=2.5)
    check(hit, "scanner", "fast_click")
    later = Hit(CLICK, user_agent=CHROME, ip=HOME_IP, seconds_after_send=600)
    assert verdict_of(later).verdict == "human"


def test_microsoft_network_is_scanner_for_clicks_not_opens() -> None:
    check(Hit(CLICK, user_agent=CHROME, ip=MICROSOFT_IP), "scanner", "microsoft_click")
    # Outlook.com's image proxy fetches pixels from Microsoft networks: real opens.
    assert verdict_of(Hit(OPEN, user_agent=CHROME, ip=MICROSOFT_IP)).verdict == "human"


@pytest.mark.parametrize("agent", [CHROME, IPHONE_SAFARI, THUNDERBIRD, OUTLOOK_DESKTOP, APPLE_MAIL])
def test_browser_agent_is_human(agent: str) -> None:
    check(Hit(OPEN, user_agent=agent, ip=HOME_IP), "human", "browser_agent")
    check(
        Hit(CLICK, user_agent=agent, ip=HOME_IP, seconds_after_send=3600), "human", "browser_agent"
    )


def test_anything_else_is_unknown() -> None:
    result = verdict_of(Hit(CLICK, user_agent="SomethingNew/1.0", ip=HOME_IP))
    assert result.verdict == "unknown"
    assert result.reasons == ()


def test_first_match_wins_and_all_reasons_are_kept() -> None:
    result = verdict_of(Hit(CLICK, method="HEAD", user_agent="curl/8.5.0", ip=MICROSOFT_IP))
    assert result.verdict == "scanner"
    assert result.reasons == (
        "HEAD request",
        "missing or tool user agent",
        "click from a Microsoft network",
    )


def test_only_human_and_proxy_count() -> None:
    assert {v for v in VERDICTS if v in COUNTED} == {"human", "proxy"}
    assert set(AUTOMATED) == {"machine", "scanner"}
    assert not set(COUNTED) & set(AUTOMATED)


def test_network_set() -> None:
    nets = NetworkSet(["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "2001:db8::/32"])
    assert len(nets) == 3  # 10.1/16 merged into 10/8
    assert "10.255.0.1" in nets
    assert "192.0.2.255" in nets
    assert "2001:db8::1" in nets
    assert "11.0.0.0" not in nets
    assert "192.0.3.0" not in nets
    assert "2001:db9::" not in nets
    assert "::ffff:192.0.2.7" in nets
    assert "not-an-ip" not in nets
    assert "" not in nets


def test_apple_ranges_file_names_its_source_and_date() -> None:
    header = classify.APPLE_RANGES_FILE.read_text().splitlines()[:6]
    assert "# source: https://mask-api.icloud.com/egress-ip-ranges.csv" in header
    assert any(re.fullmatch(r"# date: \d{4}-\d\d-\d\d", line) for line in header)
    assert len(classify.apple_ranges()) > 5
