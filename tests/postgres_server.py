"""A real PostgreSQL server for the tests (Debian's `postgresql` package), run as the
`postgres` system user on a private socket directory and a free loopback port."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from ports import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and this machine run the suite as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0

    def start(self) -> "PostgresServer":
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self.port = free_port()
        data = self.root / "data"
        subprocess.run(_as_postgres([_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "hotswap"]), check=True, capture_output=True)
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(data), "-l", str(self.root / "log"), "-w", "start",
                                     "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"]),
                       check=True, capture_output=True)
        return self

    def new_database(self) -> str:
        """A fresh database; returns its URL."""
        import psycopg

        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"postgresql://hotswap@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://hotswap@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(_as_postgres([_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop"]), capture_output=True)
        time.sleep(0.1)
