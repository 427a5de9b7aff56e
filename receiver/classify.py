"""Who loaded a pixel or followed a link: one verdict per event, with reasons.

An open is not a person reading. Mail clients, privacy proxies and security
gateways all fetch tracking URLs, and the sender previews their own mail. The
receiver records every hit and labels it, so figures can count people without
throwing data away:

========  ==================================================================
human     a browser or mail client fetched it for a person
proxy     a mailbox provider's image proxy fetched it when the person opened
          the message (Gmail, Yahoo/AOL): a real open, never drop it — doing
          so zeroes Gmail opens
machine   fetched without a person: Apple Mail Privacy Protection prefetch,
          Gmail's delivery-time prefetch
scanner   a security gateway or a tool: link scanners, no/tool user agent,
          prefetch hints, HEAD, a click seconds after sending, Microsoft
          networks for CLICKS (Safe Links detonation) — not for opens, since
          Outlook.com's image proxy lives there
self      the sender: the IP that submitted the message, or a logged-in
          dashboard user
unknown   nothing matched
========  ==================================================================

:data:`RULES` is the whole policy, read top to bottom: the FIRST rule that
matches gives the verdict, every matching rule adds its reason. Rules that
need the message (its send time, the submitting IP) get those facts from the
event writer, which looks them up in the database in batches; a request never
does. Which verdicts count (human, proxy) is said once, in shared/verdicts.py.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from shared.verdicts import HUMAN, MACHINE, PROXY, SCANNER, SELF, UNKNOWN

log = logging.getLogger(__name__)

OPEN, CLICK = "open", "click"

#: A click this soon after the message was sent is a gateway following links.
FAST_CLICK_SECONDS = 10.0

DATA_DIR = Path(__file__).with_name("data")
APPLE_RANGES_FILE = DATA_DIR / "apple_mpp_ranges.txt"


@dataclass(frozen=True, slots=True)
class Hit:
    """The facts about one hit that the rules look at.

    ``seconds_after_send`` and ``sender_ip`` come from the message record and
    are None / empty when it is not (yet) in the database.
    """

    kind: str
    method: str = "GET"
    user_agent: str = ""
    ip: str = ""
    purpose: str = ""  # Purpose / Sec-Purpose / X-Purpose / X-Moz, lower case
    dashboard_user: bool = False
    seconds_after_send: float | None = None
    sender_ip: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    verdict: str
    reasons: tuple[str, ...]

    @property
    def reason_text(self) -> str:
        return "; ".join(self.reasons)


class NetworkSet:
    """Membership test for many CIDR ranges: bisect over merged integer ranges."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._ranges: dict[int, tuple[list[int], list[int]]] = {}
        nets = [ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()]
        v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
        collapsed: dict[int, list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network]] = {
            4: list(ipaddress.collapse_addresses(v4)),
            6: list(ipaddress.collapse_addresses(v6)),
        }
        for version in (4, 6):
            starts: list[int] = []
            ends: list[int] = []
            for net in collapsed[version]:  # sorted and non-overlapping
                starts.append(int(net.network_address))
                ends.append(int(net.broadcast_address))
            self._ranges[version] = (starts, ends)

    def __len__(self) -> int:
        return sum(len(starts) for starts, _ in self._ranges.values())

    def __contains__(self, ip: object) -> bool:
        address = _address(ip) if isinstance(ip, str) else ip
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        starts, ends = self._ranges[address.version]
        value = int(address)
        index = bisect.bisect_right(starts, value) - 1
        return index >= 0 and value <= ends[index]


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def read_ranges(path: Path) -> list[str]:
    """CIDRs from a ranges file: one per line (first CSV field), ``#`` comments."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split(",")[0].strip() for line in lines if line.strip() and line[0] != "#"]


@lru_cache(maxsize=1)
def apple_ranges() -> NetworkSet:
    """Apple's published egress ranges (Mail Privacy Protection, Private Relay)."""
    return NetworkSet(read_ranges(APPLE_RANGES_FILE))


#: Microsoft-owned blocks where Exchange Online Protection, Safe Links and
#: Defender detonation fetch links from (ARIN/RIPE allocations to Microsoft;
#: the EOP ranges 40.92.0.0/15, 40.107.0.0/16, 52.100.0.0/14 and 104.47.0.0/17
#: are in Microsoft's published Exchange Online list).
MICROSOFT_NETWORKS = NetworkSet(
    [
        "13.64.0.0/11",
        "40.64.0.0/10",
        "52.96.0.0/12",
        "52.100.0.0/14",
        "104.40.0.0/13",
        "104.47.0.0/17",
        "2603:1000::/24",
        "2a01:111::/32",
    ]
)

# --- user agents ---------------------------------------------------------------

#: Apple Mail Privacy Protection fetches with exactly this user agent.
APPLE_MPP_AGENT = "Mozilla/5.0"
#: Gmail fetches images when a message is delivered, from Google networks,
#: with this fixed user agent (documented by GMass from their open logs).
GMAIL_PREFETCH_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0"
)
PROXY_MARKERS = ("googleimageproxy", "yahoomailproxy")
GATEWAY_MARKERS = ("safelinks", "mimecast", "proofpoint", "barracuda")
TOOL_PREFIXES = (
    "curl/",
    "wget/",
    "python-requests/",
    "python-urllib/",
    "python-httpx/",
    "python/",
    "aiohttp/",
    "go-http-client/",
    "java/",
    "apache-httpclient/",
    "okhttp/",
    "libwww-perl/",
    "lwp::simple/",
    "axios/",
    "node-fetch/",
    "undici",
    "ruby",
    "php/",
    "guzzlehttp/",
    "scrapy/",
    "httpie/",
    "powershell/",
)
BROWSER_MARKERS = ("mozilla/5.0 (", "opera/", "thunderbird/", "microsoft outlook", "outlook-")


def _ua(hit: Hit) -> str:
    return hit.user_agent.strip().lower()


def is_dashboard_user(hit: Hit) -> bool:
    return hit.dashboard_user


def is_sender_ip(hit: Hit) -> bool:
    return bool(hit.sender_ip) and _same_ip(hit.ip, hit.sender_ip)


def _same_ip(a: str, b: str) -> bool:
    left, right = _address(a), _address(b)
    return left is not None and left == right


def is_apple_mpp(hit: Hit) -> bool:
    return hit.user_agent == APPLE_MPP_AGENT and hit.ip in apple_ranges()


def is_gmail_prefetch(hit: Hit) -> bool:
    return hit.user_agent.strip() == GMAIL_PREFETCH_AGENT


def is_image_proxy(hit: Hit) -> bool:
    ua = _ua(hit)
    return any(marker in ua for marker in PROXY_MARKERS)


def is_head(hit: Hit) -> bool:
    return hit.method == "HEAD"


def is_prefetch(hit: Hit) -> bool:
    return "prefetch" in hit.purpose or "preview" in hit.purpose


def is_gateway_agent(hit: Hit) -> bool:
    ua = _ua(hit)
    return any(marker in ua for marker in GATEWAY_MARKERS)


def is_tool_agent(hit: Hit) -> bool:
    ua = _ua(hit)
    return not ua or ua.startswith(TOOL_PREFIXES)


def is_fast_click(hit: Hit) -> bool:
    return hit.seconds_after_send is not None and hit.seconds_after_send < FAST_CLICK_SECONDS


def is_microsoft_network(hit: Hit) -> bool:
    return hit.ip in MICROSOFT_NETWORKS


def is_browser_agent(hit: Hit) -> bool:
    ua = _ua(hit)
    return any(marker in ua for marker in BROWSER_MARKERS)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kinds: frozenset[str]
    test: Callable[[Hit], bool]
    verdict: str
    reason: str


BOTH = frozenset({OPEN, CLICK})
OPENS = frozenset({OPEN})
CLICKS = frozenset({CLICK})

# fmt: off
RULES: tuple[Rule, ...] = (
    #    name               applies to  predicate             verdict   reason
    Rule("dashboard_user",  BOTH,   is_dashboard_user,    SELF,     "a logged-in dashboard user"),
    Rule("sender_ip",       BOTH,   is_sender_ip,         SELF,     "the IP that submitted the message"),  # noqa: E501
    Rule("head_request",    BOTH,   is_head,              SCANNER,  "HEAD request"),
    Rule("prefetch_header", BOTH,   is_prefetch,          SCANNER,  "prefetch header"),
    Rule("apple_mpp",       OPENS,  is_apple_mpp,         MACHINE,  "Apple Mail Privacy Protection"),  # noqa: E501
    Rule("gmail_prefetch",  OPENS,  is_gmail_prefetch,    MACHINE,  "Gmail delivery prefetch"),
    Rule("image_proxy",     OPENS,  is_image_proxy,       PROXY,    "mailbox image proxy"),
    Rule("gateway_agent",   BOTH,   is_gateway_agent,     SCANNER,  "security gateway user agent"),
    Rule("tool_agent",      BOTH,   is_tool_agent,        SCANNER,  "missing or tool user agent"),
    Rule("fast_click",      CLICKS, is_fast_click,        SCANNER,  "clicked seconds after sending"),  # noqa: E501
    Rule("microsoft_click", CLICKS, is_microsoft_network, SCANNER,  "click from a Microsoft network"),  # noqa: E501
    Rule("browser_agent",   BOTH,   is_browser_agent,     HUMAN,    "browser or mail client"),
)
# fmt: on

RULES_BY_NAME = {rule.name: rule for rule in RULES}


@lru_cache(maxsize=8192)
def classify(hit: Hit) -> Verdict:
    """The first matching rule's verdict, with the reasons of every match.

    Cached: mail clients and proxies repeat the same facts all day.
    """
    verdict = ""
    reasons: list[str] = []
    for rule in RULES:
        if hit.kind in rule.kinds and rule.test(hit):
            verdict = verdict or rule.verdict
            reasons.append(rule.reason)
    return Verdict(verdict or UNKNOWN, tuple(reasons))
