"""A device family from a User-Agent, for people reading a timeline.

Not a full UA database: the mail clients, image proxies and scanners that
actually load tracking pixels, then the common browsers and platforms. The
raw user agent stays visible on hover, so nothing is hidden by a wrong guess.
"""

from __future__ import annotations

import re

# (pattern, label) checked in order; the first match wins.
_AGENTS: tuple[tuple[str, str], ...] = (
    (r"GoogleImageProxy|ggpht\.com", "Gmail image proxy"),
    (r"YahooMailProxy", "Yahoo Mail proxy"),
    (r"Microsoft Office|Outlook|ms-office|MSOffice", "Outlook"),
    (r"Thunderbird", "Thunderbird"),
    (r"Superhuman", "Superhuman"),
    (r"Mimecast", "Mimecast scanner"),
    (r"Proofpoint", "Proofpoint scanner"),
    (r"Barracuda", "Barracuda scanner"),
    (r"BingPreview|SafeLinks", "Microsoft link scanner"),
    (r"curl/|Wget/|python-requests|python-httpx|Go-http-client|okhttp|Java/", "Script or tool"),
    (r"bot\b|crawler|spider", "Bot"),
    (r"Edg/", "Edge"),
    (r"OPR/|Opera", "Opera"),
    (r"Firefox/", "Firefox"),
    (r"Chrome/|CriOS/", "Chrome"),
    (r"Version/[\d.]+.*Safari/", "Safari"),
)
_PLATFORMS: tuple[tuple[str, str], ...] = (
    (r"iPhone", "iPhone"),
    (r"iPad", "iPad"),
    (r"Android", "Android"),
    (r"Windows", "Windows"),
    (r"Macintosh|Mac OS X", "Mac"),
    (r"CrOS", "ChromeOS"),
    (r"Linux", "Linux"),
)
_PROXIES = {"Gmail image proxy", "Yahoo Mail proxy"}


def device_family(user_agent: str) -> str:
    """``'Outlook on Windows'``, ``'Gmail image proxy'``, ``'Apple Mail (iPhone)'``…"""
    ua = user_agent.strip()
    if not ua:
        return "No user agent"
    if ua == "Mozilla/5.0":
        return "Apple Mail privacy proxy"
    agent = next((label for pattern, label in _AGENTS if re.search(pattern, ua, re.I)), "")
    platform = next((label for pattern, label in _PLATFORMS if re.search(pattern, ua)), "")
    if agent in _PROXIES or (agent and "scanner" in agent) or agent in ("Script or tool", "Bot"):
        return agent
    if not agent and platform in ("iPhone", "iPad", "Mac") and "AppleWebKit" in ua:
        return f"Apple Mail ({platform})"
    if agent and platform:
        return f"{agent} on {platform}"
    return agent or platform or "Other"
