"""Administrators' pages: sender policies, the suppression list, users.

Forms post back to themselves; on a validation error the page is shown again
with what was typed and a sentence next to the field (status 400), on success
the browser is redirected (303) with a short confirmation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver import admin_data as data
from receiver.dashboard.queries import Viewer
from receiver.dashboard.web import engine_of, flash, not_found, page, redirect, render
from shared.users import UserError, add_user, list_users, remove_user


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _id(request: Request, name: str) -> int:
    value = int(request.path_params[name])
    return value if value < 2**31 else 0


# --- policies ---


def _policy_page(
    request: Request, form: data.PolicyInput, errors: dict[str, str], policy_id: int | None
) -> Response:
    context: dict[str, Any] = {
        "form": form,
        "errors": errors,
        "policy_id": policy_id,
        "modes": data.MODES,
        "nav": "policies",
    }
    return render(request, "dashboard/policy_form.html", context, 400 if errors else 200)


@page(admin=True)
async def policies(request: Request, viewer: Viewer) -> Response:
    rows = await asyncio.to_thread(data.list_policies, engine_of(request))
    return render(
        request,
        "dashboard/policies.html",
        {"policies": rows, "modes": data.MODES, "nav": "policies"},
    )


@page(admin=True)
async def policy_new(request: Request, viewer: Viewer) -> Response:
    if request.method == "GET":
        return _policy_page(request, data.PolicyInput(), {}, None)
    form, errors = data.parse_policy(await _form(request))
    if not errors:
        try:
            await asyncio.to_thread(data.save_policy, engine_of(request), form)
        except data.ValidationFailed as exc:
            errors = exc.errors
    if errors:
        return _policy_page(request, form, errors, None)
    flash(request, f"Policy for {form.pattern} added.")
    return redirect(request, "/policies")


@page(admin=True)
async def policy_edit(request: Request, viewer: Viewer) -> Response:
    policy_id = _id(request, "policy_id")
    engine = engine_of(request)
    policy = await asyncio.to_thread(data.get_policy, engine, policy_id)
    if policy is None:
        return not_found(request)
    if request.method == "GET":
        return _policy_page(request, data.PolicyInput.from_policy(policy), {}, policy_id)
    form, errors = data.parse_policy(await _form(request))
    if not errors:
        try:
            await asyncio.to_thread(data.save_policy, engine, form, policy_id)
        except data.ValidationFailed as exc:
            errors = exc.errors
    if errors:
        return _policy_page(request, form, errors, policy_id)
    flash(request, f"Policy for {form.pattern} saved.")
    return redirect(request, "/policies")


@page(admin=True)
async def policy_delete(request: Request, viewer: Viewer) -> Response:
    policy = await asyncio.to_thread(
        data.delete_policy, engine_of(request), _id(request, "policy_id")
    )
    if policy is None:
        return not_found(request)
    flash(request, f"Policy for {policy.pattern} removed.")
    return redirect(request, "/policies")


# --- suppression list ---


@page(admin=True)
async def suppressions(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    errors: dict[str, str] = {}
    address = ""
    if request.method == "POST":
        address = (await _form(request)).get("address", "")
        try:
            row = await asyncio.to_thread(data.add_suppression, engine, address)
        except data.ValidationFailed as exc:
            errors = exc.errors
        else:
            flash(request, f"{row.address} will not be tracked any more.")
            return redirect(request, "/suppressions")
    search = request.query_params.get("q", "").strip()[:320]
    rows = await asyncio.to_thread(data.list_suppressions, engine, search)
    return render(
        request,
        "dashboard/suppressions.html",
        {"rows": rows, "errors": errors, "address": address, "q": search, "nav": "suppressions"},
        400 if errors else 200,
    )


@page(admin=True)
async def suppression_delete(request: Request, viewer: Viewer) -> Response:
    row = await asyncio.to_thread(
        data.delete_suppression, engine_of(request), _id(request, "suppression_id")
    )
    if row is None:
        return not_found(request)
    flash(request, f"{row.address} removed from the suppression list.")
    return redirect(request, "/suppressions")


# --- users ---


def _user_page(
    request: Request, form: data.UserInput, errors: dict[str, str], user_id: int | None
) -> Response:
    context: dict[str, Any] = {
        "form": form,
        "errors": errors,
        "user_id": user_id,
        "roles": data.user_choices(),
        "nav": "users",
    }
    return render(request, "dashboard/user_form.html", context, 400 if errors else 200)


@page(admin=True)
async def users(request: Request, viewer: Viewer) -> Response:
    rows = await asyncio.to_thread(list_users, engine_of(request))
    return render(request, "dashboard/users.html", {"users": rows, "nav": "users"})


@page(admin=True)
async def user_new(request: Request, viewer: Viewer) -> Response:
    if request.method == "GET":
        return _user_page(request, data.UserInput(), {}, None)
    form, errors = data.parse_user(await _form(request), new=True)
    if not errors:
        try:
            await asyncio.to_thread(
                add_user, engine_of(request), form.username, form.password, form.role,
                form.addresses,
            )  # fmt: skip
        except UserError as exc:
            errors = {"username": str(exc).capitalize() + "."}
    if errors:
        form.password = ""
        return _user_page(request, form, errors, None)
    flash(request, f"User {form.username} added.")
    return redirect(request, "/users")


@page(admin=True)
async def user_edit(request: Request, viewer: Viewer) -> Response:
    user_id = _id(request, "user_id")
    engine = engine_of(request)
    found = await asyncio.to_thread(data.get_user, engine, user_id)
    if found is None:
        return not_found(request)
    user, addresses = found
    if request.method == "GET":
        form = data.UserInput(user.username, user.role, addresses)
        return _user_page(request, form, {}, user_id)
    form, errors = data.parse_user(await _form(request), new=False)
    form.username = user.username
    if not errors:
        try:
            await asyncio.to_thread(
                data.update_user, engine, user_id, form, acting_user_id=viewer.user_id
            )
        except data.ValidationFailed as exc:
            errors = exc.errors
    if errors:
        form.password = ""
        return _user_page(request, form, errors, user_id)
    flash(request, f"User {user.username} saved.")
    return redirect(request, "/users")


@page(admin=True)
async def user_delete(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    try:
        user = await asyncio.to_thread(
            data.check_removable, engine, _id(request, "user_id"), acting_user_id=viewer.user_id
        )
        await asyncio.to_thread(remove_user, engine, user.username)
    except data.ValidationFailed as exc:
        flash(request, exc.errors.get("", str(exc)), "error")
        return redirect(request, "/users")
    flash(request, f"User {user.username} removed.")
    return redirect(request, "/users")
