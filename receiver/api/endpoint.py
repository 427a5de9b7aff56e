"""What every API endpoint shares: the token check, the role rule, errors, parameters.

:func:`endpoint` is where the rules live in one place: no valid token → 401
(with ``WWW-Authenticate: Bearer``); an admin endpoint for a sender's token →
403; an :class:`ApiError` raised anywhere → ``{"error": ...}`` with its status;
``None`` returned → 204. Handlers get the caller as a
:class:`shared.identity.Viewer`, the same identity the dashboard uses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any

from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver.readmodel import day_end, day_start
from shared.addresses import normalize_address
from shared.apitokens import authenticate_token
from shared.errors import UserError
from shared.identity import Viewer
from shared.isotime import iso as iso  # re-exported for the API's modules
from shared.isotime import parse


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request, Viewer], Awaitable[Any]]
Endpoint = Callable[[Request], Awaitable[Response]]


def endpoint(admin: bool = False, status: int = 200) -> Callable[[Handler], Endpoint]:
    """Authenticate, check the role, turn the result or an ApiError into JSON."""

    def wrap(handler: Handler) -> Endpoint:
        async def route(request: Request) -> Response:
            try:
                viewer = await _caller(request)
                if admin and not viewer.is_admin:
                    raise ApiError(403, "this needs an admin token")
                result = await handler(request, viewer)
            except ApiError as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                return JSONResponse({"error": exc.message}, exc.status, headers=headers)
            if result is None:
                return Response(status_code=204)
            return JSONResponse(result, status)

        route.__name__ = handler.__name__
        route.__doc__ = handler.__doc__
        return route

    return wrap


async def _caller(request: Request) -> Viewer:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "send an API token as 'Authorization: Bearer <token>'")
    viewer = await asyncio.to_thread(authenticate_token, engine_of(request), token.strip())
    if viewer is None:
        raise ApiError(401, "unknown or revoked API token")
    return viewer


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


# --- parameters: a bad value is a 400 that names the parameter ---


def bool_param(request: Request, name: str) -> bool | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name} must be true or false")


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= number <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return number


MAX_ID = 2**63 - 1  # message ids are 64-bit signed integers in the database
MAX_ID_32 = 2**31 - 1  # the other tables number their rows in 32 bits


def id_param(request: Request, name: str, what: str, high: int = MAX_ID) -> int:
    """A database id from the path; one out of the column's range is a 404, not a 500."""
    value = int(request.path_params[name])
    if not 0 < value <= high:
        raise ApiError(404, f"no {what} {value}")
    return value


def text_param(request: Request, name: str) -> str:
    """A search text; control characters (NUL: PostgreSQL cannot compare it) are a 400."""
    value = request.query_params.get(name, "")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ApiError(400, f"{name} must not contain control characters")
    return value


def time_param(request: Request, name: str, end_of_day: bool = False) -> datetime | None:
    """A date (the start, or with ``end_of_day`` the end, of that UTC day) or a time."""
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return day_end(day) if end_of_day else day_start(day)
        return parse(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time") from None


def address_of(value: Any) -> str:
    """One normalised email address from JSON or a path, or a 400."""
    if not isinstance(value, str):
        raise ApiError(400, "address must be a string")
    try:
        address = normalize_address(value)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    if address.startswith("@"):
        raise ApiError(400, "address must be one email address")
    return address
