"""Convert a GGUF file once into a cached safetensors checkpoint.

transformers reads GGUF (dequantising every tensor, ~17 s for SmolLM2) but
cannot quantize a GGUF-loaded model with bitsandbytes, and
`model.dequantize()` is not implemented for GGUF. So: load once, copy the
weights into a fresh model built from the config, save_pretrained (bf16) with
the tokenizer; later starts load the cache in under a second."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ModelLoadError

_DONE = "hotswap-converted"


def gguf_identity(path: Path) -> str:
    """Content-based key (size + first and last MiB): a replaced file gets a new cache entry."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _chat_template_from_gguf(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(path: Path, cache_dir: Path) -> Path:
    """The cached checkpoint folder for `path`, converting it first if needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) / f"{path.stem}-{gguf_identity(path)}"
    if (out / _DONE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=out.parent))
    try:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
            raise ModelLoadError(f"could not read GGUF {str(path)!r}: {type(e).__name__}: {e}", field="source") from e
        config = loaded.config
        # The GGUF loader records a "gguf" quantization_config; the saved checkpoint is plain
        # bf16, and bitsandbytes refuses to load a model that claims another quantization.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp)
        if not tokenizer.chat_template:
            tokenizer.chat_template = _chat_template_from_gguf(path)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(str(path))
        try:
            os.rename(tmp, out)  # atomic: a crash mid-conversion never leaves a half cache
        except OSError:
            if not (out / _DONE).exists():  # someone else finished first: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
