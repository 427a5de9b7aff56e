"""Administrators' pages: sender policies, the suppression list, users.

Forms post back to themselves; on a validation error the page is shown again
with what was typed and a sentence next to the field (status 400), on success
the browser is redirected (303) with a short confirmation. What may be stored
is decided in shared/policies.py and shared/users.py (see forms.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
    form_page,
    not_found,
    page,
    path_id,
    redirect,
    remove_page,
    render,
    render_form,
    then_redirect,
)
from shared import policies
from shared.errors import UserError
from shared.identity import Viewer
from shared.models import Suppression
from shared.users import (
    add_user,
    check_removable,
    list_users,
    remove_user,
    update_user,
    user_by_id,
)

# --- policies ---


async def _policy_form(request: Request, policy_id: int | None, initial: PolicyForm) -> Response:
    """The new-policy page (``policy_id`` None) or one policy's edit page."""
    engine = engine_of(request)

    async def show(form: PolicyForm, errors: Errors) -> Response:
        context = {"form": form, "policy_id": policy_id, "modes": MODE_LABELS, "nav": "policies"}
        return render_form(request, "dashboard/policy_form.html", context, errors)

    def said(form: PolicyForm, _: object) -> str:
        return f"Policy for {form.pattern} {'added' if policy_id is None else 'saved'}."

    return await form_page(
        request,
        initial,
        show=show,
        read=PolicyForm.parse,
        save=lambda form: form.save(engine, policy_id),
        done=then_redirect(request, "/policies", said),
    )


@page(admin=True)
async def policies_list(request: Request, viewer: Viewer) -> Response:
    rows = await asyncio.to_thread(policies.list_policies, engine_of(request))
    return render(
        request,
        "dashboard/policies.html",
        {"policies": rows, "modes": MODE_LABELS, "nav": "policies"},
    )


@page(admin=True)
async def policy_new(request: Request, viewer: Viewer) -> Response:
    return await _policy_form(request, None, PolicyForm())


@page(admin=True)
async def policy_edit(request: Request, viewer: Viewer) -> Response:
    policy_id = path_id(request, "policy_id")
    policy = await asyncio.to_thread(policies.policy_by_id, engine_of(request), policy_id)
    if policy is None:
        return not_found(request)
    return await _policy_form(request, policy_id, PolicyForm.of(policy))


@page(admin=True)
async def policy_delete(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    policy = await asyncio.to_thread(policies.policy_by_id, engine, path_id(request, "policy_id"))
    return await remove_page(
        request,
        policy,
        lambda p: policies.remove_policy(engine, p.pattern),
        lambda p: f"Policy for {p.pattern} removed.",
        "/policies",
    )


# --- suppression list ---

SHOWN = 500


@page(admin=True)
async def suppressions(request: Request, viewer: Viewer) -> Response:
    """The list (searchable) beside the form that adds an address."""
    engine = engine_of(request)

    async def show(address: str, errors: Errors) -> Response:
        search = request.query_params.get("q", "").strip()[:320]
        rows = await asyncio.to_thread(policies.list_suppressions, engine, search, SHOWN + 1)
        context = {
            "rows": rows[:SHOWN],
            "more": len(rows) > SHOWN,
            "address": address,
            "q": search,
            "nav": "suppressions",
        }
        return render_form(request, "dashboard/suppressions.html", context, errors)

    def said(_: str, row: Suppression) -> str:
        return f"{row.address} will not be tracked any more."

    return await form_page(
        request,
        "",
        show=show,
        read=lambda posted: (posted.get("address", ""), Errors()),
        save=lambda address: policies.add_suppression(engine, address, "dashboard", new=True),
        done=then_redirect(request, "/suppressions", said),
    )


@page(admin=True)
async def suppression_delete(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    row = await asyncio.to_thread(
        policies.suppression_by_id, engine, path_id(request, "suppression_id")
    )
    return await remove_page(
        request,
        row,
        lambda r: policies.remove_suppression(engine, r.address),
        lambda r: f"{r.address} removed from the suppression list.",
        "/suppressions",
    )


# --- users ---


async def _user_form(
    request: Request,
    user_id: int | None,
    initial: UserForm,
    save: Callable[[UserForm], object],
    verb: str,
) -> Response:
    """The new-user page (``user_id`` None) or one user's; ``verb``: what the flash says."""

    async def show(form: UserForm, errors: Errors) -> Response:
        form.password = ""  # never sent back to the browser
        context = {"form": form, "user_id": user_id, "roles": ROLE_LABELS, "nav": "users"}
        return render_form(request, "dashboard/user_form.html", context, errors)

    def read(posted: dict[str, str]) -> tuple[UserForm, Errors]:
        form, errors = UserForm.parse(posted, new=user_id is None)
        form.username = form.username if user_id is None else initial.username  # fixed once made
        return form, errors

    def said(form: UserForm, _: object) -> str:
        return f"User {form.username} {verb}."

    done = then_redirect(request, "/users", said)
    return await form_page(request, initial, show=show, read=read, save=save, done=done)


@page(admin=True)
async def users(request: Request, viewer: Viewer) -> Response:
    rows = await asyncio.to_thread(list_users, engine_of(request))
    return render(request, "dashboard/users.html", {"users": rows, "nav": "users"})


@page(admin=True)
async def user_new(request: Request, viewer: Viewer) -> Response:
    engine = engine_of(request)
    return await _user_form(
        request,
        None,
        UserForm(),
        lambda form: add_user(engine, form.username, form.password, form.role, form.addresses),
        "added",
    )


@page(admin=True)
async def user_edit(request: Request, viewer: Viewer) -> Response:
    user_id = path_id(request, "user_id")
    engine = engine_of(request)
    found = await asyncio.to_thread(user_by_id, engine, user_id)
    if found is None:
        return not_found(request)
    user, addresses = found

    def save(form: UserForm) -> object:
        return update_user(
            engine,
            user_id,
            role=form.role,
            addresses=form.addresses,
            password=form.password,
            acting_user_id=viewer.user_id,
        )

    initial = UserForm(user.username, user.role, addresses)
    return await _user_form(request, user_id, initial, save, "saved")


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
