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

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from receiver.events import EventWriter, Row, new_event
from receiver.metrics import Metrics
from receiver.redirect import browser_url
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


def _event(request: Request, kind: str, message_id: int, recipient: int, link: int) -> Row:
    user_agent = b""
    purpose: list[bytes] = []
    for name, value in request.scope["headers"]:  # one pass; names are lower case
        if name == b"user-agent":
            user_agent = value
        elif name in PURPOSE_HEADERS:
            purpose.append(value)
    session = request.scope.get("session") or {}
    client = request.scope.get("client")
    return new_event(
        kind=kind,
        message_id=message_id,
        recipient=recipient,
        link=link,
        ip=client[0] if client else "",
        user_agent=user_agent.decode("latin-1"),
        method=request.method,
        purpose=b" ".join(purpose).decode("latin-1").lower(),
        dashboard_user=bool(session.get("user_id")),
    )


async def pixel(request: Request) -> Response:
    state = request.app.state
    signer: Signer = state.signer
    metrics: Metrics = state.metrics
    try:
        token = signer.verify_open(_token(request.path_params["token"]))
    except InvalidToken:
        metrics.hit("open", valid=False)
    else:
        metrics.hit("open", valid=True)
        writer: EventWriter = state.event_writer
        writer.submit(_event(request, "open", token.message_id, token.recipient, 0))
    return Response(PIXEL, headers=PIXEL_HEADERS)


async def click(request: Request) -> Response:
    state = request.app.state
    signer: Signer = state.signer
    metrics: Metrics = state.metrics
    try:
        token = signer.verify_click(_token(request.path_params["token"]))
    except InvalidToken as exc:
        log.debug("invalid click token: %s", exc)
        return _not_found(metrics)
    location = browser_url(token.url)
    if location is None:
        log.warning("click token of message %d holds an unusable URL", token.message_id)
        return _not_found(metrics)
    metrics.hit("click", valid=True)
    writer: EventWriter = state.event_writer
    writer.submit(_event(request, "click", token.message_id, token.recipient, token.link))
    return Response(
        status_code=302,
        headers={
            "Location": location,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )


def _not_found(metrics: Metrics) -> Response:
    metrics.hit("click", valid=False)
    return HTMLResponse(NOT_FOUND_PAGE, status_code=404, headers={"Cache-Control": "no-store"})


routes = [
    Route("/o/{token:path}", pixel, methods=["GET", "HEAD"], name="pixel"),
    Route("/c/{token:path}", click, methods=["GET", "HEAD"], name="click"),
]
