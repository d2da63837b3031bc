"""Load the base model and tokenizer as the engine and the tuner use them."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..cpu_threads import in_passing_thread
from ..config import ModelConfig
from ..errors import ModelLoadError
from ..hardware import resolve_device, resolve_dtype
from .sources import resolve_checkpoint


@dataclass
class LoadedModel:
    model: PreTrainedModel
    """Eval mode, on `device`, transformers' default attention for the architecture (sdpa where it has
    one, else eager: Gemma 2, BLOOM, ...); the engine swaps in its paged attention where it can."""
    tokenizer: PreTrainedTokenizerBase
    """Carries the model's chat template; pad token set (to EOS when the model has none)."""
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    """Activation/compute dtype (for nf4/int8 the compute dtype)."""
    checkpoint_dir: Path
    """The HF folder actually loaded (for a GGUF source, its converted cache)."""
    fingerprint: str
    """Stable id of the base weights + config; adapters record it."""


def quantization_config(cfg: ModelConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    if cfg.quantization == "int8":
        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16; once is plenty.
        warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def fingerprint(checkpoint: Path) -> str:
    """sha256 over config.json and each weight file's name, size and first MiB:
    cheap at start-up, and changes whenever the weights do."""
    h = hashlib.sha256()
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(checkpoint.glob("*.safetensors")) + sorted(checkpoint.glob("*.bin")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def load_base_model(cfg: ModelConfig, model_class=AutoModelForCausalLM, **model_kwargs) -> LoadedModel:
    """`model_class` / `model_kwargs`: the tuner loads the same base with a classification head
    (AutoModelForSequenceClassification, num_labels=...), same weights, dtype and quantization.

    Loads on a thread of its own that ends with the load, so the caller's thread keeps no
    OpenMP pool that would slow the engine's (cpu_threads.py)."""
    return in_passing_thread(_load, cfg, model_class, **model_kwargs)


def _load(cfg: ModelConfig, model_class, **model_kwargs) -> LoadedModel:
    checkpoint = resolve_checkpoint(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quant = quantization_config(cfg, dtype)
    # No attn_implementation: asking for "sdpa" fails on architectures transformers has no sdpa path for.
    kwargs = {"dtype": dtype, "trust_remote_code": False, **model_kwargs}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    try:
        model = model_class.from_pretrained(checkpoint, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"could not load model from {str(checkpoint)!r}: {e}", field="source") from e
    if quant is None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, cfg, device, dtype, checkpoint, fingerprint(checkpoint))
