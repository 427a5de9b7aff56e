"""The relay's listeners, TLS and lifecycle.

Listeners are made with ``loop.create_server`` on the caller's event loop (not
aiosmtpd's ``Controller``, which runs its own loop in a thread and could not
share the database engine or async clients with the receiver):

* ``smtp``: submission with STARTTLS; AUTH is offered only after TLS.
* ``smtps``: implicit TLS. aiosmtpd does not see TLS it did not start itself
  and would refuse AUTH (538) and not advertise it, so this listener is built
  with ``auth_require_tls=False``: the socket is TLS from the first byte.
* ``plain`` (optional): no TLS, no AUTH, for app servers in the trusted
  networks only; anyone else gets 554 and is disconnected (relay/peers.py,
  which any listener restricted to some peers uses).
* ``gateway`` (optional, ``TRACKRELAY_GATEWAY_PORT``): the organisation's MTA
  (relay/gateway.py has its own handler, sharing the tracker and the
  recorder); STARTTLS offered (required with ``_REQUIRE_TLS`` or client
  names), its own TLS context asks for a client certificate when
  ``TRACKRELAY_GATEWAY_CLIENT_NAMES`` is set; only its networks and names.
* ``intake`` (optional, ``TRACKRELAY_INTAKE_PORT``): copies of incoming mail
  for replies and bounces, never delivered (relay/intake.py, its own handler,
  size limit and writer; the writer stops after the port's last session);
  STARTTLS offered; only ``TRACKRELAY_INTAKE_NETWORKS``.
* no listener, the INBOX of each mailbox connection whose provider has
  ``imap`` (relay/inboxwatch.py, ``TRACKRELAY_IMAP_WATCH``): replies and
  bounces read over IMAP, stored through the intake's writer (or its own).

Every listener is opened by :meth:`RelayServer._listen` and its sessions are
made by :meth:`RelayServer._protocol` (what differs is passed: handler, peers,
TLS, ident), so all share one :class:`relay.limits.SessionLimits` (sessions
in all and per client address, 421 past them), the timeouts and a graceful
:meth:`RelayServer.stop`; a TLS handshake on ``smtps`` must end within the
greeting timeout.

Scale-out: :func:`bind_listeners` binds the listening sockets once; worker
processes forked after that (``TRACKRELAY_RELAY_WORKERS``) each pass them to
their own ``RelayServer(..., sockets=...)``, and the kernel hands each new
connection to one of them (a shared accept queue: a busy worker simply
accepts less, and port 0 still means one port for all). The session limits
are the relay's, not each worker's: the parent makes one
:class:`relay.limits.SharedCounts` before the fork, passed as ``sessions``.

``stop()`` is graceful: stop accepting, answer 421 to idle sessions, let
transactions in flight finish (up to ``grace`` seconds), wait for deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from relay.answerstore import AnswerWriter
from relay.gateway import GatewayHandler
from relay.handler import RelayHandler
from relay.inboxwatch import InboxWatcher
from relay.intake import Intake, IntakeHandler
from relay.limits import SessionLimits, SharedCounts
from relay.peers import Peers, ask_for_certificates
from relay.smtp import RelaySMTP
from relay.tlscert import certificate_paths, server_context
from relay.track import Counters, Tracker
from shared.config import Settings, SettingsError
from shared.devsetup import ensure_dev_user

log = logging.getLogger(__name__)


class RelayServer:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        tracker: Tracker | None = None,
        sockets: dict[str, socket.socket] | None = None,
        watch_inbox: bool = True,  # False: another worker of this relay watches them
        sessions: SharedCounts | None = None,  # the session counts of all the relay's workers
    ) -> None:
        self.settings = settings
        self.watch_inbox = watch_inbox
        self._sockets = sockets or {}
        self.engine = engine
        self.handler = RelayHandler(settings, engine, tracker)
        self.limits = SessionLimits(
            settings.max_sessions, settings.max_sessions_per_ip, shared=sessions
        )
        self.gateway: GatewayHandler | None = None
        if settings.gateway_port is not None:
            handler = self.handler
            self.gateway = GatewayHandler(settings, engine, handler.tracker, handler.recorder)
        self.ports: dict[str, int] = {}
        self.certificate: Path | None = None
        self._servers: list[asyncio.Server] = []
        self._connections: set[RelaySMTP] = set()
        self._closed = asyncio.Event()
        self._stopping = False
        self._dev_lines: list[str] = []
        self.intake: Intake | None = None  # relay/intake.py, if its port is set
        self.inbox: InboxWatcher | None = None  # relay/inboxwatch.py, if a provider has imap

    @property
    def metrics(self) -> Counters:
        """This relay's injection counters (for /metrics)."""
        return self.handler.tracker.metrics

    async def start(self) -> None:
        # aiosmtpd logs every command line at INFO, AUTH PLAIN's credentials included.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        settings = self.settings
        cert, key = await asyncio.to_thread(certificate_paths, settings)
        self.certificate = cert
        context = server_context(cert, key)
        self._dev_lines = await asyncio.to_thread(ensure_dev_user, settings, self.engine)
        await self.handler.probe_upstream()
        await self.handler.recorder.start()  # replays what a previous run journaled
        await self._listen("smtp", settings.smtp_port, tls_context=context)
        await self._listen("smtps", settings.smtps_port, ssl=context, auth_require_tls=False)
        if settings.plain_port is not None:
            peers = Peers.of("plain", settings.networks, serves="trusted networks")
            await self._listen("plain", settings.plain_port, peers=peers)
        if self.gateway is not None:
            await self._listen_gateway(cert, key)
        if settings.intake_port is not None:
            await self._listen_intake(context)
        if (
            self.watch_inbox
            and settings.imap_watch
            and any(p.imap for p in settings.oauth.values())
        ):
            writer = self.intake.writer if self.intake is not None else None  # one writer
            self.inbox = InboxWatcher(settings, self.engine, writer)
            await self.inbox.start()
        log.info("relay listening on %s: %s", settings.host, self.ports)

    @property
    def answer_writer(self) -> AnswerWriter | None:
        """The one writer of answers: the intake's, else the INBOX watcher's own."""
        if self.intake is not None:
            return self.intake.writer
        return self.inbox.writer if self.inbox is not None else None

    async def _listen_gateway(self, cert: Path, key: Path) -> None:
        settings, gateway = self.settings, self.gateway
        assert gateway is not None
        assert settings.gateway_port is not None
        gateway.use_certificate(cert, key)
        await gateway.probe_upstream()
        names = settings.gateway_client_name_list
        context = server_context(cert, key)  # its own: only it asks for client certificates
        if names:
            ask_for_certificates(
                context, settings.gateway_client_ca, "TRACKRELAY_GATEWAY_CLIENT_CA"
            )
        peers = Peers.of(
            "gateway", settings.gateway_network_list, names, "the organisation's mail servers"
        )
        await self._listen(
            "gateway",
            settings.gateway_port,
            handler=gateway,
            peers=peers,
            tls_context=context,
            require_starttls=settings.gateway_require_tls or bool(names),
        )

    async def _listen_intake(self, context: ssl.SSLContext) -> None:
        """The intake: its own handler (never delivers), peers and size; its writer runs
        before the port opens (it first replays what a previous run journaled)."""
        settings = self.settings
        assert settings.intake_port is not None
        intake = self.intake = Intake(settings, self.engine)
        await intake.writer.start()
        try:
            await self._listen(
                "intake",
                settings.intake_port,
                handler=intake.handler,
                ident="trackrelay intake",
                peers=intake.peers,
                tls_context=context,
            )
        except SettingsError:
            await intake.writer.stop()
            self.intake = None
            raise

    async def _listen(
        self, listener: str, port: int, *, ssl: ssl.SSLContext | None = None, **options: Any
    ) -> None:
        """Open one listener (or take its socket bound by a parent of several workers);
        ``options`` go to :meth:`_protocol`."""
        loop = asyncio.get_running_loop()
        factory = lambda: self._protocol(listener, **options)  # noqa: E731
        # A TLS handshake never begun holds a socket too: no longer than a greeting.
        handshake = self._greeting_timeout() if ssl else None
        try:
            if listener in self._sockets:  # bound by the parent of several workers
                server = await loop.create_server(
                    factory,
                    sock=self._sockets[listener],
                    ssl=ssl,
                    ssl_handshake_timeout=handshake,
                )
            else:
                server = await loop.create_server(
                    factory, self.settings.host, port, ssl=ssl, ssl_handshake_timeout=handshake
                )
        except OSError as exc:
            setting = f"TRACKRELAY_{listener.upper()}_PORT"
            message = f"{setting}: cannot listen on {self.settings.host}:{port}: {exc}"
            raise SettingsError(message) from None
        self._servers.append(server)
        self.ports[listener] = server.sockets[0].getsockname()[1]

    def _protocol(
        self,
        listener: str,
        handler: RelayHandler | IntakeHandler | None = None,
        ident: str = "trackrelay ESMTP",
        **options: Any,
    ) -> RelaySMTP:
        """One session of ``listener``: its handler (the relay's unless given) and SIZE,
        under the relay's limits and timeouts, counted until it ends (:meth:`stop`)."""
        handler = handler or self.handler
        protocol = RelaySMTP(
            handler,
            listener=listener,
            on_open=self._remember,
            on_close=self._forget,
            hostname=self.settings.smtp_hostname,
            ident=ident,
            data_size_limit=handler.size_limit(),
            enable_SMTPUTF8=True,  # decode UTF-8 arguments; advertised only if upstream has it
            timeout=self.settings.idle_timeout,
            data_timeout=self.settings.data_timeout,
            command_limit=self.settings.max_commands_without_mail,
            limits=self.limits,
            greeting_timeout=self._greeting_timeout(),
            loop=asyncio.get_running_loop(),
            **options,
        )
        return protocol

    def _greeting_timeout(self) -> float:
        """Until the first command: the greeting timeout, never longer than the idle one."""
        return min(self.settings.greeting_timeout, self.settings.idle_timeout)

    def _remember(self, protocol: RelaySMTP) -> None:
        self._connections.add(protocol)
        self._closed.clear()
        if self._stopping:  # its TLS handshake ended after stop() began: greet, then 421
            asyncio.get_running_loop().call_soon(protocol.begin_shutdown)

    def _forget(self, protocol: RelaySMTP) -> None:
        self._connections.discard(protocol)
        if not self._connections:
            self._closed.set()

    async def stop(self, grace: float = 30) -> None:
        """Stop accepting; finish transactions in flight; close the rest after grace."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for protocol in list(self._connections):
            protocol.begin_shutdown()
        if self._connections:
            try:
                await asyncio.wait_for(self._closed.wait(), grace)
            except TimeoutError:
                log.warning(
                    "%d session(s) still busy after %ss: closing", len(self._connections), grace
                )
                for protocol in list(self._connections):
                    protocol.abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), 1)
        if self.inbox is not None:  # before the intake: it may share its writer
            await self.inbox.stop()
            self.inbox = None
        if self.intake is not None:  # its sessions ended above: what they queued is written
            await self.intake.writer.stop()
        self.handler.sent.stop()  # cleanings of Sent folders end their looking now
        await self.handler.drain()
        self.handler.sent.close()
        if self.gateway is not None:
            await self.gateway.drain()
        await self.handler.recorder.stop()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def describe(self) -> list[str]:
        """What to put in a mail client's outgoing-server settings."""
        settings, host = self.settings, self.settings.host
        lines = [
            "Outgoing (SMTP) server for your mail client:",
            f"  server: {host}  port {self.ports.get('smtp', settings.smtp_port)} with STARTTLS,"
            f" or port {self.ports.get('smtps', settings.smtps_port)} with SSL/TLS",
        ]
        if settings.auth_mode == "passthrough" and not settings.upstream_target.is_sink:
            lines.append(
                f"  authentication: normal password, your own account at {settings.upstream_target}"
            )
        elif settings.auth_mode == "none":
            lines.append("  authentication: none (trusted networks only)")
        else:
            lines.append("  authentication: normal password (PLAIN or LOGIN), a relay user")
        lines += self._dev_lines
        if self.certificate is not None and settings.tls_cert is None:
            lines.append(
                f"  certificate: self-signed, {self.certificate} (accept it in the client)"
            )
        if "plain" in self.ports:
            lines.append(
                f"  plain SMTP without AUTH on port {self.ports['plain']} "
                f"for {settings.trusted_networks or 'no network'}"
            )
        if "gateway" in self.ports:
            domains = ", ".join(sorted(settings.gateway_domain_list))
            lines.append(
                f"  gateway for the organisation's mail servers on port {self.ports['gateway']} "
                f"for {settings.gateway_networks}, senders at {domains}; "
                f"returns to {settings.gateway_upstream_target}"
            )
        if "intake" in self.ports:
            lines.append(
                f"  intake for copies of incoming mail (replies, bounces) on port "
                f"{self.ports['intake']} for {settings.intake_networks or 'no network'}"
            )
        if self.inbox is not None:
            lines.append(
                f"  replies and bounces read over IMAP from {len(self.inbox.watches)} connected "
                "mailbox(es) (more as they are connected)"
            )
        target = settings.upstream_target
        if target.is_sink and target.path is not None:
            lines.append(f"  sent mail lands in: {target.path / 'new'} (one file per recipient)")
        else:
            lines.append(f"  mail is delivered to {target}")
        return lines


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """Listening sockets for every listener, bound once for several worker processes."""
    wanted = {"smtp": settings.smtp_port, "smtps": settings.smtps_port}
    if settings.plain_port is not None:
        wanted["plain"] = settings.plain_port
    if settings.gateway_port is not None:
        wanted["gateway"] = settings.gateway_port
    if settings.intake_port is not None:
        wanted["intake"] = settings.intake_port
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sockets: dict[str, socket.socket] = {}
    for listener, port in wanted.items():
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, port))
        except OSError as exc:
            sock.close()
            for other in sockets.values():
                other.close()
            setting = f"TRACKRELAY_{listener.upper()}_PORT"
            message = f"{setting}: cannot listen on {settings.host}:{port}: {exc}"
            raise SettingsError(message) from None
        sock.listen(1024)
        sock.setblocking(False)
        sockets[listener] = sock
    return sockets
