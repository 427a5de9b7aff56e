"""Processes and measurements shared by the benchmark scripts.

Everything listens on 127.0.0.1 and ephemeral ports; each server is a separate
process so its CPU time and peak memory can be read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
BENCH_SECRET = "bench-secret-key-0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The server and its live descendants (the worker processes of a supervisor)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    todo += [int(child) for child in task.read_text().split()]
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its workers so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / ticks

    def peak_rss(self) -> int:
        """The largest VmHWM among the server's processes (one worker relays a message)."""
        peak = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        return peak

    def rss(self) -> int:
        """Resident memory now: VmRSS summed over the server and its workers."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def reset_peak_rss(self) -> None:
        """Reset VmHWM to the current RSS (Linux 4.0+: write 5 to clear_refs)."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


@contextmanager
def running(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``cmd``, wait until ``port`` accepts; its output goes to a temp file
    (a pipe nobody reads would block a chatty server) shown if it fails to start."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server writes it while it runs
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        try:
            wait_port(port, proc)
        except (RuntimeError, TimeoutError) as exc:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)}: {exc}\n{tail}") from None
        yield Server(port, proc)
    finally:
        log.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def smtp_sink() -> Iterator[Server]:
    """Postfix's smtp-sink: accepts and discards, 256 connections at most."""
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    with running([SMTP_SINK, *user, f"127.0.0.1:{port}", "256"], port) as server:
        yield server


@contextmanager
def baseline(kind: str, upstream_port: int) -> Iterator[Server]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.baselines", kind, str(port), str(upstream_port)]
    with running(cmd, port) as server:
        yield server


@contextmanager
def trackrelay(upstream_port: int, workers: int = 1, **extra: str) -> Iterator[Server]:
    """``trackrelay relay`` on a plain listener for trusted loopback clients.

    A real (loopback ``smtp://``) upstream means production mode, which wants a
    certificate for the TLS listeners: a throwaway self-signed one is made here.
    """
    from relay.tlscert import write_self_signed

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="trackrelay-bench-") as var:
        cert, key = Path(var) / "cert.pem", Path(var) / "key.pem"
        write_self_signed(cert, key)
        env = {
            "TRACKRELAY_TLS_CERT": str(cert),
            "TRACKRELAY_TLS_KEY": str(key),
            "TRACKRELAY_RELAY_WORKERS": str(workers),
            "TRACKRELAY_UPSTREAM": f"smtp://127.0.0.1:{upstream_port}",
            "TRACKRELAY_AUTH_MODE": "none",
            "TRACKRELAY_TRUSTED_NETWORKS": "127.0.0.0/8",
            "TRACKRELAY_PLAIN_PORT": str(port),
            "TRACKRELAY_SMTP_PORT": str(free_port()),
            "TRACKRELAY_SMTPS_PORT": str(free_port()),
            "TRACKRELAY_SECRET_KEY": BENCH_SECRET,
            "TRACKRELAY_VAR_DIR": var,
            "TRACKRELAY_PUBLIC_URL": "https://t.example.com",
            "TRACKRELAY_LOG_LEVEL": "WARNING",
            "TRACKRELAY_MAX_MESSAGE_SIZE": str(100 * 1024 * 1024),
            # The memory item's stall probe is a session that only sends NOOP.
            "TRACKRELAY_MAX_COMMANDS_WITHOUT_MAIL": str(10**9),
            **extra,
        }
        cmd = [sys.executable, "-m", "trackrelay", "relay"]
        with running(cmd, port, env) as server:
            yield server


def smtp_source(port: int, path: Path, sessions: int, messages: int) -> float:
    """Send ``messages`` copies of ``path`` over ``sessions`` connections; seconds taken.

    ``-d`` keeps each connection open across messages, as a client sending a
    batch does.
    """
    cmd = [
        SMTP_SOURCE,
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-F",
        str(path),
        "-f",
        "ann@example.com",
        "-t",
        "bob@example.net",
        f"127.0.0.1:{port}",
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, check=False, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.decode(errors='replace')[-500:]}")
    return elapsed


@dataclass
class Stat:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, unit: str = "", digits: int = 1) -> str:
        return f"{self.median:.{digits}f}{unit} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))
    return ordered[index]
