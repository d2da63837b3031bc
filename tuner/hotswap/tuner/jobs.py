"""The job store: training jobs and their events in SQLite, shared by the server
(which creates, lists, watches and cancels jobs) and tuner workers (which claim
and run them), possibly in different processes.

States: queued → validating → running → succeeded | failed | cancelled.
A worker claims a job atomically and keeps a heartbeat; a job whose worker
stopped beating (killed) goes back to queued and resumes from its last checkpoint.
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hotswap.server.errors import InvalidArgument, NotFound
from hotswap.server.sqldb import SqlDb

STATES = ("queued", "validating", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    adapter_name TEXT NOT NULL,
    method TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    estimated_finish_at DOUBLE PRECISION,
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    trained_tokens BIGINT NOT NULL DEFAULT 0,
    adapter_id TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    heartbeat_at DOUBLE PRECISION,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    plan TEXT NOT NULL DEFAULT '',
    quality TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


@dataclass
class Job:
    id: str
    adapter_name: str
    method: str
    state: str
    spec: dict
    """The validated training request (method, data, hyperparameters, labels)."""
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    estimated_finish_at: float | None = None
    error_code: str = ""
    error_message: str = ""
    trained_tokens: int = 0
    adapter_id: str = ""
    step: int = 0
    total_steps: int = 0
    worker: str = ""
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    attempts: int = 0
    plan: dict | None = None
    """What the job trains with, set when it starts running: {"hyperparameters": {...every value used},
    "automatic": [names chosen by the tuner], "train_examples", "validation_examples", "validation_held_out",
    "replay_examples", "steps_per_epoch"}."""
    quality: dict | None = None
    """The quality report of a succeeded job (quality.QualityReport.to_dict())."""

    @property
    def finished(self) -> bool:
        return self.state in FINAL


@dataclass
class JobEvent:
    job_id: str
    seq: int
    time: float
    kind: str
    """"state", "step", "eval", "checkpoint", "warning", "samples" or "report"."""
    payload: dict = field(default_factory=dict)


class JobStore:
    """Jobs in SQLite (a file path) or PostgreSQL (a postgresql:// URL, for several nodes)."""

    def __init__(self, db: str | Path) -> None:
        self.db = SqlDb(db)
        self.db.script(_SCHEMA)
        self._add_columns({"plan": "TEXT NOT NULL DEFAULT ''", "quality": "TEXT NOT NULL DEFAULT ''"})

    def _add_columns(self, columns: dict[str, str]) -> None:
        """Stores created by an older version lack these columns: add them (idempotent,
        and safe when several processes open the store at once)."""
        have = {d[0] for d in self.db.execute("SELECT * FROM jobs WHERE 1=0").description}
        for name, decl in columns.items():
            if name in have:
                continue
            try:
                with self.db.tx() as db:
                    if db.postgres:  # as SqlDb.script: concurrent DDL can collide in PostgreSQL
                        db.execute("SELECT pg_advisory_xact_lock(7262031)")
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {'IF NOT EXISTS ' if db.postgres else ''}{name} {decl}")
            except Exception as e:  # noqa: BLE001 - another process added it first (SQLite: "duplicate column name")
                if "duplicate column" not in str(e).lower():
                    raise

    # -- the server's side ------------------------------------------------------------
    def create(self, adapter_name: str, method: str, spec: dict) -> Job:
        job_id = "job-" + uuid.uuid4().hex[:12]
        now = time.time()
        with self.db.tx() as db:
            db.execute("INSERT INTO jobs (id, adapter_name, method, state, spec, created_at) VALUES (?,?,?,?,?,?)",
                       (job_id, adapter_name, method, "queued", json.dumps(spec), now))
            self._event(db, job_id, "state", {"state": "queued"}, now)
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self.db.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound(f"unknown training job {job_id!r}", field="job_id")
        return _job(row)

    def list(self, page_size: int = 50, page_token: str = "", state: str = "") -> tuple[list[Job], str]:
        """Newest first."""
        page_size = 50 if page_size <= 0 else min(page_size, 1000)
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if page_token:
            try:
                created, jid = json.loads(base64.urlsafe_b64decode(page_token.encode()))
            except Exception:  # noqa: BLE001 - any garbage token is the caller's error
                raise InvalidArgument("not a token this server issued", field="page_token") from None
            sql += " AND (created_at, id) < (?, ?)"
            args += [float(created), str(jid)]
        if state:
            if state not in STATES:
                raise InvalidArgument(f"unknown state {state!r}", field="state")
            sql += " AND state = ?"
            args.append(state)
        rows = self.db.all(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, page_size + 1))
        jobs = [_job(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            token = base64.urlsafe_b64encode(json.dumps([jobs[-1].created_at, jobs[-1].id]).encode()).decode()
        return jobs, token

    def request_cancel(self, job_id: str) -> Job:
        """Queued jobs are cancelled at once; running ones by their worker within one optimizer step."""
        with self.db.tx() as db:
            row = db.one("SELECT state FROM jobs WHERE id = ?" + db.for_update, (job_id,))
            if row is None:
                raise NotFound(f"unknown training job {job_id!r}", field="job_id")
            if row["state"] == "queued":
                now = time.time()
                db.execute("UPDATE jobs SET state='cancelled', finished_at=?, cancel_requested=1 WHERE id=?", (now, job_id))
                self._event(db, job_id, "state", {"state": "cancelled"}, now)
            elif row["state"] not in FINAL:
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
        return self.get(job_id)

    def events(self, job_id: str, after_seq: int = -1) -> list[JobEvent]:
        rows = self.db.all("SELECT * FROM job_events WHERE job_id=? AND seq>? ORDER BY seq", (job_id, after_seq))
        return [JobEvent(r["job_id"], r["seq"], r["time"], r["kind"], json.loads(r["payload"])) for r in rows]

    def unfinished_specs(self) -> list[dict]:
        """Specs of the jobs still to run or running (what their datasets are)."""
        rows = self.db.all("SELECT spec FROM jobs WHERE state IN ('queued','validating','running')")
        return [json.loads(r["spec"]) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        rows = self.db.all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # -- the worker's side ------------------------------------------------------------
    def claim(self, worker: str, stale_after: float = 60.0) -> Job | None:
        """Take the oldest queued job (first returning stale running jobs to the queue)."""
        now = time.time()
        with self.db.tx() as db:
            stale = db.all(
                "SELECT id FROM jobs WHERE state IN ('validating','running') AND (heartbeat_at IS NULL OR heartbeat_at < ?)" + db.skip_locked,
                (now - stale_after,),
            )
            for r in stale:
                db.execute("UPDATE jobs SET state='queued', worker='' WHERE id=?", (r["id"],))
                self._event(db, r["id"], "warning", {"message": "its worker stopped; resuming from the last checkpoint"}, now)
                self._event(db, r["id"], "state", {"state": "queued"}, now)
            # PostgreSQL: workers skip a row another worker is claiming instead of queueing on it
            row = db.one("SELECT id FROM jobs WHERE state='queued' AND cancel_requested=0 ORDER BY created_at, id LIMIT 1" + db.skip_locked)
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='validating', worker=?, heartbeat_at=?, attempts=attempts+1, "
                       "started_at=COALESCE(started_at, ?) WHERE id=?", (worker, now, now, row["id"]))
            self._event(db, row["id"], "state", {"state": "validating"}, now)
        return self.get(row["id"])

    def update(self, job_id: str, worker: str, **fields) -> bool:
        """Progress from the worker holding the job (also its heartbeat). False when the
        job is no longer this worker's (requeued after a stall) or a cancel was requested."""
        fields["heartbeat_at"] = time.time()
        fields = _encoded(fields)
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.db.tx() as db:
            cur = db.execute(f"UPDATE jobs SET {cols} WHERE id=? AND worker=?", (*fields.values(), job_id, worker))
            row = db.one("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return cur.rowcount == 1 and not row["cancel_requested"]

    def set_state(self, job_id: str, worker: str, state: str, **fields) -> None:
        assert state in STATES
        now = time.time()
        if state in FINAL:
            fields.setdefault("finished_at", now)
            fields["estimated_finish_at"] = None
        fields = _encoded(fields)
        cols = ", ".join(f"{k}=?" for k in ("state", *fields))
        with self.db.tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id=? AND worker=?", (state, *fields.values(), job_id, worker))
            payload = {"state": state}
            if fields.get("error_message"):
                payload |= {"error_code": fields.get("error_code", ""), "error_message": fields["error_message"]}
            self._event(db, job_id, "state", payload, now)

    def requeue(self, job_id: str, worker: str, reason: str) -> None:
        """The worker hands its job back (shutting down): another worker resumes it now,
        without waiting for the heartbeat to go stale."""
        now = time.time()
        with self.db.tx() as db:
            cur = db.execute("UPDATE jobs SET state='queued', worker='', estimated_finish_at=NULL WHERE id=? AND worker=?", (job_id, worker))
            if cur.rowcount == 1:
                self._event(db, job_id, "warning", {"message": reason}, now)
                self._event(db, job_id, "state", {"state": "queued"}, now)

    def add_event(self, job_id: str, kind: str, payload: dict) -> None:
        with self.db.tx() as db:
            self._event(db, job_id, kind, payload, time.time())

    @staticmethod
    def _event(db: SqlDb, job_id: str, kind: str, payload: dict, now: float) -> None:
        if db.postgres:  # the job's row serialises its event numbering across connections
            db.execute("SELECT id FROM jobs WHERE id=? FOR UPDATE", (job_id,))
        seq = db.one("SELECT COALESCE(MAX(seq), -1) + 1 AS seq FROM job_events WHERE job_id=?", (job_id,))["seq"]
        db.execute("INSERT INTO job_events (job_id, seq, time, kind, payload) VALUES (?,?,?,?,?)", (job_id, seq, now, kind, json.dumps(payload)))


def _encoded(fields: dict) -> dict:
    return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}


def _job(row: dict) -> Job:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    for k in ("plan", "quality"):
        d[k] = json.loads(d[k]) if d.get(k) else None
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)
