"""The receiver: one Starlette app, one list of routes, resources in ``lifespan``.

``create_app(settings, engine)`` is what ``trackrelay serve`` and
``trackrelay receiver`` run. Shared objects live on ``app.state``:

=====================  =======================================================
``settings``           the Settings
``engine``             the SQLAlchemy engine (given, or made in lifespan)
``signer``             shared.tokens.Signer over settings.signing_keys()
``metrics``            receiver.metrics.Metrics
``event_writer``       receiver.events.EventWriter (queue, writer process, journal)
``on_written``         ``event_writer.subscribe``: register
                       ``async def listener(rows: list[dict]) -> None``,
                       called after each committed batch with its rows
                       that may notify someone
``public_forms``       signing for the public "stop tracking me" forms
``live_feed``          receiver.live.LiveFeed: dashboard notifications (SSE)
=====================  =======================================================

and ``app.tracking`` (receiver.tracking.Tracking): the signer, metrics and event
writer again, for /o and /c, which read them on every hit.

Background work started in the lifespan: the event writer (and its writer
process, receiver/eventstore.py), the live feed
(PostgreSQL LISTEN/NOTIFY across processes), the webhook/notification outbox
worker and the retention purge loop.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from receiver import api, dashboard, public, tracking
from receiver.events import EventWriter
from receiver.live import LiveFeed
from receiver.metrics import Metrics
from receiver.sessions import SelfMark
from shared import db, privacy
from shared.config import Settings, load_settings
from shared.outbox_worker import OutboxWorker
from shared.tokens import Signer

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 3.0


async def healthz(request: Request) -> Response:
    """200 when the database answers and events are being written, else 503.

    Also 503 for a minute after any hit was lost (``event_writer: dropping``):
    the journal's disk full while the database is away, or the queue full.
    """
    state = request.app.state
    writer: EventWriter = state.event_writer
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, state.engine), HEALTH_TIMEOUT)
        database = "ok"
    except Exception as exc:
        database = f"unreachable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    files, size = writer.journal.size()
    dropping = writer.dropping
    healthy = database == "ok" and not writer.degraded and not dropping
    body = {
        "status": "ok" if healthy else "degraded",
        "database": database,
        "event_writer": "dropping" if dropping else writer.state,
        "queue_depth": writer.depth,
        "journal_files": files,
        "journal_bytes": size,
    }
    return JSONResponse(body, status_code=200 if healthy else 503, headers=_NO_STORE)


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


async def metrics(request: Request) -> Response:
    """Prometheus text: for loopback clients, the metrics token, or all (a setting)."""
    if not _may_read_metrics(request):
        return PlainTextResponse(
            "metrics are for local clients or with TRACKRELAY_METRICS_TOKEN "
            "(or set TRACKRELAY_METRICS_PUBLIC=true)\n",
            status_code=403,
            headers=_NO_STORE,
        )
    registry: Metrics = request.app.state.metrics
    return PlainTextResponse(
        registry.render(), media_type="text/plain; version=0.0.4", headers=_NO_STORE
    )


_NO_STORE = {"Cache-Control": "no-store"}


def _may_read_metrics(request: Request) -> bool:
    settings: Settings = request.app.state.settings
    if settings.metrics_public:
        return True
    token = settings.metrics_token.get_secret_value()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if token and scheme.lower() == "bearer":
        return hmac.compare_digest(given.strip().encode(), token.encode())
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_routes(settings: Settings) -> list[BaseRoute]:
    return [
        *tracking.routes,  # /o/<token>, /c/<token>
        *public.routes,  # /, /stop-tracking, /stop-tracking/confirm
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        dashboard.mount(settings),  # /dashboard/...
        api.mount,  # /api/v1/...
    ]


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    """The receiver app; ``engine`` is made from settings.db_url when not given."""
    registry = Metrics()
    writer = EventWriter(settings, registry)
    # Making an engine does not connect: the receiver starts with the database down.
    engine_ = engine if engine is not None else db.make_engine(settings.db_url)
    live_feed = LiveFeed(engine_)
    writer.subscribe(live_feed.publish)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        outbox = OutboxWorker(settings, engine_)
        stop_purge = asyncio.Event()
        await writer.start(engine_)
        await live_feed.start()
        await outbox.start()
        purge = asyncio.create_task(privacy.purge_loop(settings, engine_, stop_purge))
        log.info("receiver ready (public URL %s)", settings.base_url)
        try:
            yield
        finally:
            stop_purge.set()
            await purge
            await outbox.stop()
            await writer.stop()
            await live_feed.stop()
            if engine is None:
                engine_.dispose()

    app = tracking.TrackingApp(routes=build_routes(settings), lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine_
    app.state.live_feed = live_feed
    app.state.signer = Signer(settings.signing_keys())
    app.state.metrics = registry
    app.state.event_writer = writer
    app.state.on_written = writer.subscribe
    app.state.public_forms = public.PublicForms(settings)
    app.state.self_mark = SelfMark(settings.secret_key.get_secret_value())
    app.tracking = tracking.Tracking(app.state.signer, registry, writer, app.state.self_mark)
    registry.gauge(
        "trackrelay_event_queue_depth", "events not yet stored or journaled", lambda: writer.depth
    )
    registry.gauge(
        "trackrelay_journal_bytes", "bytes in the event journal", lambda: writer.journal.size()[1]
    )
    registry.gauge(
        "trackrelay_journal_files", "files in the event journal", lambda: writer.journal.size()[0]
    )
    registry.gauge(
        "trackrelay_event_writer_degraded",
        "1 while events go to the journal instead of the database",
        lambda: float(writer.degraded),
    )
    return app


def app_from_environment() -> Starlette:
    """Factory for ``uvicorn --factory`` (multi-worker ``trackrelay receiver``).

    Settings come from the environment, plus the TOML file named by
    ``TRACKRELAY_RECEIVER_CONFIG_FILE`` when the parent was given ``--config``.
    """
    import os
    from pathlib import Path

    config = os.environ.get(CONFIG_FILE_ENV)
    settings = load_settings(Path(config) if config else None)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    end_streams_on_exit_signal(app.state.live_feed)
    return app


def end_streams_on_exit_signal(live_feed: LiveFeed) -> None:
    """A uvicorn worker told to stop ends the dashboards' live streams first.

    uvicorn waits for open responses before it runs the lifespan shutdown, so
    an open dashboard tab would hold the worker for the whole grace period and
    then be cancelled with a traceback. uvicorn has installed its own handlers
    by the time it calls the factory; this chains in front of them (uvicorn
    restores the original handlers when it exits). Browsers reconnect to
    another worker by themselves.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not under a running server (a test importing the factory)
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(live_feed.close_streams)
            previous(sig, frame)

        signal.signal(signum, handler)


CONFIG_FILE_ENV = "TRACKRELAY_RECEIVER_CONFIG_FILE"
