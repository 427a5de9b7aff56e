"""The HTTP client for addresses an operator typed in (webhook endpoints).

Why: an administrator (or someone who took over an administrator's session)
could point a webhook at ``http://127.0.0.1:5432``, ``[::1]``, ``10.0.0.1`` or
the cloud metadata service at ``169.254.169.254`` and read the reply in the
delivery log. So every connection goes through :class:`PublicOnlyBackend`,
which resolves the host itself, refuses unless EVERY address is public
(``ipaddress``'s ``is_global``, and not multicast: loopback, private,
link-local, unique-local, shared and reserved ranges are all out) and then
connects to the very address it checked. The check is at connect time, on
the resolved address, so a name that resolves to a public address when the
endpoint is saved and to 127.0.0.1 later (DNS rebinding) is still refused.
TLS keeps the host name from the URL (httpcore passes it as the SNI and
checks the certificate against it), so HTTPS endpoints work as before.

Refused addresses are refused before any packet is sent: the answer is the
same whether a port there is open or closed. ``TRACKRELAY_WEBHOOK_ALLOW_PRIVATE``
lifts the rule for local set-ups (a receiver next to its webhook consumer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import typing
from collections.abc import AsyncIterator, Iterable

import httpcore
import httpx

from shared.config import Settings


class RefusedAddress(httpx.ConnectError):
    """The endpoint's host is (or resolves to) a non-public address."""


def refused(address: str) -> bool:
    """True for any address a webhook may not reach without the setting."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def public_addresses(host: str, port: int) -> list[str]:
    """The addresses of ``host``; RefusedAddress when any is not public."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except OSError as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses or any(refused(a) for a in addresses):
        raise RefusedAddress(
            f"{host} is a loopback, private or otherwise non-public address; webhooks go only "
            "to public addresses (set TRACKRELAY_WEBHOOK_ALLOW_PRIVATE=true for local set-ups)"
        )
    return addresses


class PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to checked public addresses."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore calls it so
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await public_addresses(host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        raise httpx.ConnectError(str(last))

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore calls it so
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedAddress("webhooks do not go to Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


def _mapped(exc: Exception, default: type[httpx.TransportError]) -> type[httpx.TransportError]:
    """httpx's exception of the same name as httpcore's (ConnectError, ReadTimeout, ...)."""
    kind = getattr(httpx, type(exc).__name__, default)
    return kind if isinstance(kind, type) and issubclass(kind, httpx.TransportError) else default


class PublicOnlyTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool with :class:`PublicOnlyBackend`."""

    def __init__(self) -> None:
        self._pool = httpcore.AsyncConnectionPool(network_backend=PublicOnlyBackend())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, typing.AsyncIterable)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            reply = await self._pool.handle_async_request(core)
        except httpcore.TimeoutException as exc:
            raise _mapped(exc, httpx.TimeoutException)(str(exc), request=request) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise _mapped(exc, httpx.TransportError)(str(exc), request=request) from exc
        assert isinstance(reply.stream, typing.AsyncIterable)
        return httpx.Response(
            status_code=reply.status,
            headers=reply.headers,
            stream=_Body(reply.stream),
            extensions=reply.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def client(settings: Settings) -> httpx.AsyncClient:
    """The client every webhook request goes through (delivery and test button)."""
    transport = None if settings.webhook_allow_private else PublicOnlyTransport()
    return httpx.AsyncClient(
        timeout=settings.webhook_timeout,
        follow_redirects=False,
        transport=transport,
        trust_env=transport is None,
    )


def excerpt(text: str, limit: int = 80) -> str:
    """A short, escaped piece of a reply body for the delivery log (never the whole reply)."""
    short = text[:limit].encode("unicode_escape").decode("ascii")
    return short + ("…" if len(text) > limit else "")
