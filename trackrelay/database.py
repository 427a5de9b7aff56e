"""The CLI's one way to the database: settings in, a migrated engine out.

Every command that reads or writes the database opens it with
:func:`database`, which brings the schema up to date first (every command
migrates, so a fresh install needs no separate step) and turns any failure
into one line that names the setting. The servers migrate in a forked child
(:func:`upgrade_apart`); the relay and the receiver alone start even without
their database.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from shared import db
from shared.config import Settings
from shared.devsetup import private_var_dir
from trackrelay.commands import CommandError

log = logging.getLogger("trackrelay")


@contextmanager
def database(settings: Settings, *, server: bool = False, journaled: str = "") -> Iterator[Engine]:
    """The migrated database of ``settings``, disposed when the command ends
    (no connection left open); CommandError naming TRACKRELAY_DATABASE_URL.

    ``server``: the process will run for long (serve, relay, receiver), so the
    migrations run in a child process (:func:`upgrade_apart`).

    ``journaled``: what the process journals while its database is away
    (``"records"``, ``"events"``). Mail and hits must flow, so a database that
    cannot be opened is then a warning and the engine is returned anyway;
    the journal under the var directory is replayed once the database
    answers (the schema must exist by then: a database that was never
    migrated needs ``trackrelay db upgrade``).
    """
    private_var_dir(settings, umask=server)  # dev mode: ./var 700, its files 600
    try:
        if server:
            upgrade_apart(settings.db_url)
        else:
            db.upgrade(settings.db_url)
        private_var_dir(settings)  # the database file the migrations made
    except Exception as exc:
        error = CommandError(f"TRACKRELAY_DATABASE_URL: cannot open the database: {exc}")
        if not journaled:
            raise error from None
        log.warning("%s; starting anyway, %s are journaled until it is reachable", error, journaled)
    engine = db.make_engine(settings.db_url)
    try:
        yield engine
    finally:
        engine.dispose()


class MigrationFailed(Exception):
    """The migration child process failed; the message is its error."""


def upgrade_apart(url: str) -> None:
    """:func:`shared.db.upgrade` in a forked child process.

    Alembic, Mako (with Pygments) and the migration scripts are imported by
    the child and leave with it: in-process they stayed in a server's memory
    for good (~10 MB of its idle RSS), for one use at start. The child
    inherits everything already imported and the settings, so this costs a
    fork. An in-memory SQLite database lives in this process only, and a
    platform without fork has no cheap child: both migrate in-process.
    """
    if not hasattr(os, "fork") or _in_memory(url):
        db.upgrade(url)
        return
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child; its effect is what the tests see
        code = 0
        try:
            os.close(read)
            db.upgrade(url)
        except BaseException as exc:
            os.write(write, (str(exc) or type(exc).__name__).encode(errors="replace")[:4000])
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        error = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise MigrationFailed(error or f"the migration process ended with status {status}")


def _in_memory(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")
