"""The files a training job owns, and their lifetime.

Inline examples arrive in the TrainAdapter message; keeping them in the job's
row made every read of the job carry (and parse) the whole dataset. They are
written once, at submit, as a JSONL file beside the uploads (where every worker
can read them), and the job's spec holds only its path. When the job ends, that
file and the job's working folder (checkpoints, the saved adapter, which the
registry has copied) are removed: nothing a finished job leaves grows without
bound.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

INLINE_PREFIX = "inline-"


def write_inline(uploads_dir: Path, examples: list[dict], name: str) -> dict:
    """The dataset source that replaces inline `examples` in a job's spec."""
    uploads_dir.mkdir(parents=True, exist_ok=True)
    path = uploads_dir / f"{INLINE_PREFIX}{uuid.uuid4().hex[:12]}-{name}.jsonl"
    tmp = path.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a worker never sees half a file
    return {"uri": str(path), "owned": True, "examples": len(examples)}


def owned_files(spec: dict) -> list[Path]:
    """Dataset files the job's submission wrote (not the caller's uploads)."""
    return [Path(src["uri"]) for src in (spec.get("train"), spec.get("validation")) if isinstance(src, dict) and src.get("owned")]


def release(spec: dict, job_dir: Path | None, keep_checkpoints: bool = False) -> None:
    """A job reached a final state: drop what only it needed."""
    for path in owned_files(spec):
        path.unlink(missing_ok=True)
    if job_dir is not None and not keep_checkpoints:
        shutil.rmtree(job_dir, ignore_errors=True)


def uris_in_use(specs: list[dict]) -> set[str]:
    """Dataset URIs the given (unfinished) jobs will read."""
    return {src["uri"] for spec in specs for src in (spec.get("train"), spec.get("validation")) if isinstance(src, dict) and src.get("uri")}
