"""Helpers for the receiver tests: a real uvicorn server, a stoppable TCP proxy.

Fixture (registered through ``pytest_plugins`` in tests/conftest.py):
``outage``, an Outage of the test's ``database_url``, closed at the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from starlette.types import ASGIApp

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(interval)


def count_events(engine: Engine, where: str = "1=1") -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM events WHERE {where}")).scalar_one())


def event_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(text("SELECT * FROM events ORDER BY id"))
        return [dict(row._mapping) for row in result]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<ephemeral> in a background thread, with
    an event loop of its own."""

    def __init__(self, app: ASGIApp, sock: socket.socket | None = None) -> None:
        """``sock``: a socket bound beforehand, when the app must know its URL first."""
        self.sock = sock
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http="httptools",
            timeout_graceful_shutdown=2,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve([self.sock] if self.sock else None))

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=15)
        assert self.server.started, "uvicorn did not start"
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's loop (as the event writer would)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.loop.close()


class TCPProxy:
    """Forwards 127.0.0.1:<port> to a target; ``down()`` cuts every connection.

    Used to make PostgreSQL really unreachable for the receiver under test
    (connections refused and existing ones reset), then reachable again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def url_for(self, database_url: str) -> str:
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


class Outage:
    """Makes the database at ``database_url`` unavailable (relay or receiver), then back."""

    def __init__(self, database_url: str) -> None:
        parsed = make_url(database_url)
        self.sqlite = parsed.get_backend_name() == "sqlite"
        self._lock: sqlite3.Connection | None = None
        if self.sqlite:
            self.path = str(parsed.database)
            self.app_url = database_url
        else:
            self.proxy = TCPProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
            self.proxy.up()
            self.app_url = self.proxy.url_for(database_url)

    def down(self) -> None:
        if self.sqlite:
            self._lock = sqlite3.connect(self.path, isolation_level=None)
            self._lock.execute("BEGIN EXCLUSIVE")
        else:
            self.proxy.down()

    def up(self) -> None:
        if self.sqlite:
            assert self._lock is not None
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None
        else:
            self.proxy.up()

    def close(self) -> None:
        if self.sqlite and self._lock is not None:
            self.up()
        elif not self.sqlite:
            self.proxy.down()


def start_receiver(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``trackrelay receiver`` in a subprocess; returns it and its base URL."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKRELAY_")}
    full_env.update(env)
    with open(log, "ab") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "trackrelay", "receiver"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def banner() -> str | None:
        for line in log.read_text().splitlines():
            if line.startswith("  receiver: http://"):
                return line.split()[1].rstrip("/")
            if "trackrelay receiver listening on http://" in line:  # several workers
                return line.split("listening on ", 1)[1].split("/ ", 1)[0]
        if proc.poll() is not None:
            raise AssertionError(f"receiver exited: {log.read_text()}")
        return None

    try:
        url = wait_for(banner, timeout=30)
    except BaseException:  # no banner: the caller never gets proc, so stop it here
        proc.kill()
        proc.wait()
        raise
    open(log, "w").close()  # the next start writes a fresh banner
    return proc, url


@pytest.fixture
def outage(database_url: str) -> Iterator[Outage]:
    o = Outage(database_url)
    yield o
    o.close()
