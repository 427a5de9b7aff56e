"""Gateway mode behind a REAL Postfix: the after-queue content filter of FILTER_README.

The organisation's MTA is Postfix 3.x started from a temporary configuration
(``postfix -c DIR start``), with three services on loopback:

* the clients' smtpd (port ``submit``) with ``-o content_filter=gateway:[127.0.0.1]:GW``:
  every message it takes is queued, then handed to ``trackrelay relay``'s
  gateway listener by the ``gateway`` smtp transport;
* the return smtpd (port ``back``) with ``-o content_filter=`` (FILTER_README's
  second smtpd): the gateway's ``TRACKRELAY_GATEWAY_UPSTREAM`` is
  ``smtp://127.0.0.1:back``; it refuses ``refused@fabrikam.example``
  (``check_recipient_access``);
* final delivery through ``relayhost`` to the recording sink of
  tests/support/upstream.py (STARTTLS, no AUTH).

What running Postfix in a test takes (Debian's postfix 3.7, found out here):
``postfix`` and ``master`` both refuse to run as anyone but root ("the postfix
command is reserved for the superuser", "the master command is reserved for
the superuser"), and the daemons then switch to ``mail_owner`` (the
``postfix`` user), so there is no unprivileged way: these tests run as root
(as ``.ci/run`` does) and skip otherwise, or when Postfix is not installed.
The configuration directory needs no ``alternate_config_directories`` entry
for root; ``queue_directory`` must exist (postfix-script creates its
subdirectories) in a directory the ``postfix`` user can traverse (so not
under pytest's 0700 ``/tmp/pytest-of-root``), ``data_directory`` must be
owned by ``mail_owner``, every service runs unchrooted (``n``), and logging
goes to ``maillog_file`` (``postlog`` service) since there is no syslog,
with its directory listed in ``maillog_file_prefixes``. ``postqueue -c DIR``
works for root without further setup, but ``postqueue -f`` needs the
``pickup`` service (it looks for ``public/pickup`` to decide whether the mail
system is up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import smtplib
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import stamp
from shared import db, policies
from tests.e2e.test_serve import free_port
from tests.support.relaykit import RelayProcess
from tests.support.upstream import Received, RecordingUpstream

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
pytestmark = [
    pytest.mark.postfix,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(POSTFIX), reason="Postfix is not installed (.ci/run installs it)"
    ),
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="Postfix's postfix and master commands run only as root (see the module docstring)",
    ),
]
SECRET = "postfix-test-secret-0123456789abcdef"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.contoso.example
mydomain = contoso.example
myorigin = contoso.example
mydestination =
relayhost = [127.0.0.1]:{sink}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
smtp_tls_security_level = may
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
"""
MASTER_CF = """\
127.0.0.1:{submit} inet n - n - - smtpd
  -o content_filter=gateway:[127.0.0.1]:{gateway}
127.0.0.1:{back} inet n - n - - smtpd
  -o content_filter=
  -o receive_override_options={overrides}
  -o smtpd_recipient_restrictions={restrictions}
gateway   unix - - n - 4 smtp
  -o smtp_send_xforward_command=no
  -o disable_mime_output_conversion=yes
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Organisation:
    """Postfix, its final-delivery sink, and the gateway in front of its return path."""

    directory: Path
    sink: RecordingUpstream
    submit: int
    back: int
    gateway: int
    var: Path

    @property
    def config(self) -> str:
        return str(self.directory / "conf")

    def postfix(self, *args: str) -> str:
        done = subprocess.run(
            [POSTFIX, "-c", self.config, *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr + self.log()
        return done.stdout

    def postqueue(self, *args: str) -> str:
        done = subprocess.run(
            ["postqueue", "-c", self.config, *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def queued(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.postqueue("-j").splitlines() if line.strip()]

    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def relay(self, tmp_path: Path) -> RelayProcess:
        return RelayProcess(
            tmp_path,
            TRACKRELAY_VAR_DIR=str(self.var),
            TRACKRELAY_SECRET_KEY=SECRET,
            TRACKRELAY_GATEWAY_PORT=str(self.gateway),
            TRACKRELAY_GATEWAY_NETWORKS="127.0.0.0/8",
            TRACKRELAY_GATEWAY_DOMAINS="contoso.example",
            TRACKRELAY_GATEWAY_UPSTREAM=f"smtp://127.0.0.1:{self.back}",
        )

    def send(self, message: bytes, sender: str, recipients: list[str]) -> None:
        with smtplib.SMTP("127.0.0.1", self.submit, timeout=30) as smtp:
            smtp.sendmail(sender, recipients, message)

    def delivered(self, subject: str, count: int = 1, timeout: float = 30) -> list[Received]:
        """The sink's messages that carry ``subject``, once ``count`` of them arrived."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.sink.messages if subject.encode() in m.data]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


@pytest.fixture
def organisation(tls_pair: tuple[Path, Path], tmp_path: Path) -> Iterator[Organisation]:
    # Not under tmp_path: the postfix user must be able to reach its queue.
    directory = Path(tempfile.mkdtemp(prefix="trackrelay-postfix-"))
    directory.chmod(0o755)
    sink = RecordingUpstream(*tls_pair, require_auth=False).start()
    org = Organisation(directory, sink, free_port(), free_port(), free_port(), tmp_path / "var")
    (directory / "conf").mkdir()
    (directory / "queue").mkdir()
    (directory / "data").mkdir()
    shutil.chown(directory / "data", "postfix")
    (directory / "refuse").write_text("refused@fabrikam.example REJECT 5.1.1 no such mailbox\n")
    values = {
        "d": directory,
        "sink": sink.port,
        "submit": org.submit,
        "back": org.back,
        "gateway": org.gateway,
        # FILTER_README's return smtpd: what the first pass did is not done again
        "overrides": "no_unknown_recipient_checks,no_header_body_checks,no_milters,"
        "no_address_mappings",
        "restrictions": f"check_recipient_access,texthash:{directory}/refuse,"
        "permit_mynetworks,reject",
    }
    (directory / "conf" / "main.cf").write_text(MAIN_CF.format(**values))
    (directory / "conf" / "master.cf").write_text(MASTER_CF.format(**values))
    url = f"sqlite:///{org.var / 'trackrelay.db'}"
    org.var.mkdir()
    db.upgrade(url)
    engine = db.make_engine(url)
    policies.set_policy(engine, "alice@contoso.example", mode="always")
    engine.dispose()
    try:
        org.postfix("start")
        yield org
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            org.postfix("stop")
        sink.stop()
        shutil.rmtree(directory, ignore_errors=True)


def message(subject: str, sender: str, html: bool = True) -> bytes:
    body = (
        b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
        b'<html><body><p>See <a href="https://contoso.example/q3">the numbers</a>.</p>'
        b"</body></html>\r\n"
        if html
        else b"Content-Type: text/plain; charset=us-ascii\r\n\r\nPlain words.\r\n"
    )
    return (
        f"From: <{sender}>\r\nTo: <bob@fabrikam.example>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@contoso.example>\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode() + body


def without_trace(data: bytes) -> tuple[list[str], bytes]:
    """The stamp values, and the message with its stamp and Received fields removed."""
    head, _, body = data.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    stamps = [
        f.split(b":", 1)[1].strip().decode()
        for f in fields
        if f.lower().startswith(b"x-trackrelay-processed:")
    ]
    kept = [
        f for f in fields if not f.lower().startswith((b"received:", b"x-trackrelay-processed:"))
    ]
    return stamps, b"\r\n".join(kept) + b"\r\n\r\n" + body


def _decisions(org: Organisation) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(org.var / "trackrelay.db")) as conn:
        return list(conn.execute("SELECT listener, decision FROM messages ORDER BY created_at"))


def test_postfix_mail_is_tracked_per_policy_and_untracked_mail_is_unchanged(
    organisation: Organisation, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    org = organisation
    processes.append(org.relay(tmp_path))
    tracked, plain = (
        message("tracked-1", "alice@contoso.example"),
        message("plain-1", "carol@contoso.example"),
    )
    org.send(tracked, "alice@contoso.example", ["bob@fabrikam.example"])
    org.send(plain, "carol@contoso.example", ["bob@fabrikam.example"])
    [out_tracked] = org.delivered("tracked-1")
    [out_plain] = org.delivered("plain-1")
    signer = stamp.Stamp([SECRET.encode()])
    stamps, rest = without_trace(out_tracked.data)
    assert len(stamps) == 1
    assert signer.verify(stamps[0], "<tracked-1@contoso.example>")
    assert b'href="https://contoso.example/q3"' not in rest
    assert b"/o/" in rest
    stamps, rest = without_trace(out_plain.data)
    assert len(stamps) == 1
    assert signer.verify(stamps[0], "<plain-1@contoso.example>")
    assert rest == message("plain-1", "carol@contoso.example")  # byte for byte, the stamp aside
    rows = _decisions(org)
    assert [listener for listener, _ in rows] == ["gateway", "gateway"]
    tracked = sorted(json.loads(decision)["tracked"] for _, decision in rows)
    assert tracked == [False, True]  # alice per her policy, carol not
    assert org.queued() == []


def test_a_refusal_on_the_return_path_bounces_through_postfix(
    organisation: Organisation, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    org = organisation
    processes.append(org.relay(tmp_path))
    org.send(
        message("refused-1", "alice@contoso.example"),
        "alice@contoso.example",
        ["refused@fabrikam.example"],
    )
    [bounce] = org.delivered("refused-1")
    assert bounce.mail_from == "<>"  # Postfix's bounce, to the sender
    assert bounce.rcpt_tos == ["alice@contoso.example"]
    assert b"refused@fabrikam.example" in bounce.data
    assert b"no such mailbox" in bounce.data  # the return path's own words, through the gateway
    assert not [m for m in org.sink.messages if "refused@fabrikam.example" in m.rcpt_tos]


def test_a_gateway_outage_keeps_mail_in_postfix_and_a_flush_delivers_it_once(
    organisation: Organisation, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    org = organisation
    org.send(
        message("outage-1", "alice@contoso.example"),
        "alice@contoso.example",
        ["bob@fabrikam.example"],
    )
    deadline = time.monotonic() + 30
    while "Connection refused" not in json.dumps(org.queued()) and time.monotonic() < deadline:
        time.sleep(0.2)
    queued = org.queued()
    assert len(queued) == 1, org.log()
    assert "Connection refused" in json.dumps(queued)
    assert org.sink.messages == []
    processes.append(org.relay(tmp_path))
    org.postqueue("-f")
    [delivered] = org.delivered("outage-1")
    time.sleep(2)  # a second copy would come now
    assert len(org.delivered("outage-1", count=2, timeout=0)) == 1
    stamps, _ = without_trace(delivered.data)
    assert len(stamps) == 1
    assert stamp.Stamp([SECRET.encode()]).verify(stamps[0], "<outage-1@contoso.example>")
    assert org.queued() == []
