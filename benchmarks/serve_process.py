"""`tandem serve` in a child process for benchmarks/serve_load.py: a free loopback port, readiness
by /health, its output in a log file whose tail goes into every error, a graceful stop. Arguments
printed or written to JSON pass through `redacted` (no API key leaves the run)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


class LoadError(Exception):
    """A problem the user can fix (bad flags, no server at --url, a server that fails to start)."""


class Server:
    """`tandem serve` in a child process on a free loopback port, its output in a log file."""

    def __init__(self, server_args: tuple[str, ...], streams: int, startup_timeout: float):
        """streams: the most requests the run keeps in flight (--max-batch, unless server_args set it)."""
        with socket.socket() as probe:  # free a moment ago; a busy port fails with one clear line anyway
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        args = list(server_args)
        flags = {a.split("=")[0] for a in args}
        # Serve every stream at once unless told otherwise: otherwise the level measures the server's queue.
        if "--max-batch" not in flags:
            args += ["--max-batch", str(streams)]
        if "--max-queue" not in flags and streams > 64:
            args += ["--max-queue", str(streams)]
        self.command = [sys.executable, "-m", "tandem", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        *args]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(tempfile.gettempdir(), f"tandem-serve-load-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.timeout = startup_timeout

    def start(self) -> None:
        print(f"starting: {shlex.join(redacted(self.command))}", file=sys.stderr, flush=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        with httpx.Client(base_url=self.url, timeout=5, trust_env=False) as client:
            while True:
                if self.proc.poll() is not None:
                    raise LoadError(f"tandem serve exited with status {self.proc.returncode} before it was ready:\n"
                                    f"{self.log_tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # still loading
                if time.monotonic() > deadline:
                    raise LoadError(f"tandem serve was not ready after {self.timeout:.0f} s (--startup-timeout); "
                                    f"its log: {self.log_path}\n{self.log_tail()}")
                time.sleep(0.25)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise LoadError(f"tandem serve exited with status {self.proc.returncode} during the run:\n"
                            f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join("  | " + line for line in tail) + f"\n  (full log: {self.log_path})"

    def stop(self, failed: bool) -> None:
        """Ctrl-C as a user would (uvicorn shuts down gracefully), then harder if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            for send, wait in ((lambda: self.proc.send_signal(signal.SIGINT), 30), (self.proc.terminate, 10),
                               (self.proc.kill, 10)):
                send()
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if not failed:
            try:
                os.remove(self.log_path)
            except OSError:
                pass


def redacted(args: list[str] | tuple[str, ...]) -> list[str]:
    """The arguments with the value of --api-key hidden, in --server-args too (they are printed and
    written to --json)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--api-key" and i + 1 < len(out):
            out[i + 1] = "***"
        elif arg.startswith("--api-key="):
            out[i] = "--api-key=***"
        elif arg == "--server-args" and i + 1 < len(out):
            out[i + 1] = shlex.join(redacted(shlex.split(out[i + 1])))
        elif arg.startswith("--server-args="):
            out[i] = "--server-args=" + shlex.join(redacted(shlex.split(arg.split("=", 1)[1])))
    return out
