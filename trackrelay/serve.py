"""Run the relay and/or the receiver in ONE process and ONE event loop.

The aiosmtpd listeners are created with ``loop.create_server`` (not aiosmtpd's
``Controller``, which runs its own loop in a thread and could not share the
database engine or async clients with uvicorn), and uvicorn runs through
``Server.serve()`` on the same loop. SIGINT/SIGTERM stop both: the HTTP side
stops accepting, the relay finishes the transactions in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn
from sqlalchemy import Engine

from shared.config import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings, engine: Engine, *, relay: bool, receiver: bool) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] ships it
        return asyncio.run(run(settings, engine, relay=relay, receiver=receiver))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(settings, engine, relay=relay, receiver=receiver))


async def run(settings: Settings, engine: Engine, *, relay: bool, receiver: bool) -> int:
    from relay.server import RelayServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    relay_server = RelayServer(settings, engine) if relay else None
    http_server = _http_server(settings, engine) if receiver else None
    tasks: list[asyncio.Task[None]] = []
    try:
        if relay_server is not None:
            await relay_server.start()
        if http_server is not None:
            tasks.append(asyncio.create_task(http_server.serve()))
        for line in banner(settings, relay_server, receiver=receiver):
            print(line, flush=True)
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        log.info("shutting down")
        if http_server is not None:
            http_server.should_exit = True
        if relay_server is not None:
            await relay_server.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def _http_server(settings: Settings, engine: Engine) -> uvicorn.Server:
    from receiver.app import create_app

    config = uvicorn.Config(
        create_app(settings, engine),
        host=settings.host,
        port=settings.http_port,
        http="httptools",
        lifespan="on",
        log_level="warning",
        proxy_headers=True,
        server_header=False,
    )
    return _HTTPServer(config)


class _HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handlers: ours stop both servers together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def banner(settings: Settings, relay_server: object | None, *, receiver: bool) -> list[str]:
    lines = ["trackrelay is running" + (" in dev mode" if settings.dev_mode else "") + "."]
    if relay_server is not None:
        lines += getattr(relay_server, "describe", lambda: [])()
    if receiver:
        lines.append(f"  receiver and dashboard: http://{settings.host}:{settings.http_port}/")
        lines.append(f"  links in mail point at: {settings.base_url}")
    lines.append("Stop with Ctrl-C.")
    return lines
