"""A real `hotswap-server` process on loopback, for end-to-end tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(r"hotswap: grpc port (\d+) metrics port (\S+)(?: http port (\S+))?")


def run_temp_root(path: Path) -> Path:
    """This pytest run's base temporary folder (pytest-of-<user>/pytest-<N>), which holds every
    test's tmp_path: the servers tests start may read adapters from anywhere under it."""
    for p in (path, *path.parents):
        if re.fullmatch(r"pytest-\d+", p.name):
            return p
    return path.parent


class ServerProcess:
    def __init__(self, model: Path, data_dir: Path, *extra: str, env: dict | None = None) -> None:
        self.model, self.data_dir, self.extra = model, data_dir, extra
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.lines: list[str] = []
        self._serving = threading.Event()
        self._ports = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_serving: bool = True, timeout: float = 180) -> "ServerProcess":
        cmd = [sys.executable, "-m", "hotswap.server.api.app", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--data-dir", str(self.data_dir),
               "--device", "cpu", "--dtype", "float32", "--drain-seconds", "60", "--tuner-workers", "0",
               # rows longer than the tiny test models' 512-position context, so tests can hold a request open
               "--max-seq-len", "4096",
               *([] if "--allowed-adapter-dir" in self.extra else ["--allowed-adapter-dir", str(run_temp_root(Path(self.data_dir).resolve()))]),
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ports.wait(timeout):
            raise RuntimeError("server did not bind:\n" + self.log())
        if wait_serving:
            self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self._serving.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not become ready:\n" + self.log())

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = READY.search(line)
            if m:
                self.port = int(m[1])
                self.metrics_port = None if m[2] == "off" else int(m[2])
                self.http_port = None if m[3] in (None, "off") else int(m[3])
                self._ports.set()
            if "hotswap: serving" in line:
                self._serving.set()

    def log(self) -> str:
        return "".join(self.lines[-200:])

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM and wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 120) -> int:
        """The exit code, once the process ended and every line it printed is in the log."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
