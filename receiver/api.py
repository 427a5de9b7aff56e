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

Wire it into receiver/app.py with ``api.mount`` (it reads
``request.app.state.engine``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, or_, select
from sqlmodel import col
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from receiver.openapi import document
from shared import consent, policies
from shared.addresses import normalize_address, spellings
from shared.apitokens import Principal, authenticate_token
from shared.db import session_scope
from shared.isotime import iso, parse
from shared.models import Event, Link, Message, Policy, Recipient, Suppression
from shared.users import UserError
from shared.verdicts import COUNTED

log = logging.getLogger(__name__)

MAX_LIMIT = 200


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request, Principal], Awaitable[Any]]


def endpoint(
    admin: bool = False, status: int = 200
) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Authenticate, check the role, turn the result or an ApiError into JSON."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            try:
                principal = await _principal(request)
                if admin and not principal.is_admin:
                    raise ApiError(403, "this needs an admin token")
                result = await handler(request, principal)
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


async def _principal(request: Request) -> Principal:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "send an API token as 'Authorization: Bearer <token>'")
    principal = await asyncio.to_thread(authenticate_token, _engine(request), token.strip())
    if principal is None:
        raise ApiError(401, "unknown or revoked API token")
    return principal


def _table(model: Any) -> Any:
    """The SQLAlchemy table of a SQLModel class (untyped in SQLModel's stubs)."""
    return model.__table__


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _db(request: Request, func_: Callable[..., Any], *args: Any) -> Any:
    """Run ``func_(conn, *args)`` in a transaction, off the event loop."""

    def work() -> Any:
        with session_scope(_engine(request)) as session:
            return func_(session.connection(), *args)

    return await asyncio.to_thread(work)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


# --- parameters ---


def _bool(request: Request, name: str) -> bool | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, f"{name} must be true or false")


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
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


def _time(request: Request, name: str, end_of_day: bool = False) -> datetime | None:
    value = request.query_params.get(name)
    if not value:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day, time.max if end_of_day else time.min, tzinfo=UTC)
        return parse(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time") from None


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "address must be a string")
    try:
        address = normalize_address(value)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    if address.startswith("@"):
        raise ApiError(400, "address must be one email address")
    return address


# --- scope ---


def _scope(principal: Principal) -> Any:
    """A WHERE clause limiting messages to what the principal may see."""
    if principal.is_admin:
        return None
    sender = func.lower(col(Message.sender))
    clauses = [  # a sender keeps what MAIL FROM said: an IDN domain may be in Unicode
        sender.endswith(p, autoescape=True) if p.startswith("@") else sender == p
        for pattern in principal.addresses
        for p in spellings(pattern)
    ]
    return or_(*clauses) if clauses else col(Message.id).is_(None)


def _hit(kind: str) -> Any:
    return exists().where(
        col(Event.message_id) == col(Message.id),
        col(Event.kind) == kind,
        col(Event.verdict).in_(COUNTED),
    )


# --- messages ---


@endpoint()
async def list_messages(request: Request, principal: Principal) -> dict[str, Any]:
    """Messages, newest first, filtered like the dashboard."""
    where = [c for c in [_scope(principal)] if c is not None]
    tracked, opened, clicked = (
        _bool(request, "tracked"),
        _bool(request, "opened"),
        _bool(request, "clicked"),
    )
    if tracked is not None:
        is_tracked = or_(col(Message.track_opens), col(Message.track_clicks))
        where.append(is_tracked if tracked else ~is_tracked)
    if opened is not None:
        where.append(_hit("open") if opened else ~_hit("open"))
    if clicked is not None:
        where.append(_hit("click") if clicked else ~_hit("click"))
    if sender := request.query_params.get("sender"):
        where.append(func.lower(col(Message.sender)) == sender.strip().lower())
    if since := _time(request, "since"):
        where.append(col(Message.created_at) >= since)
    if until := _time(request, "until", end_of_day=True):
        where.append(col(Message.created_at) <= until)
    if q := request.query_params.get("q", "").strip().lower():
        where.append(
            or_(
                func.lower(col(Message.subject)).contains(q, autoescape=True),
                exists().where(
                    col(Recipient.message_id) == col(Message.id),
                    func.lower(col(Recipient.address)).contains(q, autoescape=True),
                ),
            )
        )
    limit = _int(request, "limit", 50, 1, MAX_LIMIT)
    offset = _int(request, "offset", 0, 0, 10**9)
    return await _db(request, _messages_page, where, limit, offset)


def _messages_page(conn: Connection, where: list[Any], limit: int, offset: int) -> dict[str, Any]:
    condition = and_(True, *where)
    total = conn.execute(select(func.count()).select_from(Message).where(condition)).scalar_one()
    rows = conn.execute(
        select(_table(Message))
        .where(condition)
        .order_by(col(Message.created_at).desc(), col(Message.id).desc())
        .limit(limit)
        .offset(offset)
    ).all()
    messages = [Message(**row._mapping) for row in rows]
    ids = [m.id for m in messages]
    stats = _stats(conn, ids)
    addresses: dict[int, list[str]] = {}
    for mid, address in conn.execute(
        select(col(Recipient.message_id), col(Recipient.address))
        .where(col(Recipient.message_id).in_(ids))
        .order_by(col(Recipient.position))
    ):
        addresses.setdefault(mid, []).append(address)
    return {
        "messages": [
            {**_message(m), **stats.get(m.id, _NO_STATS), "recipients": addresses.get(m.id, [])}
            for m in messages
        ],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


_NO_STATS = {"opens": 0, "clicks": 0, "first_opened_at": None, "first_clicked_at": None}


def _stats(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    stats: dict[int, dict[str, Any]] = {}
    for mid, kind, count, first in conn.execute(
        select(
            col(Event.message_id), col(Event.kind), func.count(), func.min(col(Event.occurred_at))
        )
        .where(col(Event.message_id).in_(ids), col(Event.verdict).in_(COUNTED))
        .group_by(col(Event.message_id), col(Event.kind))
    ):
        entry = stats.setdefault(mid, dict(_NO_STATS))
        if kind == "open":
            entry.update(opens=count, first_opened_at=iso(first))
        elif kind == "click":
            entry.update(clicks=count, first_clicked_at=iso(first))
    return stats


@endpoint()
async def get_message(request: Request, principal: Principal) -> dict[str, Any]:
    """One message with its recipients, links and events."""
    message_id = int(request.path_params["message_id"])
    found = await _db(request, _message_detail, message_id, _scope(principal))
    if found is None:
        raise ApiError(404, f"no message {message_id}")
    return found


def _message_detail(conn: Connection, message_id: int, scope: Any) -> dict[str, Any] | None:
    where = [col(Message.id) == message_id] + ([scope] if scope is not None else [])
    row = conn.execute(select(_table(Message)).where(*where)).first()
    if row is None:
        return None
    message = Message(**row._mapping)
    events = [
        Event(**r._mapping)
        for r in conn.execute(
            select(_table(Event)).where(col(Event.message_id) == message_id).order_by(col(Event.id))
        )
    ]
    recipients = [
        Recipient(**r._mapping)
        for r in conn.execute(
            select(_table(Recipient))
            .where(col(Recipient.message_id) == message_id)
            .order_by(col(Recipient.position))
        )
    ]
    links = [
        Link(**r._mapping)
        for r in conn.execute(
            select(_table(Link))
            .where(col(Link.message_id) == message_id)
            .order_by(col(Link.position))
        )
    ]
    counted = [e for e in events if e.verdict in COUNTED]

    def first(kind: str, **match: int) -> str | None:
        times = [
            e.occurred_at
            for e in counted
            if e.kind == kind and all(getattr(e, k) == v for k, v in match.items())
        ]
        return iso(min(times)) if times else None

    return {
        **_message(message),
        **_stats(conn, [message_id]).get(message_id, _NO_STATS),
        "recipients": [
            {
                "position": r.position,
                "address": r.address,
                "tracked": r.tracked,
                "status": r.status,
                "reply_code": r.reply_code,
                "reply_text": r.reply_text,
                "first_opened_at": first("open", recipient_position=r.position),
                "clicks": sum(
                    1 for e in counted if e.kind == "click" and e.recipient_position == r.position
                ),
            }
            for r in recipients
        ],
        "links": [
            {
                "position": link.position,
                "url": link.url,
                "clicks": sum(
                    1 for e in counted if e.kind == "click" and e.link_position == link.position
                ),
            }
            for link in links
        ],
        "events": [_event(e) for e in events],
    }


def _message(m: Message) -> dict[str, Any]:
    return {
        "id": str(m.id),
        "created_at": iso(m.created_at),
        "sender": m.sender,
        "from": m.from_header,
        "subject": m.subject,
        "message_id_header": m.message_id_header,
        "status": m.status,
        "track_opens": m.track_opens,
        "track_clicks": m.track_clicks,
        "per_recipient": m.per_recipient,
    }


def _event(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "message_id": str(e.message_id),
        "kind": e.kind,
        "recipient_position": e.recipient_position,
        "link_position": e.link_position,
        "occurred_at": iso(e.occurred_at),
        "verdict": e.verdict,
        "reasons": [r for r in e.reasons.split(",") if r],
        "ip": e.ip,
        "user_agent": e.user_agent,
    }


# --- events ---


@endpoint()
async def list_events(request: Request, principal: Principal) -> dict[str, Any]:
    """Events with an id above ``after``, oldest first: poll with ``next_after``."""
    after = _int(request, "after", 0, 0, 2**62)
    limit = _int(request, "limit", 100, 1, 1000)
    return await _db(request, _events_after, after, limit, _scope(principal))


def _events_after(conn: Connection, after: int, limit: int, scope: Any) -> dict[str, Any]:
    statement = select(_table(Event)).where(col(Event.id) > after)
    if scope is not None:
        statement = statement.where(col(Event.message_id).in_(select(col(Message.id)).where(scope)))
    rows = conn.execute(statement.order_by(col(Event.id)).limit(limit)).all()
    events = [_event(Event(**row._mapping)) for row in rows]
    return {"events": events, "next_after": events[-1]["id"] if events else after}


# --- policies (admin) ---


def _policy(p: Policy) -> dict[str, Any]:
    return {
        "id": p.id,
        "pattern": p.pattern,
        "mode": p.mode,
        "allow_opens": p.allow_opens,
        "allow_clicks": p.allow_clicks,
        "allow_text_links": p.allow_text_links,
        "per_recipient": p.per_recipient,
        "recipient_cap": p.recipient_cap,
        "notify": p.notify,
        "updated_at": iso(p.updated_at),
    }


@endpoint(admin=True)
async def list_policies(request: Request, principal: Principal) -> dict[str, Any]:
    """Per-sender policies, in the order they apply: addresses, @domains, then *."""
    rows = await asyncio.to_thread(policies.list_policies, _engine(request))
    return {"policies": [_policy(p) for p in rows]}


@endpoint(admin=True)
async def put_policy(request: Request, principal: Principal) -> dict[str, Any]:
    """Create or replace the policy of a pattern (address, @domain or *)."""
    pattern, values = _policy_values(await _json_body(request))
    try:
        policy = await asyncio.to_thread(
            lambda: policies.set_policy(_engine(request), pattern, **values)
        )
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return _policy(policy)


_POLICY_FIELDS = (
    "mode",
    "allow_opens",
    "allow_clicks",
    "allow_text_links",
    "per_recipient",
    "recipient_cap",
    "notify",
)


def _policy_values(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The JSON's pattern and every field (absent ones at their defaults: a PUT
    replaces). Only JSON types are checked here; shared/policies.py checks values."""
    pattern = body.get("pattern")
    if not isinstance(pattern, str) or not pattern.strip():
        raise ApiError(400, "pattern is required: an address, @domain or *")
    unknown = set(body) - {"pattern", "id", "updated_at", *_POLICY_FIELDS}
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}")
    defaults = Policy(pattern=pattern)
    values: dict[str, Any] = {}
    for name in _POLICY_FIELDS:
        value = body.get(name, getattr(defaults, name))
        expected = type(getattr(defaults, name))
        if type(value) is not expected:
            raise ApiError(
                400,
                f"{name} must be {'an integer' if expected is int else 'a ' + expected.__name__}",
            )
        values[name] = value
    return pattern, values


@endpoint(admin=True)
async def delete_policy(request: Request, principal: Principal) -> None:
    """Remove a policy."""
    policy_id = int(request.path_params["policy_id"])
    engine = _engine(request)
    policy = await asyncio.to_thread(policies.policy_by_id, engine, policy_id)
    if policy is None:
        raise ApiError(404, f"no policy {policy_id}")
    try:
        await asyncio.to_thread(policies.remove_policy, engine, policy.pattern)
    except policies.PolicyError:  # removed meanwhile
        raise ApiError(404, f"no policy {policy_id}") from None


# --- suppression (admin) ---


def _suppression(row: Suppression) -> dict[str, Any]:
    return {"address": row.address, "source": row.source, "created_at": iso(row.created_at)}


@endpoint(admin=True)
async def list_suppressions(request: Request, principal: Principal) -> dict[str, Any]:
    """Recipients never tracked."""
    rows = await asyncio.to_thread(policies.list_suppressions, _engine(request))
    return {"suppressions": [_suppression(r) for r in rows]}


@endpoint(admin=True, status=201)
async def add_suppression(request: Request, principal: Principal) -> dict[str, Any]:
    """Stop tracking a recipient."""
    address = (await _json_body(request)).get("address")
    if not isinstance(address, str):
        raise ApiError(400, "address must be a string")
    try:
        row = await asyncio.to_thread(policies.add_suppression, _engine(request), address, "api")
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return _suppression(row)


@endpoint(admin=True)
async def remove_suppression(request: Request, principal: Principal) -> None:
    """Track a recipient again (subject to consent and policy)."""
    try:
        address = normalize_address(request.path_params["address"])
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        await asyncio.to_thread(policies.remove_suppression, _engine(request), address)
    except policies.PolicyError:
        raise ApiError(404, f"{address} is not suppressed") from None


# --- consent (admin) ---


@endpoint(admin=True)
async def list_consents(request: Request, principal: Principal) -> dict[str, Any]:
    """Recorded consents and the consent modes."""
    engine = _engine(request)
    rows = await asyncio.to_thread(consent.list_consents, engine)
    modes = await asyncio.to_thread(consent.list_modes, engine)
    return {
        "consents": [
            {"address": c.address, "source": c.source, "created_at": iso(c.created_at)}
            for c in rows
        ],
        "modes": [{"domain": d, "mode": m} for d, m in sorted(modes.items())],
    }


@endpoint(admin=True, status=201)
async def add_consent(request: Request, principal: Principal) -> dict[str, Any]:
    """Record that a recipient agreed to be tracked."""
    body = await _json_body(request)
    address = _address(body.get("address"))
    source = body.get("source", "api")
    if not isinstance(source, str):
        raise ApiError(400, "source must be a string")
    await asyncio.to_thread(consent.add_consent, _engine(request), address, source)
    rows = await asyncio.to_thread(consent.list_consents, _engine(request))
    row = next(c for c in rows if c.address == address)
    return {"address": row.address, "source": row.source, "created_at": iso(row.created_at)}


@endpoint(admin=True)
async def remove_consent(request: Request, principal: Principal) -> None:
    """Withdraw a consent."""
    address = _address(request.path_params["address"])
    if not await asyncio.to_thread(consent.remove_consent, _engine(request), address):
        raise ApiError(404, f"no consent recorded for {address}")


@endpoint(admin=True)
async def put_consent_mode(request: Request, principal: Principal) -> dict[str, Any]:
    """Set the consent mode of a recipient domain, or of ``*`` (the default)."""
    body = await _json_body(request)
    domain, mode = body.get("domain", "*"), body.get("mode")
    if not isinstance(domain, str) or not isinstance(mode, str):
        raise ApiError(400, "domain and mode must be strings")
    try:
        await asyncio.to_thread(consent.set_mode, _engine(request), mode, domain)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return {"domain": consent.normalize_domain(domain), "mode": mode}


# --- the document ---


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
