"""Security headers on every dashboard response (pages, CSV, static files) and on
the public pages (receiver/public.py).

The Content-Security-Policy allows scripts and styles only from the dashboard
itself (``receiver/static/``): no inline script, no inline style attribute, no
``eval``, so text from mail that ever escaped the templates' autoescaping still
could not run. ``frame-ancestors 'none'`` (and ``X-Frame-Options`` for old
browsers) stops click-jacking; no Referer leaves the dashboard (message and
filter URLs name subjects and addresses); ``nosniff`` keeps a CSV a CSV.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


def csp_with_form_targets(origins: list[str]) -> str:
    """The CSP of a page whose form is answered with a redirect to another origin
    (the Mailbox page's Connect goes on to the provider: browsers apply
    ``form-action`` to the redirect too)."""
    targets = " ".join(["'self'", *sorted(set(origins))])
    return CSP.replace("form-action 'self'", f"form-action {targets}")


HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
