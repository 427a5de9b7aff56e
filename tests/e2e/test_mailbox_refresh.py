"""Two processes refreshing one grant together: exactly one refresh reaches the provider.

Each process is a real Python interpreter with its own engine on the same
database (SQLite file or PostgreSQL), calling shared.mailbox.access_token at
the same moment while the OAuth server answers slowly; the one that took the
lease refreshes, the other waits for what it stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine

from shared import mailbox, oauth
from shared.config import Settings
from shared.users import add_user
from tests.conftest import TEST_SECRET
from tests.support.oauth_server import OAuthServer, provider_settings

SCRIPT = """
import json, sys, time
from pathlib import Path
from shared import db, mailbox
from shared.config import load_settings
url, oauth_json, go, connection_id = sys.argv[1:5]
settings = load_settings(secret_key=sys.argv[5], oauth=json.loads(oauth_json), var_dir=sys.argv[6])
engine = db.make_engine(url)
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.005)
print(mailbox.access_token(engine, settings, int(connection_id)).token)
"""


def test_two_processes_refresh_once(
    database_url: str,
    engine: Engine,
    make_settings: Callable[..., Settings],
    oauth_server: OAuthServer,
    tmp_path: Path,
) -> None:
    tables = provider_settings(oauth_server)
    settings = make_settings(oauth=tables)
    add_user(engine, "ann", "password123", addresses=["ann@example.com"])
    found = mailbox.provider(settings, "test")
    device = oauth.start_device(found)
    oauth_server.approve(device.user_code, "ann@example.com")
    token = oauth.poll_device(found, device, sleep=lambda _: None)
    row = mailbox.store(engine, settings, "ann", "ann@example.com", "test", token)
    assert row.id is not None
    mailbox.token_refused(engine, row.id)  # due now
    oauth_server.token_delay = 1.0
    go = tmp_path / "go"
    argv = [database_url, json.dumps(tables), str(go), str(row.id), TEST_SECRET, str(tmp_path)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in processes:  # both imported and waiting for the word
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
    go.touch()
    results = [process.communicate(timeout=60) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in results]
    tokens = {out.strip() for out, _ in results}
    assert len(tokens) == 1
    assert oauth_server.refreshes() == 1
    assert oauth_server.is_live(tokens.pop())
