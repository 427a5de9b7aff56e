"""Dev mode's first start: an admin user ``dev`` with a random password.

Only in dev mode (no real upstream: nothing can leave the machine). The
password is printed on the first start and kept in ``var_dir/dev_password``
(owner-readable), like the dev secret key next to it, so later starts can
say where it is without printing it again.

In shared/ because both sides use the one user: the relay creates it when it
starts (relay/server.py, so AUTH works at once) and the dashboard signs it
in. It was in trackrelay/, which made the relay import the CLI package.
"""

from __future__ import annotations

import os
import secrets

from sqlalchemy import Engine
from sqlmodel import select

from shared.config import Settings
from shared.db import session_scope
from shared.models import User
from shared.users import add_user

DEV_USER = "dev"
DEV_ADDRESSES = ("@example.com", "@example.net", "@example.org")


def private_var_dir(settings: Settings, *, umask: bool = False) -> None:
    """Dev mode: ``var_dir`` 700, everything in it owner-only; with ``umask``, new files 600.

    The SQLite database, the dev password and secret, the journal and the
    Maildir sink live there; with the usual umask 022 the database was 644,
    readable by every account on the machine. ``umask`` (the long-running
    serve/relay/receiver processes) sets this process's umask, inherited by
    the processes it starts, to 077, so files made later are 600 too; a
    one-shot command only fixes what exists (the directory keeps others out
    either way). Outside dev mode the operator decides.
    """
    if not settings.dev_mode:
        return
    if umask:
        os.umask(0o077)
    root = settings.var_dir
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(directory, name), 0o700)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


def ensure_dev_user(settings: Settings, engine: Engine) -> list[str]:
    """Create the dev user on first start; return lines telling how to log in."""
    if not settings.dev_mode:
        return []
    path = settings.var_dir / "dev_password"
    with session_scope(engine) as session:
        exists = session.exec(select(User).where(User.username == DEV_USER)).first() is not None
    if exists:
        where = f"in {path}" if path.exists() else "set when it was created"
        return [f"  user: {DEV_USER}  password: {where}"]
    password = secrets.token_urlsafe(12)
    add_user(engine, DEV_USER, password, role="admin", addresses=DEV_ADDRESSES)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    return [
        f"  user: {DEV_USER}  password: {password}  (shown once; also saved in {path})",
        f"  {DEV_USER} may send as any address {', '.join(DEV_ADDRESSES)}",
    ]
