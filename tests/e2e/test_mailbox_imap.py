"""A connected mailbox the whole way: ``trackrelay serve`` in a real process, ann's
connection to provider ``test`` (the in-suite OAuth server; its submission server
the recording upstream, OAuth only, filing every copy into Sent as Microsoft 365
does; its IMAP server a real Dovecot checking the same tokens), a tracked message
to three recipients from ann's mail client, then a reply and a bounce in her
INBOX: one pristine copy in Sent, the answers in the events API, nothing marked
read. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib
import httpx
from sqlalchemy import Engine

from shared import apitokens, db
from shared.config import load_settings
from tests.e2e.test_serve import SECRET, ServeProcess, wait_for
from tests.support.dovecot import ANN, SENT, Dovecot
from tests.support.imapkit import (
    BOUNCE,
    MESSAGE,
    PASSWORD,
    RECIPIENTS,
    REPLY,
    AnnsMailbox,
    connect_ann,
    imap_provider,
)


async def _send(port: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, validate_certs=False)
    async with smtp:
        await smtp.ehlo()
        await smtp.auth_plain("ann", PASSWORD)
        await smtp.sendmail(ANN, list(RECIPIENTS), MESSAGE)


def _answers(api: httpx.Client) -> list[tuple[str, int]] | None:
    events = api.get("/api/v1/events").json()["events"]
    found = sorted(
        (e["kind"], e["recipient_position"]) for e in events if e["kind"] in ("reply", "bounce")
    )
    return found if len(found) >= 2 else None


def test_one_pristine_copy_in_sent_and_the_answers_from_the_inbox(
    tmp_path: Path, database_url: str, anns_mailbox: AnnsMailbox, dovecot: Dovecot
) -> None:
    engine: Engine = db.make_engine(database_url)
    try:
        with (
            anns_mailbox.provider("every") as provider,
            ServeProcess(tmp_path, database_url) as process,
        ):
            process.env.update(anns_mailbox.serve_env(provider, sent_window="3"))
            providers = imap_provider(anns_mailbox.oauth_server, dovecot, provider.url)
            settings = load_settings(
                database_url=database_url,
                secret_key=SECRET,
                oauth=providers,
                var_dir=tmp_path / "v",
            )
            connect_ann(engine, settings, anns_mailbox.oauth_server)
            token, _ = apitokens.create_token(engine, "ann", "e2e")
            process.start()
            asyncio.run(_send(process.smtp_port))
            assert len(provider.messages) == 3  # per-recipient tracked copies, filed in Sent

            def pristine() -> bool:
                sent = dovecot.messages(SENT)
                return len(sent) == 1 and sent[0][0] == MESSAGE

            assert wait_for(pristine, 20), (dovecot.messages(SENT), process.stderr)
            dovecot.append("INBOX", REPLY)
            dovecot.append("INBOX", BOUNCE)
            api = httpx.Client(
                base_url=process.public_url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            with api:
                found = wait_for(lambda: _answers(api), 20)
            assert found == [("bounce", 2), ("reply", 1)], process.stderr
            assert all(b"\\Seen" not in flags for _, flags in dovecot.messages("INBOX"))
            assert process.stop() == 0
    finally:
        engine.dispose()
