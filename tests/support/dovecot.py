"""A real Dovecot (Debian's ``dovecot-imapd``) as the mailbox of a connected account.

Started by the suite from a temporary configuration: IMAP on a free loopback
port without TLS (``ssl = no``, loopback only), Maildir under the temporary
directory (a ``\\Sent`` special-use folder :data:`SENT`; a ``\\Trash`` one only
when :attr:`Dovecot.trash` names it), passwd-file users (:data:`USER` and
:data:`ANN`, with :data:`PASSWORD`, for the tests' own look into a mailbox) and
an ``oauth2`` passdb for XOAUTH2 and OAUTHBEARER that asks the in-suite OAuth
server's introspection endpoint
(tests/support/oauth_server.py, ``introspection_mode = post`` with the client
credentials in the URL) whether a token is live and for whom: XOAUTH2 to IMAP
is checked by a real server, with the same tokens the recording upstream takes.
Its log (:meth:`Dovecot.log`) has a line per message copied or expunged
(``mail_log``: folder, UID, Message-ID): where a message went, and was removed.

Dovecot runs in the foreground (``dovecot -c FILE -F``) with its base and
state directories in the temporary directory. As root (CI) the mail processes
run as the ``dovecot`` system user; otherwise as the current user. A test is
skipped, with the reason, when the binary is missing or the server does not
start.

A second passwd-file passdb gives :data:`USER` the password
:data:`APP_PASSWORD` too: an app-password connection's IMAP LOGIN, with the
password the recording upstream takes for AUTH (one password, both servers).

Fixtures: ``dovecot`` (started, with ``oauth_server``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support.oauth_server import CLIENT_ID, CLIENT_SECRET, OAuthServer

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
USER = "alice@example.com"  # the recording upstream's account, too
ANN = "ann@example.com"  # the connected address of tests/relay/test_mailboxes.py
PASSWORD = "dovecot test password"
APP_PASSWORD = "correct horse battery"  # tests/support/upstream.py PASSWORD (it imports us)
SENT = "Sent"

_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = trackrelay-test-{port}
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain xoauth2 oauthbearer
log_path = {root}/dovecot.log
first_valid_uid = {uid}
mail_location = maildir:{root}/mail/%u/Maildir
mail_plugins = $mail_plugins notify mail_log
plugin {{
  mail_log_events = copy expunge
  mail_log_fields = uid box msgid
}}
default_internal_user = {internal}
default_login_user = {login}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/app-passwords
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox {sent} {{
    special_use = \\Sent
    auto = create
  }}
{trash}}}
"""

_TRASH = """\
  mailbox "{name}" {{
    special_use = \\Trash
    auto = create
  }}
"""

_QUOTA = """\
plugin {{
  quota = count:User quota
  quota_vsizes = yes
  quota_max_mail_size = {size}
}}
"""

_OAUTH2 = """\
introspection_mode = post
introspection_url = {url}
username_attribute = username
active_attribute = active
active_value = true
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accounts() -> tuple[int, int, str, str]:
    """uid, gid of the mail processes; Dovecot's internal and login users."""
    if os.geteuid() != 0:
        name = pwd.getpwuid(os.getuid()).pw_name
        return os.getuid(), os.getgid(), name, name
    try:
        mail = pwd.getpwnam("dovecot")
        login = pwd.getpwnam("dovenull").pw_name
    except KeyError:
        pytest.skip("the dovecot and dovenull system users are missing (dovecot-core)")
    return mail.pw_uid, mail.pw_gid, mail.pw_name, login


@dataclass
class Dovecot:
    root: Path
    oauth: OAuthServer
    port: int = 0
    capabilities: str = ""  # set: the post-login IMAP capabilities (e.g. without IDLE)
    scope: str = ""  # set: a token must have this scope (the oauth2 passdb's ``scope``)
    trash: str = ""  # set: a mailbox of this name is the \Trash special-use folder
    app_password: str = APP_PASSWORD  # USER's second password (another: IMAP refuses it)
    max_mail_size: str = ""  # set (e.g. "8k"): a larger APPEND is refused (the quota plugin)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The ``imap`` of a provider's table (plain IMAP: loopback only)."""
        return f"imap://127.0.0.1:{self.port}"

    def start(self) -> Dovecot:
        if not Path(DOVECOT).exists():
            pytest.skip("dovecot is not installed (apt-get install dovecot-imapd)")
        uid, gid, internal, login = _accounts()
        self.port = self.port or _free_port()  # started again: the same port and mail
        for name in ("run", "state", "mail"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        os.chown(self.root / "mail", uid, gid)
        host = self.oauth.url.removeprefix("http://")
        introspect = f"http://{CLIENT_ID}:{CLIENT_SECRET}@{host}/introspect"
        oauth2 = _OAUTH2.format(url=introspect) + (f"scope = {self.scope}\n" if self.scope else "")
        (self.root / "oauth2.conf.ext").write_text(oauth2)
        (self.root / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}{PASSWORD}\n" for user in (USER, ANN))
        )
        (self.root / "app-passwords").write_text(f"{USER}:{{PLAIN}}{self.app_password}\n")
        config = self.root / "dovecot.conf"
        text = _CONFIG.format(
            root=self.root, port=self.port, uid=uid, gid=gid,
            internal=internal, login=login, sent=SENT,
            trash=_TRASH.format(name=self.trash) if self.trash else "",
        )  # fmt: skip
        if self.capabilities:
            text += f"imap_capability = {self.capabilities}\n"
        if self.max_mail_size:
            text = text.replace("notify mail_log", "notify mail_log quota")
            text += _QUOTA.format(size=self.max_mail_size)
        config.write_text(text)
        self._process = subprocess.Popen(
            [DOVECOT, "-c", str(config), "-F"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = (self._process.stderr.read() if self._process.stderr else b"").decode()
                pytest.skip(f"dovecot did not start: {error.strip()[:300] or self.log()[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.skip(f"dovecot did not listen within 15 s: {self.log()[-300:]}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
            if self._process.stderr is not None:
                self._process.stderr.close()
            self._process = None

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- the tests' own look into the mailbox (password login) ---

    def client(self, user: str = ANN) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=10)
        client.login(user, PASSWORD)
        return client

    def append(
        self, folder: str, data: bytes, flags: tuple[bytes, ...] = (), user: str = ANN
    ) -> None:
        """File a message in FOLDER as a provider (or a mail client) would."""
        with self.client(user) as client:
            client.append(folder, data, flags=flags)

    def messages(self, folder: str, user: str = ANN) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """Every message in FOLDER, by UID: its bytes and flags (read without marking seen)."""
        with self.client(user) as client:
            client.select_folder(folder, readonly=True)
            found = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "FLAGS"])
            return [(found[uid][b"BODY[]"], tuple(found[uid][b"FLAGS"])) for uid in sorted(found)]


@pytest.fixture
def dovecot(oauth_server: OAuthServer) -> Iterator[Dovecot]:
    # Not under pytest's tmp_path: its directories are 0700, and the mail processes
    # (the dovecot user, as root) must reach their Maildir.
    root = Path(tempfile.mkdtemp(prefix="trackrelay-dovecot-"))
    root.chmod(0o755)
    server = Dovecot(root, oauth_server)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
