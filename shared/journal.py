"""Append-only JSON-lines files of records the database did not take yet.

Both the receiver (hits) and the relay (message records) must keep working
while the database is down, and must not lose what they could not write. They
append records here, fsynced, and replay the files once the database answers;
a file is deleted only after its last record was committed, so a crash
replays some records twice and the callers make that harmless (unique keys).

Files are per process (``<prefix>-<pid>-<n>-<random>.jsonl``, mode 0600) and
held with ``flock`` while written: with several processes on one directory,
each replays its own files and those of dead processes, never a live
sibling's.

A failed append (disk full, ``ENOSPC``) cuts the file back to where it was
and raises ``OSError``: no half-written line is left in the middle of a file
to spoil the records after it. ``append_what_fits`` keeps what still fits of
a batch, so the caller counts only what was really lost.

When to append, replay and set aside is decided in one place, shared/spool.py
(``Spool``), for every writer; it serialises its calls (one at a time). The
methods block, so async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

Record = dict[str, Any]


class Journal:
    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self._active: IO[bytes] | None = None
        self._serial = 0
        self._replay: tuple[Path, IO[str]] | None = None
        self._replay_offset = 0
        self.skipped = 0  # unreadable lines (a torn last write)

    @property
    def pattern(self) -> str:
        return f"{self.prefix}-*.jsonl"

    # --- writing ---

    def append(self, records: list[Record]) -> None:
        """Write ``records`` durably, or raise OSError having written none of them."""
        data = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records)
        if self._active is None:
            self._active = self._open_new()
        fd = self._active.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data.encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            self._cut_back(start)
            raise

    def append_what_fits(self, records: list[Record]) -> tuple[int, OSError | None]:
        """Append the longest prefix of ``records`` the disk takes (halving on ENOSPC).

        Returns (records written, the last error or None). On a nearly full
        disk a batch that does not fit whole is not lost whole.
        """
        try:
            self.append(records)
            return len(records), None
        except OSError as exc:
            if exc.errno != errno.ENOSPC or len(records) == 1:
                return 0, exc
        half = len(records) // 2
        written, error = self.append_what_fits(records[:half])
        if written < half:  # not even the first half: the rest will not fit either
            return written, error
        more, error = self.append_what_fits(records[half:])
        return written + more, error

    def _cut_back(self, size: int) -> None:
        assert self._active is not None
        try:
            os.ftruncate(self._active.fileno(), size)
        except OSError:
            log.exception("journal %s: cannot cut a failed write back", self._active.name)
        if size == 0:  # nothing in it: do not leave empty files behind
            with contextlib.suppress(OSError):
                os.unlink(self._active.name)
            self._active.close()
            self._active = None

    def _open_new(self) -> IO[bytes]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._serial += 1
        name = f"{self.prefix}-{os.getpid()}-{self._serial}-{secrets.token_hex(4)}.jsonl"
        # open() with an opener, not os.fdopen(): the file's .name must be its
        # path (a failed first append unlinks it; _take_next skips it by name).
        f = open(self.directory / name, "ab", buffering=0, opener=_private)  # noqa: SIM115 - held until sealed
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        return f

    def seal(self) -> None:
        """Close the file being appended to, so it can be replayed."""
        if self._active is not None:
            self._active.close()  # releases the lock
            self._active = None

    def append_rejected(self, records: list[Record]) -> None:
        """Records the database refused as invalid: kept for a human, never replayed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"rejected-{self.prefix}.jsonl", "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, default=str) + "\n")

    # --- replaying ---

    def read_slice(self, limit: int) -> list[Record]:
        """Up to ``limit`` records from the next replayable file ([] when none)."""
        while True:
            if self._replay is None and not self._take_next():
                return []
            assert self._replay is not None
            path, f = self._replay
            f.seek(self._replay_offset)
            records: list[Record] = []
            while len(records) < limit:
                line = f.readline()
                if not line:
                    break
                if not line.endswith("\n"):
                    log.warning("journal %s: skipping a torn last line", path.name)
                    self.skipped += 1
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    log.warning("journal %s: skipping an unreadable line", path.name)
                    self.skipped += 1
            if records:
                return records
            self._finish()

    def commit_slice(self) -> None:
        """The last slice is in the database: move past it."""
        if self._replay is not None:
            self._replay_offset = self._replay[1].tell()

    def _finish(self) -> None:
        assert self._replay is not None
        path, f = self._replay
        path.unlink(missing_ok=True)
        f.close()
        self._replay = None
        self._replay_offset = 0
        log.info("journal %s replayed and removed", path.name)

    def _take_next(self) -> bool:
        for path in sorted(self.directory.glob(self.pattern), key=_mtime):
            if self._active is not None and path.name == Path(self._active.name).name:
                continue
            try:
                f = open(path, encoding="utf-8")  # noqa: SIM115 - read slice by slice across calls
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(f.fileno()).st_ino != path.stat().st_ino:
                    raise BlockingIOError  # replaced meanwhile
            except (BlockingIOError, FileNotFoundError):
                f.close()  # a live process is writing it, or another one replayed it
                continue
            self._replay = (path, f)
            self._replay_offset = 0
            return True
        return False

    def has_files(self) -> bool:
        return any(self.directory.glob(self.pattern))

    def size(self) -> tuple[int, int]:
        """(files, bytes) waiting to be replayed."""
        files = total = 0
        head = f"{self.prefix}-"
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if entry.name.startswith(head) and entry.name.endswith(".jsonl"):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
                        files += 1
        return files, total

    def close(self) -> None:
        self.seal()
        if self._replay is not None:
            self._replay[1].close()
            self._replay = None


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
