"""Policies, suppression and consent as JSON: the admin-only resources.

Each endpoint checks JSON types and hands the values to the module that owns
the rule (shared/policies.py, shared/consent.py), which checks the values;
a :class:`shared.errors.UserError` from there becomes a 400 with its text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from receiver.api.endpoint import (
    MAX_ID_32,
    ApiError,
    address_of,
    endpoint,
    engine_of,
    id_param,
    iso,
    json_body,
)
from shared import consent, policies
from shared.addresses import normalize_address
from shared.errors import UserError
from shared.identity import Viewer
from shared.models import Consent, Policy, Suppression

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
async def list_policies(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Per-sender policies, in the order they apply: addresses, @domains, then *."""
    rows = await asyncio.to_thread(policies.list_policies, engine_of(request))
    return {"policies": [_policy(p) for p in rows]}


@endpoint(admin=True)
async def put_policy(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Create or replace the policy of a pattern (address, @domain or *)."""
    pattern, values = _policy_values(await json_body(request))
    try:
        policy = await asyncio.to_thread(
            lambda: policies.set_policy(engine_of(request), pattern, **values)
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
async def delete_policy(request: Request, viewer: Viewer) -> None:
    """Remove a policy."""
    policy_id = id_param(request, "policy_id", "policy", MAX_ID_32)
    engine = engine_of(request)
    policy = await asyncio.to_thread(policies.policy_by_id, engine, policy_id)
    if policy is None:
        raise ApiError(404, f"no policy {policy_id}")
    try:
        await asyncio.to_thread(policies.remove_policy, engine, policy.pattern)
    except policies.PolicyError:  # removed meanwhile
        raise ApiError(404, f"no policy {policy_id}") from None


# --- suppression (admin) ---


def _listed(row: Suppression | Consent) -> dict[str, Any]:
    """A suppression or a consent: the same three fields."""
    return {"address": row.address, "source": row.source, "created_at": iso(row.created_at)}


@endpoint(admin=True)
async def list_suppressions(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Recipients never tracked."""
    rows = await asyncio.to_thread(policies.list_suppressions, engine_of(request))
    return {"suppressions": [_listed(r) for r in rows]}


@endpoint(admin=True, status=201)
async def add_suppression(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Stop tracking a recipient."""
    address = (await json_body(request)).get("address")
    if not isinstance(address, str):
        raise ApiError(400, "address must be a string")
    try:
        row = await asyncio.to_thread(policies.add_suppression, engine_of(request), address, "api")
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return _listed(row)


@endpoint(admin=True)
async def remove_suppression(request: Request, viewer: Viewer) -> None:
    """Track a recipient again (subject to consent and policy)."""
    try:
        address = normalize_address(request.path_params["address"])
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        await asyncio.to_thread(policies.remove_suppression, engine_of(request), address)
    except policies.PolicyError:
        raise ApiError(404, f"{address} is not suppressed") from None


# --- consent (admin) ---


@endpoint(admin=True)
async def list_consents(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Recorded consents and the consent modes."""
    engine = engine_of(request)
    rows = await asyncio.to_thread(consent.list_consents, engine)
    modes = await asyncio.to_thread(consent.list_modes, engine)
    return {
        "consents": [_listed(c) for c in rows],
        "modes": [{"domain": d, "mode": m} for d, m in sorted(modes.items())],
    }


@endpoint(admin=True, status=201)
async def add_consent(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Record that a recipient agreed to be tracked."""
    body = await json_body(request)
    address = address_of(body.get("address"))
    source = body.get("source", "api")
    if not isinstance(source, str):
        raise ApiError(400, "source must be a string")
    await asyncio.to_thread(consent.add_consent, engine_of(request), address, source)
    rows = await asyncio.to_thread(consent.list_consents, engine_of(request))
    row = next(c for c in rows if c.address == address)
    return _listed(row)


@endpoint(admin=True)
async def remove_consent(request: Request, viewer: Viewer) -> None:
    """Withdraw a consent."""
    address = address_of(request.path_params["address"])
    if not await asyncio.to_thread(consent.remove_consent, engine_of(request), address):
        raise ApiError(404, f"no consent recorded for {address}")


@endpoint(admin=True)
async def put_consent_mode(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Set the consent mode of a recipient domain, or of ``*`` (the default)."""
    body = await json_body(request)
    domain, mode = body.get("domain", "*"), body.get("mode")
    if not isinstance(domain, str) or not isinstance(mode, str):
        raise ApiError(400, "domain and mode must be strings")
    try:
        await asyncio.to_thread(consent.set_mode, engine_of(request), mode, domain)
    except UserError as exc:
        raise ApiError(400, str(exc)) from None
    return {"domain": consent.normalize_domain(domain), "mode": mode}
