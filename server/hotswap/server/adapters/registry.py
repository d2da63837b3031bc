"""Which adapters exist: metadata in SQLite, files in a local store folder.

Ids are ``name@version``. Registering a name again adds the next version (versions
are never reused, even after a delete, so a cache keyed by id can never serve a
stale copy); a bare name resolves to the latest version. Registration copies the
files into ``<store>/<name>/<version>/`` first, validates them, and only then
makes the version visible in one transaction, so a reader sees either the old
latest version or the complete new one. Other processes (the tuner) write to the
same SQLite file and the server sees their adapters on its next lookup.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import HotswapError, InvalidArgument, NotFound, shown
from ..sqldb import SqlDb
from .peft_files import CONFIG, PICKLES, WEIGHTS
from .score_head import LABELS_FILE, MAX_LABELS_FILE_BYTES
from .weights import Adapter, LoraWeights

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ID = re.compile(r"^(?P<name>[^@]+)(@(?P<version>[0-9]{1,9}))?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    peft_type TEXT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,
    num_virtual_tokens INTEGER NOT NULL,
    size_bytes BIGINT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    source_uri TEXT NOT NULL,
    labels TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS adapter_names (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL
);
"""


STAGING = ".staging"
STALE_STAGING_SECONDS = 24 * 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_adapter_name(name: str, field_name: str = "name") -> str:
    """Names are plain words: no slashes, no '..', so a name can never address a
    file outside the adapter store."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"invalid adapter name {shown(name)}: use letters, digits, '.', '_', '-' (at most 128, starting with a letter or digit)",
            field=field_name,
        )
    return name


MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256


def check_labels(labels: dict[str, str], field_name: str = "labels") -> dict[str, str]:
    """A caller's labels, bounded: every ListAdapters answer carries them."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{len(labels)} labels; at most {MAX_LABELS}", field=field_name)
    for k, v in labels.items():
        if not isinstance(k, str) or not k or len(k) > MAX_LABEL_KEY_CHARS:
            raise InvalidArgument(f"label key {shown(k, 80)}: 1 to {MAX_LABEL_KEY_CHARS} characters", field=field_name)
        if not isinstance(v, str) or len(v) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgument(f"label {shown(k, 80)}: the value has {len(str(v))} characters; at most {MAX_LABEL_VALUE_CHARS}",
                                  field=f"{field_name}.{k}")
    return labels


def parse_adapter_id(adapter_id: str) -> tuple[str, int | None]:
    """"name@3" -> ("name", 3); "name" -> ("name", None)."""
    m = _ID.fullmatch(adapter_id or "")
    if not m:
        raise InvalidArgument(f"invalid adapter id {shown(adapter_id)}: use name or name@version", field="adapter_id")
    check_adapter_name(m["name"], "adapter_id")
    return m["name"], int(m["version"]) if m["version"] else None


def check_adapter_id(adapter_id: str) -> str:
    parse_adapter_id(adapter_id)
    return adapter_id


@dataclass
class AdapterRecord:
    name: str
    version: int
    peft_type: str
    rank: int
    target_modules: list[str]
    num_virtual_tokens: int
    size_bytes: int
    base_fingerprint: str
    created_at: float
    """Unix time."""
    source_uri: str
    path: Path
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


def describe(adapter: Adapter) -> dict:
    """The registry's summary of a loaded adapter."""
    rank, targets = 0, []
    if isinstance(adapter.weights, LoraWeights):
        mods = adapter.weights.modules
        rank = max((m.rank for m in mods.values()), default=0)
        targets = sorted({name.rsplit(".", 1)[-1] for name in mods})
    return dict(peft_type=adapter.peft_type, rank=rank, target_modules=targets,
                num_virtual_tokens=adapter.num_virtual_tokens, size_bytes=adapter.nbytes)


def is_remote(store: str | Path) -> bool:
    return "://" in str(store) and not str(store).startswith("file://")


class AdapterRegistry:
    """Metadata in SQLite (a file path) or PostgreSQL (a postgresql:// URL) + adapter files
    in a local folder, or on object storage (any fsspec URL, e.g. s3://bucket/adapters)
    with a node-local cache. Safe from any thread and from several processes or nodes."""

    def __init__(self, db: str | Path, store_dir: str | Path, cache_dir: str | Path | None = None) -> None:
        self.db = SqlDb(db)
        self.remote = str(store_dir).rstrip("/") if is_remote(store_dir) else None
        if self.remote and cache_dir is None:
            raise InvalidArgument("an object-storage adapter store needs a local cache folder", field="adapter_cache_dir")
        local = cache_dir if self.remote else str(store_dir).removeprefix("file://")
        self.store = Path(local).resolve()
        """Local files: the store itself, or the node-local cache of a remote store."""
        self.store.mkdir(parents=True, exist_ok=True)
        self.db.script(_SCHEMA)  # IF NOT EXISTS: safe when several processes start together
        self._remove_dead_staging()

    def _remove_dead_staging(self) -> None:
        """Staging folders of registrations whose process died (SIGKILL mid-copy): those of this
        host's dead processes, and any older than STALE_STAGING_SECONDS (other hosts of a
        shared store). A live registration elsewhere is never touched."""
        host = socket.gethostname()
        for d in (self.store / STAGING).glob("*"):
            owner_host, pid, _ = (d.name.rsplit("-", 2) + ["", ""])[:3]  # <host>-<pid>-<id>; hosts may hold '-'
            pid = int(pid) if pid.isdigit() else None
            try:
                dead = (owner_host == host and pid is not None and not _alive(pid)) or time.time() - d.stat().st_mtime > STALE_STAGING_SECONDS
            except FileNotFoundError:
                continue
            if dead:
                shutil.rmtree(d, ignore_errors=True)

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.remote)[0]

    # -- writes --------------------------------------------------------------------
    def register(
        self,
        name: str,
        source_uri: str,
        validate: Callable[[Path], Adapter],
        base_fingerprint: str,
        labels: dict[str, str] | None = None,
    ) -> AdapterRecord:
        """Copy, validate, publish. `validate` loads the staged folder against the base
        model and raises a HotswapError when it does not fit."""
        check_adapter_name(name)
        labels = dict(labels or {})
        staging = self.store / STAGING / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            fetch_adapter_files(source_uri, staging)
            try:
                info = describe(validate(staging))
            except HotswapError as e:
                if e.field == "path":
                    e.field = "source_uri"
                e.message = e.message.replace(str(staging), source_uri)  # the caller's name for it, not the store's
                raise
            except Exception as e:  # noqa: BLE001 - a file no check foresaw is still the caller's bad input, not a server fault
                raise InvalidArgument(f"the adapter at {shown(source_uri)} could not be read: {type(e).__name__}: "
                                      f"{shown(str(e).replace(str(staging), source_uri))}", field="source_uri") from None
            with self.db.tx() as db:
                # The name's row is the lock two registrations of one name queue on.
                db.execute("INSERT INTO adapter_names (name, next_version) VALUES (?, 1) ON CONFLICT (name) DO NOTHING", (name,))
                version = db.one("SELECT next_version FROM adapter_names WHERE name = ?" + db.for_update, (name,))["next_version"]
                final = self.store / name / str(version)
                if final.exists():  # left by a crash between rename and commit
                    shutil.rmtree(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(final)
                try:
                    if self.remote:  # published before the row that makes it visible
                        fs = self._fs()
                        for f in (CONFIG, WEIGHTS, LABELS_FILE):
                            if (final / f).is_file():
                                fs.put_file(str(final / f), f"{self.remote}/{name}/{version}/{f}")
                    db.execute(
                        "INSERT INTO adapters (name, version, peft_type, rank, target_modules, num_virtual_tokens, size_bytes, "
                        "base_fingerprint, created_at, source_uri, labels) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (name, version, info["peft_type"], info["rank"], json.dumps(info["target_modules"]),
                         info["num_virtual_tokens"], info["size_bytes"], base_fingerprint, time.time(),
                         source_uri, json.dumps(labels)),
                    )
                    db.execute("UPDATE adapter_names SET next_version = ? WHERE name = ?", (version + 1, name))
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(f"{name}@{version}")

    def delete(self, adapter_id: str) -> list[AdapterRecord]:
        """"name@v" deletes that version, "name" every version. Returns what was deleted."""
        name, version = parse_adapter_id(adapter_id)
        with self.db.tx() as db:
            if version is None:
                rows = db.all("SELECT * FROM adapters WHERE name = ?", (name,))
                db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            else:
                rows = db.all("SELECT * FROM adapters WHERE name = ? AND version = ?", (name, version))
                db.execute("DELETE FROM adapters WHERE name = ? AND version = ?", (name, version))
        if not rows:
            raise NotFound(f"unknown adapter {adapter_id!r}", field="adapter_id")
        records = [self._record(r) for r in rows]
        for r in records:
            shutil.rmtree(r.path, ignore_errors=True)
            with contextlib.suppress(OSError):  # the name's folder, once its last version is gone
                r.path.parent.rmdir()
            if self.remote:
                self._fs().rm(f"{self.remote}/{r.name}/{r.version}", recursive=True)
        return records

    # -- reads -----------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterRecord:
        """Resolve "name" (latest version) or "name@v"."""
        name, version = parse_adapter_id(adapter_id)
        if version is None:
            row = self.db.one("SELECT * FROM adapters WHERE name = ? ORDER BY version DESC LIMIT 1", (name,))
        else:
            row = self.db.one("SELECT * FROM adapters WHERE name = ? AND version = ?", (name, version))
        if row is None:
            raise NotFound(f"unknown adapter {adapter_id!r}", field="adapter_id")
        return self._record(row)

    def path(self, adapter_id: str) -> Path:
        """The adapter's local folder; from a remote store, fetched into the node cache once."""
        record = self.get(adapter_id)
        if self.remote and not (record.path / WEIGHTS).is_file():
            tmp = self.store / ".staging" / uuid.uuid4().hex
            try:
                fetch_adapter_files(f"{self.remote}/{record.name}/{record.version}", tmp)
                record.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    tmp.rename(record.path)
                except OSError:  # another thread or process of this node got there first
                    pass
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return record.path

    def list(self, page_size: int = 100, page_token: str = "", name: str = "") -> tuple[list[AdapterRecord], str]:
        """A page ordered by (name, version) and the token of the next page ("" at the end)."""
        page_size = 100 if page_size <= 0 else min(page_size, 1000)
        after = ("", 0)
        if page_token:
            try:
                n, v = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after = (str(n), int(v))
            except Exception:  # noqa: BLE001 - any garbage token is the caller's error
                raise InvalidArgument("not a token this server issued", field="page_token") from None
        sql, args = "SELECT * FROM adapters WHERE (name, version) > (?, ?)", [*after]
        if name:
            check_adapter_name(name)
            sql += " AND name = ?"
            args.append(name)
        rows = self.db.all(sql + " ORDER BY name, version LIMIT ?", (*args, page_size + 1))
        records = [self._record(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = records[-1]
            token = base64.urlsafe_b64encode(json.dumps([last.name, last.version]).encode()).decode()
        return records, token

    def ids(self) -> list[str]:
        rows = self.db.all("SELECT name, version FROM adapters ORDER BY name, version")
        return [f"{r['name']}@{r['version']}" for r in rows]

    def _record(self, row: dict) -> AdapterRecord:
        path = (self.store / row["name"] / str(row["version"])).resolve()
        if self.store not in path.parents:  # names are checked on the way in; this guards a hand-edited database
            raise InvalidArgument(f"adapter {row['name']!r} points outside the store", field="adapter_id")
        return AdapterRecord(
            name=row["name"], version=row["version"], peft_type=row["peft_type"], rank=row["rank"],
            target_modules=json.loads(row["target_modules"]), num_virtual_tokens=row["num_virtual_tokens"],
            size_bytes=row["size_bytes"], base_fingerprint=row["base_fingerprint"], created_at=row["created_at"],
            source_uri=row["source_uri"], path=path, labels=json.loads(row["labels"]),
        )


FETCHED = (CONFIG, WEIGHTS, LABELS_FILE)
"""The files registration reads from a source folder (the last only when present)."""


def fetch_adapter_files(source_uri: str, dest: Path) -> None:
    """Copy a PEFT adapter folder from a local path or any fsspec URL into `dest`.
    Only the two files PEFT's format needs are copied, and a small config.json when one
    is there (a classifier's label names); pickles are refused here, before a byte of
    them is read."""
    import fsspec

    if not source_uri:
        raise InvalidArgument("give a local folder or URL holding the adapter", field="source_uri")
    try:
        fs, root = fsspec.core.url_to_fs(source_uri)
    except (ImportError, ValueError) as e:
        raise InvalidArgument(f"cannot open {source_uri!r}: {e}", field="source_uri") from None
    root = root.rstrip("/")
    try:
        if not fs.isdir(root):
            raise NotFound(f"no adapter folder at {source_uri!r}", field="source_uri")
        names = {Path(p).name for p in fs.ls(root, detail=False)}
    except HotswapError:
        raise
    except Exception as e:  # noqa: BLE001 - remote filesystems raise their own errors (auth, network)
        raise InvalidArgument(f"cannot read {source_uri!r}: {type(e).__name__}: {e}", field="source_uri") from None
    if CONFIG not in names:
        raise InvalidArgument(f"{source_uri!r} has no {CONFIG}: not a PEFT adapter folder", field="source_uri")
    if WEIGHTS not in names:
        pickles = sorted(n for n in names if Path(n).suffix in PICKLES)
        if pickles:
            raise InvalidArgument(
                f"refusing pickle checkpoint {pickles[0]!r} in {source_uri!r}: loading pickles can run arbitrary code; "
                f"re-save the adapter with safetensors (PEFT's save_pretrained does by default)",
                field="source_uri",
            )
        raise InvalidArgument(f"{source_uri!r} has no {WEIGHTS}", field="source_uri")
    for n in (CONFIG, WEIGHTS):  # a FIFO would block the copy forever; a dangling link has nothing to copy
        try:
            kind = fs.info(f"{root}/{n}").get("type")
        except Exception:  # noqa: BLE001 - each filesystem raises its own error for a missing target
            kind = None
        if kind != "file":
            raise InvalidArgument(f"{n} in {shown(source_uri)} is not a regular file", field="source_uri")
    optional = []
    if LABELS_FILE in names:
        try:
            info = fs.info(f"{root}/{LABELS_FILE}")
        except Exception:  # noqa: BLE001 - as above
            info = {}
        if info.get("type") != "file" or (info.get("size") or 0) > MAX_LABELS_FILE_BYTES:
            raise InvalidArgument(f"{LABELS_FILE} in {shown(source_uri)} must be a regular file of at most {MAX_LABELS_FILE_BYTES} bytes",
                                  field="source_uri")
        optional.append(LABELS_FILE)
    dest.mkdir(parents=True)
    for n in (CONFIG, WEIGHTS, *optional):
        try:
            fs.get(f"{root}/{n}", str(dest / n))
        except Exception as e:  # noqa: BLE001 - remote filesystems raise their own errors (auth, network)
            raise InvalidArgument(f"cannot copy {n} from {shown(source_uri)}: {type(e).__name__}", field="source_uri") from None
