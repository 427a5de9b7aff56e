"""The HTTP side of the servers: uvicorn and the receiver's Starlette app.

Kept out of :mod:`trackrelay.serve` so that ``trackrelay relay`` never imports
uvicorn, Starlette, Jinja2 or the dashboard (~15 MB of RSS that a relay
process would carry for nothing); ``serve`` and ``receiver`` import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from sqlalchemy import Engine
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from shared.config import Settings
from trackrelay.serve import bind_http

if TYPE_CHECKING:
    from relay.track import Counters


async def started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    """Wait until uvicorn listens (or failed), so the banner tells the truth."""
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has only a flag
        await asyncio.sleep(0.01)


def serve_receiver_workers(settings: Settings, config_file: Path | None) -> int:
    """``trackrelay receiver`` with TRACKRELAY_RECEIVER_WORKERS > 1: uvicorn worker processes.

    The socket is bound once here and shared by the workers (no SO_REUSEPORT
    needed); each worker builds its app with receiver.app.app_from_environment.
    """
    from receiver.app import CONFIG_FILE_ENV

    if config_file is not None:
        os.environ[CONFIG_FILE_ENV] = str(config_file.resolve())
    sock = bind_http(settings)
    config = uvicorn.Config(
        "receiver.app:app_from_environment",
        factory=True,
        workers=settings.receiver_workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=5,
        proxy_headers=True,
        server_header=False,
    )
    port = sock.getsockname()[1]
    print(
        f"trackrelay receiver listening on http://{settings.host}:{port}/ "
        f"({settings.receiver_workers} workers); links in mail point at {settings.base_url}",
        flush=True,
    )
    Multiprocess(config, sockets=[sock]).run()
    return 0


def receiver_app(settings: Settings, engine: Engine) -> Starlette:
    from receiver.app import create_app

    return create_app(settings, engine)


def add_relay_metrics(app: Starlette, relay: Counters) -> None:
    """In one process, /metrics also shows the relay's injection counters."""
    registry = app.state.metrics
    for name, help, read in (
        ("prepared", "messages the relay prepared for delivery", lambda: relay.prepared),
        ("tracked", "messages sent with tracking", lambda: relay.tracked),
        ("injection_failures", "injection errors (sent untracked)", lambda: relay.failures),
        (
            "stamped_passed",
            "gateway messages stamped here already, passed on unchanged",
            lambda: relay.stamped_passed,
        ),
    ):
        registry.counter(f"trackrelay_relay_messages_{name}_total", help, read)


def add_intake_metrics(app: Starlette, relay: Any) -> None:
    """In one process, /metrics also counts the intake's copies (relay/intake.py)."""
    registry = app.state.metrics

    def read(name: str) -> Callable[[], float]:
        def value() -> float:
            intake = relay.intake
            if intake is None:
                return 0
            return float(intake.unmatched if name == "unmatched" else getattr(intake.counts, name))

        return value

    for name, help in (
        ("copies", "copies of incoming mail the intake received"),
        ("answers", "copies with a reply, auto-reply, bounce or complaint in them"),
        ("unmatched", "copies that said nothing about mail sent through the relay"),
    ):
        registry.counter(f"trackrelay_intake_{name}_total", help, read(name))


def http_server(settings: Settings, app: Starlette) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        http="httptools",
        lifespan="on",
        # An open live-notification stream must not hold shutdown forever.
        timeout_graceful_shutdown=5,
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
