"""The JSON API under ``/api/v1``: messages, events, policies, suppression, consent.

Callers authenticate with ``Authorization: Bearer trk_...`` (shared/apitokens.py)
and act with their user's dashboard role: ``admin`` sees and manages
everything; ``sender`` sees only messages whose envelope sender matches their
addresses (and those messages' events) and manages nothing. A message outside
the caller's scope is a 404, so its existence does not leak.

Errors are JSON ``{"error": "..."}`` with a 4xx status, unknown paths and
methods included (the mount has its own exception handler). Message ids are
63-bit and are strings in JSON, which JavaScript could not hold as numbers.
The OpenAPI document (receiver/openapi.py) is served at ``/openapi.json``; a
test checks that it lists exactly the routes below.

Modules by job: ``endpoint`` (token, role, errors, parameters), ``messages``
(messages and events, read through receiver/readmodel/ like the dashboard),
``admin`` (policies, suppression, consent); this one lists the routes.

Wire it into receiver/app.py with ``api.mount`` (it reads
``request.app.state.engine``).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from receiver.api.admin import (
    add_consent,
    add_suppression,
    delete_policy,
    list_consents,
    list_policies,
    list_suppressions,
    put_consent_mode,
    put_policy,
    remove_consent,
    remove_suppression,
)
from receiver.api.messages import get_message, list_events, list_messages
from receiver.openapi import document


async def openapi(request: Request) -> Response:
    """The OpenAPI 3.1 document of this API (no token needed)."""
    return JSONResponse(document(str(request.base_url).rstrip("/") + "/api/v1"))


async def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: "no such API path", 405: "method not allowed"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)


routes = [
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/messages", list_messages, methods=["GET"]),
    Route("/messages/{message_id:int}", get_message, methods=["GET"]),
    Route("/events", list_events, methods=["GET"]),
    Route("/policies", list_policies, methods=["GET"]),
    Route("/policies", put_policy, methods=["PUT"]),
    Route("/policies/{policy_id:int}", delete_policy, methods=["DELETE"]),
    Route("/suppressions", list_suppressions, methods=["GET"]),
    Route("/suppressions", add_suppression, methods=["POST"]),
    Route("/suppressions/{address}", remove_suppression, methods=["DELETE"]),
    Route("/consents", list_consents, methods=["GET"]),
    Route("/consents", add_consent, methods=["POST"]),
    Route("/consents/{address}", remove_consent, methods=["DELETE"]),
    Route("/consent-modes", put_consent_mode, methods=["PUT"]),
]

mount = Mount(
    "/api/v1",
    routes=routes,
    middleware=[Middleware(ExceptionMiddleware, handlers={HTTPException: _error})],
)
