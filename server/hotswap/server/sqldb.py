"""The one place that knows which SQL database holds the registry and the job store:
SQLite (a file path: the embedded default) or PostgreSQL (a postgresql:// URL, when
several nodes write). Callers write portable SQL with `?` placeholders and take
write transactions with `tx()`; the few dialect differences live here."""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidArgument


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


class SqlDb:
    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self.postgres = is_postgres(target)
        if not self.postgres and ("://" in self.target or self.target.startswith(("postgresql:", "postgres:"))):
            # e.g. a URL squashed by Path() ("postgresql:/…"): never silently make a SQLite file of it
            raise InvalidArgument(f"{self.target!r}: give a SQLite file path or a postgresql:// URL", field="database")
        if not self.postgres:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Row locks: PostgreSQL serialises on the rows a transaction selects FOR UPDATE;
        # SQLite has one writer at a time already (BEGIN IMMEDIATE), and no such syntax.
        self.for_update = " FOR UPDATE" if self.postgres else ""
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if self.postgres else ""

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.postgres:
                import psycopg
                from psycopg.rows import dict_row

                conn = psycopg.connect(self.target, autocommit=True, row_factory=dict_row)
            else:
                conn = sqlite3.connect(self.target, timeout=30, isolation_level=None)
                conn.execute("PRAGMA busy_timeout=30000")
                # Switching a new file to WAL needs an exclusive lock and SQLite reports
                # "locked" at once (no busy wait) when another connection is doing the same.
                for attempt in range(100):
                    try:
                        conn.execute("PRAGMA journal_mode=WAL")
                        break
                    except sqlite3.OperationalError:
                        if attempt == 99:
                            raise
                        time.sleep(0.05)
                conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, args: tuple | list = ()) -> Any:
        """Returns the cursor (rowcount, fetch*)."""
        return self._conn().execute(self._sql(sql), tuple(args))

    def all(self, sql: str, args: tuple | list = ()) -> list[dict]:
        return [dict(r) for r in self.execute(sql, args).fetchall()]

    def one(self, sql: str, args: tuple | list = ()) -> dict | None:
        row = self.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def script(self, statements: str) -> None:
        """Schema set-up: `;`-separated statements, each idempotent (IF NOT EXISTS)."""
        with self.tx():
            if self.postgres:  # concurrent CREATE ... IF NOT EXISTS can still collide in PostgreSQL
                self.execute("SELECT pg_advisory_xact_lock(7262031)")
            for stmt in statements.split(";"):
                if stmt.strip():
                    self.execute(stmt)

    @contextmanager
    def tx(self) -> Iterator["SqlDb"]:
        """A write transaction. SQLite: IMMEDIATE takes the write lock up front, so
        read-then-write sequences (next version, next job) cannot interleave."""
        conn = self._conn()
        if self.postgres:
            with conn.transaction():
                yield self
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
