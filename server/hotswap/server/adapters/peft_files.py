"""Read an adapter folder in PEFT's own format: adapter_config.json + adapter_model.safetensors.

Pickle checkpoints (adapter_model.bin and friends) are refused: loading one
runs arbitrary code. Nothing here ever trusts remote code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import InvalidArgument, NotFound

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def read_adapter_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors) or a clear error naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"adapter folder {str(path)!r} does not exist", field="path")
    if not (path / CONFIG).is_file():
        raise InvalidArgument(f"{str(path)!r} has no {CONFIG}: not a PEFT adapter folder", field="path")
    if not (path / WEIGHTS).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise InvalidArgument(
                f"refusing pickle checkpoint {pickles[0]!r} in {str(path)!r}: loading pickles can run arbitrary code; "
                f"re-save the adapter with safetensors (PEFT's save_pretrained does by default)",
                field="path",
            )
        raise InvalidArgument(f"{str(path)!r} has no {WEIGHTS}", field="path")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{CONFIG} in {str(path)!r} is not valid JSON: {e}", field="path") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{CONFIG} in {str(path)!r} is not a JSON object", field="path")
    try:
        tensors = load_file(path / WEIGHTS)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InvalidArgument(f"{WEIGHTS} in {str(path)!r} is unreadable: {e}", field="path") from None
    return config, tensors


_CHUNK = bytearray(1 << 20)


def warm_page_cache(path: Path) -> None:
    """Read an adapter folder's files once, discarding the bytes, so a slow disk (or a file not in the
    page cache) is waited for here, outside the CPU turn the load itself takes (cpu_threads.Turns);
    the read syscalls run without the GIL. Missing files are left for read_adapter_dir to report."""
    buf = memoryview(_CHUNK)
    for name in (CONFIG, WEIGHTS):
        try:
            with open(Path(path) / name, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        except OSError:
            continue
