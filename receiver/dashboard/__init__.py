"""The dashboard, mounted by the receiver under ``/dashboard``.

Wiring (receiver/app.py)::

    Mount("/dashboard", routes=dashboard.routes, middleware=dashboard.middleware(settings))

or simply ``dashboard.mount(settings)``. The middleware (security headers,
``headers.py``; the signed session cookie) is scoped to the mount, so pixel
and click requests never touch it. The pages read ``app.state.engine`` and
``app.state.settings``; the live stream reads ``app.state.live_feed`` (a
:class:`receiver.live.LiveFeed`, started and stopped in the lifespan and
given to the event writer as its ``on_written`` hook).

One module per page family: ``auth`` (sign in/out), ``messages`` (list,
detail, CSV, live stream), ``overview``, ``admin`` (policies, suppression,
users), ``integrations`` (webhooks, API tokens), ``privacy`` (consent,
erasure), ``mailbox`` (mailbox connections, the OAuth sign-in's callback);
``web`` holds what they share, ``forms`` how forms are read.
What they read about messages comes from receiver/readmodel/, as the API's.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from receiver.dashboard import admin, auth, integrations, mailbox, messages, overview, privacy
from receiver.dashboard.headers import SecurityHeaders
from receiver.dashboard.web import STATIC_DIR
from receiver.sessions import SessionMiddleware
from shared.config import Settings

GET_POST = ["GET", "POST"]

routes: list[BaseRoute] = [
    Route("/", auth.home),
    Route("/login", auth.login, methods=GET_POST),
    Route("/logout", auth.logout, methods=["POST"]),
    Route("/messages", messages.messages_list),
    Route("/messages.csv", messages.messages_csv),
    Route("/events.csv", messages.events_csv),
    Route("/messages/{message_id:int}", messages.message_detail),
    Route("/live", messages.live),
    Route("/overview", overview.overview),
    Route("/mailbox", mailbox.mailbox_page, methods=GET_POST),
    Route("/mailbox/callback", mailbox.mailbox_callback),
    Route("/mailbox/password", mailbox.mailbox_password, methods=["POST"]),
    Route("/mailbox/{connection_id:int}/disconnect", mailbox.mailbox_disconnect, methods=["POST"]),
    Route("/mailbox/{connection_id:int}/sent", mailbox.mailbox_sent, methods=["POST"]),
    Route("/policies", admin.policies_list),
    Route("/policies/new", admin.policy_new, methods=GET_POST),
    Route("/policies/{policy_id:int}", admin.policy_edit, methods=GET_POST),
    Route("/policies/{policy_id:int}/delete", admin.policy_delete, methods=["POST"]),
    Route("/suppressions", admin.suppressions, methods=GET_POST),
    Route("/suppressions/{suppression_id:int}/delete", admin.suppression_delete, methods=["POST"]),
    Route("/users", admin.users),
    Route("/users/new", admin.user_new, methods=GET_POST),
    Route("/users/{user_id:int}", admin.user_edit, methods=GET_POST),
    Route("/users/{user_id:int}/delete", admin.user_delete, methods=["POST"]),
    Route("/webhooks", integrations.webhooks_list, methods=GET_POST),
    Route("/webhooks/{endpoint_id:int}", integrations.webhook_detail),
    Route("/webhooks/{endpoint_id:int}/active", integrations.webhook_active, methods=["POST"]),
    Route("/webhooks/{endpoint_id:int}/test", integrations.webhook_test, methods=["POST"]),
    Route("/webhooks/{endpoint_id:int}/delete", integrations.webhook_delete, methods=["POST"]),
    Route("/tokens", integrations.tokens_list, methods=GET_POST),
    Route("/tokens/{token_id:int}/revoke", integrations.token_revoke, methods=["POST"]),
    Route("/privacy", privacy.consent_page),
    Route("/privacy/mode", privacy.consent_mode, methods=["POST"]),
    Route("/privacy/mode/clear", privacy.consent_mode_clear, methods=["POST"]),
    Route("/privacy/consents", privacy.consent_add, methods=["POST"]),
    Route("/privacy/consents/remove", privacy.consent_remove, methods=["POST"]),
    Route("/privacy/erase", privacy.erase, methods=GET_POST),
    Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="dashboard-static"),
]


def middleware(settings: Settings) -> list[Middleware]:
    return [
        Middleware(SecurityHeaders),
        Middleware(SessionMiddleware, secret_key=settings.secret_key.get_secret_value()),
    ]


def mount(settings: Settings, path: str = "/dashboard") -> Mount:
    return Mount(path, routes=routes, middleware=middleware(settings), name="dashboard")
