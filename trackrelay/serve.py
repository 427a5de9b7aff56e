"""Run the relay and/or the receiver in ONE process and ONE event loop.

The aiosmtpd listeners are created with ``loop.create_server`` (not aiosmtpd's
``Controller``, which runs its own loop in a thread and could not share the
database engine or async clients with uvicorn), and uvicorn runs through
``Server.serve()`` on the same loop. SIGINT/SIGTERM stop both: the HTTP side
stops accepting, the relay finishes the transactions in flight. At start the
soft open-file limit is raised to the hard one (:func:`raise_open_file_limit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from shared.config import Settings

if TYPE_CHECKING:
    from relay.limits import SharedCounts

log = logging.getLogger(__name__)

# Descriptors a process needs besides its SMTP sessions: listeners, the database
# pool, the event writer's pipe, journals and HTTP connections (relay/limits.py).
FILES_BESIDE_SESSIONS = 200


@dataclass(frozen=True)
class Parts:
    """What one process serves: the relay, the receiver or both."""

    relay: bool
    receiver: bool
    # a relay worker's listeners, bound once by its parent (serve_relay_workers)
    relay_sockets: dict[str, socket.socket] | None = None
    relay_sessions: SharedCounts | None = None  # their session counts, made by the parent too
    inbox: bool = True  # watch the mailboxes' INBOXes (relay/inboxwatch.py): one worker does


BOTH = Parts(relay=True, receiver=True)
RELAY = Parts(relay=True, receiver=False)
RECEIVER = Parts(relay=False, receiver=True)


def serve(settings: Settings, engine: Engine, parts: Parts) -> int:
    """Run ``parts`` on uvloop until SIGINT or SIGTERM; the exit status."""
    raise_open_file_limit(settings if parts.relay else None)
    main = run(settings, engine, parts)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] ships it
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def raise_open_file_limit(relay: Settings | None = None) -> int:
    """Raise the soft open-file limit to the hard one and log the figure; the limit now.

    Every SMTP session, upstream connection and HTTP connection is a descriptor:
    the common soft limit of 1024 is what a flood of idle connections ran out
    of, taking HTTP down with SMTP (relay/limits.py has the arithmetic). A relay
    whose TRACKRELAY_MAX_SESSIONS cannot fit the limit gets a WARNING.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("open-file limit raised from %d to %d (the hard limit)", soft, wanted)
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d: cannot raise it to %d: %s", soft, wanted, exc)
    else:
        log.info("open-file limit: %d", soft)
    if relay is not None and soft != resource.RLIM_INFINITY:
        needed = 2 * relay.max_sessions + FILES_BESIDE_SESSIONS
        if soft < needed:
            log.warning(
                "open-file limit %d is below the %d that TRACKRELAY_MAX_SESSIONS=%d may use "
                "(2 per session + %d): lower the setting or raise the limit (ulimit -n)",
                soft,
                needed,
                relay.max_sessions,
                FILES_BESIDE_SESSIONS,
            )
    return int(soft)


async def run(settings: Settings, engine: Engine, parts: Parts) -> int:  # noqa: C901 - start, then stop, what runs
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    if problem := settings.public_url_problem():
        log.warning("%s", problem)
    http_socket = bind_http(settings) if parts.receiver else None
    if http_socket is not None and settings.http_port == 0 and not settings.public_url:
        # Links default to http://HOST:HTTP_PORT: name the port really bound, not 0.
        settings = settings.model_copy(update={"http_port": http_socket.getsockname()[1]})
    relay_server = None
    if parts.relay:
        from relay.server import RelayServer

        relay_server = RelayServer(
            settings,
            engine,
            sockets=parts.relay_sockets,
            watch_inbox=parts.inbox,
            sessions=parts.relay_sessions,
        )
    app = http_server = None
    if parts.receiver:
        from trackrelay import web  # uvicorn and Starlette: only a process that serves HTTP

        app = web.receiver_app(settings, engine)
        if relay_server is not None:
            web.add_relay_metrics(app, relay_server.metrics)
            web.add_intake_metrics(app, relay_server)
        http_server = web.http_server(settings, app)
    tasks: list[asyncio.Task[None]] = []
    try:
        if relay_server is not None:
            await relay_server.start()
            answers = relay_server.answer_writer  # the intake's and the INBOX watcher's
            if answers is not None:  # replies and hard bounces reach dashboards
                feed = app.state.live_feed if app is not None else None
                _publish_answers(answers.store, feed, engine)
        if http_server is not None and http_socket is not None:
            tasks.append(asyncio.create_task(http_server.serve(sockets=[http_socket])))
            await web.started(http_server, tasks[-1])
        http_port = http_socket.getsockname()[1] if http_socket is not None else None
        _freeze_startup_objects()
        for line in banner(settings, relay_server, receiver=parts.receiver, http_port=http_port):
            print(line, flush=True)
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        log.info("shutting down")
        if app is not None:
            app.state.live_feed.close_streams()  # open dashboards would hold uvicorn
        if http_server is not None:
            http_server.should_exit = True
        if relay_server is not None:
            await relay_server.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if http_socket is not None:
            http_socket.close()
    return 0


_publishing: set[asyncio.Task[None]] = set()


def _publish_answers(store: Any, feed: Any, engine: Engine) -> None:
    """Hand the intake writer's committed answers to the dashboards' live feed: this
    process's (``serve``), else a publisher that only NOTIFYs (``relay`` on PostgreSQL,
    where the receiver processes LISTEN; on SQLite nobody else would hear it)."""
    from receiver.live import LiveFeed

    if feed is None:
        if engine.url.get_backend_name() != "postgresql":
            return
        feed = LiveFeed(engine)
    loop = asyncio.get_running_loop()

    def publish(rows: list[dict[str, Any]]) -> None:  # in the writer's thread
        def start() -> None:
            task = loop.create_task(feed.publish(rows))
            _publishing.add(task)
            task.add_done_callback(_publishing.discard)

        loop.call_soon_threadsafe(start)

    store.on_written = publish


def _freeze_startup_objects() -> None:
    """Leave what start-up made (modules, classes, SQLAlchemy and pydantic
    structures: ~80,000 objects) out of every later garbage collection.

    A full collection walks every tracked object; with those it took ~20-35 ms,
    all of it on the event loop, every time the allocation count triggered one
    (a stall for every session, whatever it was doing). Frozen objects are
    never collected; collecting first leaves no start-up garbage behind.
    """
    gc.collect()
    gc.freeze()


def bind_http(settings: Settings) -> socket.socket:
    """The receiver's listening socket, bound here so port 0 reports its real port."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"trackrelay: cannot listen on {settings.host}:{settings.http_port} "
            f"(TRACKRELAY_HTTP_PORT): {exc.strerror}"
        ) from None
    sock.listen(2048)  # connections queue from now on, even before workers accept
    sock.set_inheritable(True)
    return sock


def serve_relay_workers(settings: Settings, engine: Engine) -> int:
    """``trackrelay relay`` with TRACKRELAY_RELAY_WORKERS > 1: forked worker processes.

    The listening sockets are bound once here and inherited by every worker
    (like the receiver's workers: no SO_REUSEPORT needed, port 0 works); the
    kernel gives each connection to whichever worker accepts it first, so a
    worker busy with a large message takes fewer new sessions. SIGINT/SIGTERM
    are passed on; each worker finishes its transactions in flight.
    """
    from relay.limits import SharedCounts
    from relay.server import bind_listeners

    sockets = bind_listeners(settings)
    sessions = SharedCounts(settings.max_sessions, settings.relay_workers)  # the relay's limits
    engine.dispose()  # each worker opens its own connections
    children: dict[int, int] = {}  # pid -> worker number
    for number in range(settings.relay_workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the tests' traffic
            code = 1
            try:
                parts = replace(
                    RELAY,
                    relay_sockets=sockets,
                    relay_sessions=sessions.of_worker(number),
                    inbox=number == 0,
                )
                code = serve(settings, engine, parts)
            finally:
                os._exit(code)
        children[pid] = number
    for sock in sockets.values():
        sock.close()

    def forward(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    running = dict(children)
    while running:  # in the order they end: a dead worker's sessions are freed at once
        try:
            pid, code = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        number = running.pop(pid, -1)
        if number < 0:
            continue
        sessions.forget(number)  # its connections ended with it
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code != 0 and running:
            log.warning(
                "relay worker %d (pid %d) ended with %d; %d still serve",
                number,
                pid,
                exit_code,
                len(running),
            )
        status = status or exit_code
    return status


def banner(
    settings: Settings,
    relay_server: object | None,
    *,
    receiver: bool,
    http_port: int | None = None,
) -> list[str]:
    """What a person needs to start using what was just started."""
    dev = " in dev mode: no mail leaves this machine" if settings.dev_mode else ""
    lines = [f"trackrelay is running{dev}."]
    if relay_server is not None:
        lines += getattr(relay_server, "describe", lambda: [])()
    if receiver:
        port = settings.http_port if http_port is None else http_port
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        local = f"http://{host}:{port}"
        dev_user = settings.dev_mode and relay_server is not None  # the relay made it
        who = "sign in as dev" if dev_user else "users: trackrelay user add --admin NAME"
        lines += [
            "Receiver (tracking pixels and links) and dashboard:",
            f"  dashboard: {local}/dashboard/  ({who})",
            f"  links in mail point at: {settings.base_url}",
            *([f"  WARNING: {problem}"] if (problem := settings.public_url_problem()) else []),
            f'  receiver: {local}/  (its front page is for recipients: "stop tracking me")',
        ]
        if settings.dev_mode:
            lines += [
                "  note: opens and clicks from the machine that sent a message are the",
                "  sender's own (verdict 'self'): recorded, not counted as opens or clicks",
            ]
    lines.append("Stop with Ctrl-C.")
    return lines
