"""Administrators' pages: sender policies, the suppression list, users.

Forms post back to themselves; on a validation error the page is shown again
with what was typed and a sentence next to the field (status 400), on success
the browser is redirected (303) with a short confirmation. What may be stored
is decided in shared/policies.py and shared/users.py (see forms.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver.dashboard.forms import (
    MODE_LABELS,
    ROLE_LABELS,
    Errors,
    PolicyForm,
    UserForm,
    message,
)
from receiver.dashboard.web import (
    engine_of,
    flash,
    form_of,
    not_found,
    page,
    path_id,
    redirect,
    render,
)
from shared import policies
from shared.identity import Viewer
from shared.users import (
    UserError,
    add_user,
    check_removable,
    list_users,
    remove_user,
    update_user,
    user_by_id,
)

# --- policies ---


def _policy_page(
    request: Request, form: PolicyForm, errors: Errors, policy_id: int | None
) -> Response:
    context: dict[str, Any] = {
        "form": form,
        "errors": errors,
        "policy_id": policy_id,
        "modes": MODE_LABELS,
        "nav": "policies",
    }
    return render(request, "dashboard/policy_form.html", context, 400 if errors else 200)


@page(admin=True)
async def policies_list(request: Request, viewer: Viewer) -> Response:
    rows = await asyncio.to_thread(policies.list_policies, engine_of(request))
    return render(
        request,
        "dashboard/policies.html",
        {"policies": rows, "modes": MODE_LABELS, "nav": "policies"},
    )


async def _save_policy(request: Request, policy_id: int | None) -> Response:
    form, errors = PolicyForm.parse(await form_of(request))
    if not errors:
        try:
            await asyncio.to_thread(form.save, engine_of(request), policy_id)
        except UserError as exc:
            errors.add(exc)
    if errors:
        return _policy_page(request, form, errors, policy_id)
    flash(request, f"Policy for {form.pattern} {'added' if policy_id is None else 'saved'}.")
    return redirect(request, "/policies")


@page(admin=True)
async def policy_new(request: Request, viewer: Viewer) -> Response:
    if request.method == "GET":
        return _policy_page(request, PolicyForm(), Errors(), None)
    return await _save_policy(request, None)


@page(admin=True)
async def policy_edit(request: Request, viewer: Viewer) -> Response:
    policy_id = path_id(request, "policy_id")
    policy = await asyncio.to_thread(policies.policy_by_id, engine_of(request), policy_id)
    if policy is None:
        return not_found(request)
    if request.method == "GET":
        return _policy_page(request, PolicyForm.of(policy), Errors(), policy_id)
    return await _save_policy(request, policy_id)


@page(admin=True)
async def policy_delete(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    policy = await asyncio.to_thread(policies.policy_by_id, engine, path_id(request, "policy_id"))
    if policy is None:
        return not_found(request)
    try:
        await asyncio.to_thread(policies.remove_policy, engine, policy.pattern)
    except policies.PolicyError:  # removed meanwhile
        return not_found(request)
    flash(request, f"Policy for {policy.pattern} removed.")
    return redirect(request, "/policies")


# --- suppression list ---

SHOWN = 500


@page(admin=True)
async def suppressions(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    errors = Errors()
    address = ""
    if request.method == "POST":
        address = (await form_of(request)).get("address", "")
        try:
            row = await asyncio.to_thread(
                policies.add_suppression, engine, address, "dashboard", new=True
            )
        except UserError as exc:
            errors.add(exc)
        else:
            flash(request, f"{row.address} will not be tracked any more.")
            return redirect(request, "/suppressions")
    search = request.query_params.get("q", "").strip()[:320]
    rows = await asyncio.to_thread(policies.list_suppressions, engine, search, SHOWN + 1)
    context = {
        "rows": rows[:SHOWN],
        "more": len(rows) > SHOWN,
        "errors": errors,
        "address": address,
        "q": search,
        "nav": "suppressions",
    }
    return render(request, "dashboard/suppressions.html", context, 400 if errors else 200)


@page(admin=True)
async def suppression_delete(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    row = await asyncio.to_thread(
        policies.suppression_by_id, engine, path_id(request, "suppression_id")
    )
    if row is None:
        return not_found(request)
    try:
        await asyncio.to_thread(policies.remove_suppression, engine, row.address)
    except policies.PolicyError:  # removed meanwhile
        return not_found(request)
    flash(request, f"{row.address} removed from the suppression list.")
    return redirect(request, "/suppressions")


# --- users ---


def _user_page(request: Request, form: UserForm, errors: Errors, user_id: int | None) -> Response:
    form.password = ""
    context: dict[str, Any] = {
        "form": form,
        "errors": errors,
        "user_id": user_id,
        "roles": ROLE_LABELS,
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
        return _user_page(request, UserForm(), Errors(), None)
    form, errors = UserForm.parse(await form_of(request), new=True)
    if not errors:
        try:
            await asyncio.to_thread(
                add_user, engine_of(request), form.username, form.password, form.role,
                form.addresses,
            )  # fmt: skip
        except UserError as exc:
            errors.add(exc)
    if errors:
        return _user_page(request, form, errors, None)
    flash(request, f"User {form.username} added.")
    return redirect(request, "/users")


@page(admin=True)
async def user_edit(request: Request, viewer: Viewer) -> Response:
    user_id = path_id(request, "user_id")
    engine = engine_of(request)
    found = await asyncio.to_thread(user_by_id, engine, user_id)
    if found is None:
        return not_found(request)
    user, addresses = found
    if request.method == "GET":
        return _user_page(request, UserForm(user.username, user.role, addresses), Errors(), user_id)
    form, errors = UserForm.parse(await form_of(request), new=False)
    form.username = user.username
    if not errors:
        try:
            await asyncio.to_thread(
                lambda: update_user(
                    engine,
                    user_id,
                    role=form.role,
                    addresses=form.addresses,
                    password=form.password,
                    acting_user_id=viewer.user_id,
                )
            )
        except UserError as exc:
            errors.add(exc)
    if errors:
        return _user_page(request, form, errors, user_id)
    flash(request, f"User {user.username} saved.")
    return redirect(request, "/users")


@page(admin=True)
async def user_delete(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    try:
        user = await asyncio.to_thread(
            lambda: check_removable(
                engine, path_id(request, "user_id"), acting_user_id=viewer.user_id
            )
        )
        await asyncio.to_thread(remove_user, engine, user.username)
    except UserError as exc:
        flash(request, message(exc), "error")
        return redirect(request, "/users")
    flash(request, f"User {user.username} removed.")
    return redirect(request, "/users")
