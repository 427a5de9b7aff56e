"""The two URLs recipients' mail clients reach: ``/o/<token>`` and ``/c/<token>``.

route -> verify token -> enqueue event -> respond. Nothing here waits on the
database (the event writer does that later), so hits are answered at the
speed of HMAC verification even while the database is down.

* Pixel: always 200 with the same 43-byte GIF and ``no-store``, whatever the
  token — a broken pixel would show an icon in the recipient's mail, and a
  different answer would tell a prober which tokens are valid.
* Click: a valid token redirects with 302 (not Starlette's default 307, which
  would replay a POST) to the URL signed into it; anything else gets a short
  404 page, never a redirect: the receiver can only send people to URLs that
  were in the message.
* HEAD answers like GET; the event is recorded with method HEAD, which the
  classifier turns into ``scanner``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from receiver.eventrecord import RawEvent, new_event
from receiver.events import EventWriter
from receiver.metrics import Metrics
from receiver.redirect import browser_url
from receiver.sessions import SelfMark
from shared.tokens import InvalidToken, Signer

log = logging.getLogger(__name__)

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==")
assert len(PIXEL) == 43

PIXEL_HEADERS = {
    "Cache-Control": "no-store, private",
    "Content-Type": "image/gif",
    "Content-Length": str(len(PIXEL)),
}
PURPOSE_HEADERS = frozenset({b"purpose", b"sec-purpose", b"x-purpose", b"x-moz"})

NOT_FOUND_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Link not valid</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 3em auto; line-height: 1.5">
<h1>This link is not valid</h1>
<p>The link you followed is incomplete or damaged, so we cannot tell where it should go.
If you copied it from an email, make sure you copied all of it, or open the email and
click the link again.</p>
</body></html>
"""


def _token(raw: str) -> str:
    """``abc.gif``, ``abc/x.png`` -> ``abc``: tokens are URL-safe base64, no dot or slash."""
    return raw.split("/", 1)[0].split(".", 1)[0]


def _event(
    scope: Scope, hot: Tracking, kind: str, message_id: int, recipient: int, link: int
) -> RawEvent:
    user_agent = b""
    cookie = b""
    purpose: list[bytes] = []
    for name, value in scope["headers"]:  # one pass; names are lower case
        if name == b"user-agent":
            user_agent = value
        elif name == b"cookie":
            cookie = value
        elif name in PURPOSE_HEADERS:
            purpose.append(value)
    client = scope.get("client")
    return new_event(
        kind,
        message_id,
        recipient,
        link,
        client[0] if client else "",
        user_agent.decode("latin-1"),
        scope["method"],
        b" ".join(purpose).decode("latin-1").lower() if purpose else "",
        hot.self_mark.carried(cookie) if cookie else False,  # recipients send no cookie
    )


# Raw ASGI endpoints: a hit is two ``send`` calls with headers encoded once at
# import, instead of a Request, a Response and their header normalisation per
# hit (~a third of the receiver's per-hit Python time in the benchmark).
_PIXEL_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in PIXEL_HEADERS.items()
    ],
}
_PIXEL_BODY = {"type": "http.response.body", "body": PIXEL}
_NOT_FOUND_BODY = NOT_FOUND_PAGE.encode("utf-8")
_NOT_FOUND_START = {
    "type": "http.response.start",
    "status": 404,
    "headers": [
        (b"cache-control", b"no-store"),
        (b"content-length", str(len(_NOT_FOUND_BODY)).encode("latin-1")),
        (b"content-type", b"text/html; charset=utf-8"),
    ],
}
_NOT_FOUND = {"type": "http.response.body", "body": _NOT_FOUND_BODY}
_REDIRECT_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-length", b"0"),
]
_EMPTY_BODY = {"type": "http.response.body", "body": b""}


@dataclass(frozen=True, slots=True)
class Tracking:
    """What /o and /c use, as ``app.tracking``.

    Not read from ``app.state``: there each attribute is a failed lookup, an
    AttributeError and a ``__getattr__`` call — measurable on the hot path.
    """

    signer: Signer
    metrics: Metrics
    writer: EventWriter
    self_mark: SelfMark  # a signed-in dashboard user's hits (receiver/sessions.py)


async def pixel(scope: Scope, receive: Receive, send: Send) -> None:
    hot: Tracking = scope["app"].tracking
    try:
        token = hot.signer.verify_open(_token(scope["path_params"]["token"]))
    except InvalidToken:
        hot.metrics.hit("open", valid=False)
    else:
        hot.metrics.hit("open", valid=True)
        hot.writer.submit(_event(scope, hot, "open", token.message_id, token.recipient, 0))
    await send(_PIXEL_START)
    await send(_PIXEL_BODY)


async def click(scope: Scope, receive: Receive, send: Send) -> None:
    hot: Tracking = scope["app"].tracking
    try:
        token = hot.signer.verify_click(_token(scope["path_params"]["token"]))
    except InvalidToken as exc:
        log.debug("invalid click token: %s", exc)
        await _not_found(hot.metrics, send)
        return
    location = browser_url(token.url)
    if location is None:
        log.warning("click token of message %d holds an unusable URL", token.message_id)
        await _not_found(hot.metrics, send)
        return
    hot.metrics.hit("click", valid=True)
    hot.writer.submit(_event(scope, hot, "click", token.message_id, token.recipient, token.link))
    headers = [(b"location", location.encode("latin-1")), *_REDIRECT_HEADERS]
    await send({"type": "http.response.start", "status": 302, "headers": headers})
    await send(_EMPTY_BODY)


async def _not_found(metrics: Metrics, send: Send) -> None:
    metrics.hit("click", valid=False)
    await send(_NOT_FOUND_START)
    await send(_NOT_FOUND)


class _Endpoint:
    """Starlette runs an endpoint that is not a function as a plain ASGI app."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


routes = [
    Route("/o/{token:path}", _Endpoint(pixel), methods=["GET", "HEAD"], name="pixel"),
    Route("/c/{token:path}", _Endpoint(click), methods=["GET", "HEAD"], name="click"),
]


class TrackingApp(Starlette):
    """Starlette, with ``/o/`` and ``/c/`` answered before its middleware and router.

    Every tracked mail loads one and follows the other, so they are the
    receiver's hot path; Starlette's two middleware layers, its router's
    regular expressions and the wrapped ``send`` of each layer cost about as
    much as the rest of a pixel hit (callgrind: ~55k of the ~240k instructions
    per hit in the whole receiver process). A GET or HEAD whose path starts
    with ``/o/`` or ``/c/`` goes straight to :func:`pixel` / :func:`click`, with
    the same ``scope["app"]`` and ``path_params`` Starlette would give them;
    anything else (other methods get their 405, a ``root_path`` mount) goes
    through Starlette, where :data:`routes` answer the same URLs the same way.
    An exception reaches the server, which answers 500, as Starlette would.
    """

    tracking: Tracking  # set by receiver.app.create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in _FAST_METHODS
            and not scope.get("root_path")
        ):
            path = scope["path"]
            handler = _FAST.get(path[:3])
            if handler is not None:
                scope["app"] = self
                scope["path_params"] = {"token": path[3:]}
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


_FAST = {"/o/": pixel, "/c/": click}
_FAST_METHODS = frozenset({"GET", "HEAD"})
