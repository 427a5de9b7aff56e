"""The baseline for bench/receiver.py: a bare Starlette endpoint returning the same GIF.

Same uvicorn setup as ``trackrelay receiver`` (httptools, uvloop, a socket
bound once and shared by the workers), nothing recorded.
"""

from __future__ import annotations

import argparse
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.supervisors import Multiprocess

from receiver.tracking import PIXEL, PIXEL_HEADERS


async def pixel(request: Request) -> Response:
    return Response(PIXEL, headers=PIXEL_HEADERS)


app = Starlette(routes=[Route("/o/{token:path}", pixel, methods=["GET", "HEAD"])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # connections queue from now on, even before the workers accept
    sock.set_inheritable(True)
    config = uvicorn.Config(
        "bench.bare:app",
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        proxy_headers=True,
        server_header=False,
    )
    print(f"bare endpoint on http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
