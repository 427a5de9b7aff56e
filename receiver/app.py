"""The receiver's Starlette app (dashboard part; the tracking routes join at merge).

``create_app`` keeps the shape the whole receiver uses: one list of routes,
resources opened in the lifespan and kept on ``app.state``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from receiver import dashboard
from receiver.live import LiveFeed
from shared import db
from shared.config import Settings


async def _root(_request: object) -> Response:
    return RedirectResponse("/dashboard/", status_code=303)


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    engine = engine if engine is not None else db.make_engine(settings.db_url)
    live_feed = LiveFeed(engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await live_feed.start()
        try:
            yield
        finally:
            await live_feed.stop()

    app = Starlette(routes=[Route("/", _root), dashboard.mount(settings)], lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.live_feed = live_feed
    return app
