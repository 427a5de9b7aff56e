"""Turn a signed link into the exact ``Location`` a browser would have followed.

The click token carries the URL as it was written in the message (decoded by
HTML5 rules by the injector, so ``&region=`` stays ``&region=``). Had the
recipient's browser followed that link directly, it would have parsed it with
the WHATWG URL rules; the redirect must land on the same URL:

* the host goes through UTS46 (the ``idna`` package, non-transitional):
  ``straße.de`` -> ``xn--strae-oqa.de``. The stdlib ``idna`` codec implements
  IDNA 2003 and maps it to ``strasse.de``, a different domain.
* non-ASCII and unsafe characters in path, query and fragment are
  percent-encoded as UTF-8 with the per-component sets browsers use (Chromium's
  path set also escapes ``^`` and ``|``); existing ``%XX`` escapes are kept as they are;
* ``.``/``..`` segments are resolved, ``\\`` is a path separator, tabs and
  newlines vanish, the default port is dropped.

Only ``http`` and ``https`` URLs with a host come out; anything else is None,
and the receiver answers 404 rather than redirect somewhere unintended.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

import idna

SCHEMES = {"http": 80, "https": 443}

_C0_SPACE = "".join(chr(c) for c in range(0x21))
_TAB_NEWLINE = re.compile("[\t\n\r]")
_FRAGMENT = frozenset(' "<>`')
_QUERY = frozenset(" \"#<>'")  # the special-query set (http, https)
_PATH = frozenset(' "#<>?`{}^|')
_USERINFO = _PATH | frozenset("/:;=@[\\]")
_FORBIDDEN_HOST = frozenset(" #%/:<>?@[\\]^|")
_DOT = {".", "%2e"}
_DOTDOT = {"..", ".%2e", "%2e.", "%2e%2e"}


def browser_url(url: str) -> str | None:
    """The URL a browser would request for ``url``; None unless absolute http(s)."""
    url = _TAB_NEWLINE.sub("", url.strip(_C0_SPACE))
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in SCHEMES:
        return None
    rest = rest.lstrip("/\\")
    end = len(rest)
    for delimiter in "/\\?#":
        found = rest.find(delimiter)
        if found != -1:
            end = min(end, found)
    authority, rest = rest[:end], rest[end:]
    rest, hash_, fragment = rest.partition("#")
    path, question, query = rest.partition("?")

    userinfo, at, hostport = authority.rpartition("@")
    host_port = _host_port(hostport, SCHEMES[scheme])
    if host_port is None:
        return None
    out = [scheme, "://"]
    if at and userinfo:
        user, colon, password = userinfo.partition(":")
        out.append(_encode(user, _USERINFO))
        if password:
            out += [":", _encode(password, _USERINFO)]
        out.append("@")
    out += [host_port, _path(path)]
    if question:
        out += ["?", _encode(query, _QUERY)]
    if hash_:
        out += ["#", _encode(fragment, _FRAGMENT)]
    return "".join(out)


def _host_port(hostport: str, default_port: int) -> str | None:
    if hostport.startswith("["):
        literal, bracket, port = hostport[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        try:
            host = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            return None
        port = port[1:]
    else:
        name, _, port = hostport.partition(":")
        try:
            converted = _host(unquote(name, errors="strict"))
        except UnicodeDecodeError:
            return None
        if converted is None:
            return None
        host = converted
    if port:
        if not port.isascii() or not port.isdigit() or int(port) > 65535:
            return None
        if int(port) != default_port:
            host += f":{int(port)}"
    return host


def _host(name: str) -> str | None:
    if not name:
        return None
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True, transitional=False, std3_rules=False).decode()
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    if any(c in _FORBIDDEN_HOST or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    last = name.rstrip(".").rsplit(".", 1)[-1]
    if last.isdigit():  # an IPv4 address, never a domain
        try:
            return str(ipaddress.IPv4Address(name.rstrip(".")))
        except ValueError:
            return None
    return name


def _path(path: str) -> str:
    segments: list[str] = []
    parts = path.replace("\\", "/").split("/")[1:] if path else [""]
    for index, segment in enumerate(parts):
        last = index == len(parts) - 1
        lowered = segment.lower()
        if lowered in _DOTDOT:
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif lowered in _DOT:
            if last:
                segments.append("")
        else:
            segments.append(_encode(segment, _PATH))
    return "/" + "/".join(segments)


def _encode(text: str, unsafe: frozenset[str]) -> str:
    if text.isascii() and not any(c in unsafe or c <= " " or c == "\x7f" for c in text):
        return text
    return "".join(
        "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        if c in unsafe or c <= " " or c >= "\x7f"
        else c
        for c in text
    )
