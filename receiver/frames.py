"""Frames between a receiver process and its writer process, both ends.

A frame is a 4-byte big-endian length and a ``marshal`` payload: marshal's
format may change between Python versions, but both ends are the same
interpreter (the receiver starts the writer with ``sys.executable``), and it
reads and writes the plain tuples and dicts of a batch without pickle's
machinery. What the frames say is in receiver/eventstore.py's docstring.
"""

from __future__ import annotations

import marshal
import os
import select
import struct
from typing import Any

#: A frame's header: the payload's length.
FRAME_HEADER = struct.Struct(">I")


def frame(payload: Any) -> bytes:
    data = marshal.dumps(payload)
    return FRAME_HEADER.pack(len(data)) + data


class FrameReader:
    """Frames from a file descriptor (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.closed = False

    def read(self, timeout: float | None) -> list[Any]:
        """The frames that arrive within ``timeout`` s (all those already there, at least)."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        while readable:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.closed = True
                break
            self.buffer += chunk
            readable, _, _ = select.select([self.fd], [], [], 0)
        frames = []
        view = memoryview(self.buffer)
        start = 0
        while len(view) - start >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(view, start)
            end = start + FRAME_HEADER.size + size
            if end > len(view):
                break
            frames.append(marshal.loads(view[start + FRAME_HEADER.size : end]))  # noqa: S302
            start = end
        view.release()
        del self.buffer[:start]
        return frames


class Reports:
    """Frames to the receiver; if it is gone (killed), the writer carries on without."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, payload: Any) -> None:
        if self.fd is None:
            return
        data = memoryview(frame(payload))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:  # EPIPE: nobody reads reports any more; the batches still count
            self.fd = None
