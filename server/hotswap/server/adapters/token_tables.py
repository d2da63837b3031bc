"""The parts of a LoRA / trainable-tokens checkpoint that touch the input embedding or the
output head → `TokenTables`, applied per row by the engine.

PEFT saves them under the embedding's / head's module path:
  <path>.weight                               modules_to_save: the adapter's full copy
  <embed>.base_layer.weight                   LoRA on the embedding also saves the (frozen) table
  <embed>.lora_embedding_A / _B               LoRA on the embedding: + scale · B A[:, token]
  <path>[.token_adapter].trainable_tokens_delta   trainable tokens: rows replaced (index_copy)
On a base whose head is tied to the embedding, PEFT ties trainable tokens to the head too
(peft/utils/other.py, `_set_trainable` with `tied_adapter`)."""
from __future__ import annotations

import math
import re

import torch

from ..errors import AdapterIncompatible
from .validate import BaseShape
from .weights import TokenTables

_PREFIX = "base_model.model."


def split(tensors: dict[str, torch.Tensor], shape: BaseShape) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(tensors of other modules, {"embed" / "head": {suffix after the module path: tensor}})."""
    rest: dict[str, torch.Tensor] = {}
    tables: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for which, path in (("embed", shape.embed_path), ("head", shape.head_path)):
            if path and key.startswith(_PREFIX + path + "."):
                tables.setdefault(which, {})[key[len(_PREFIX + path) + 1:]] = t
                break
        else:
            rest[key] = t
    return rest, tables


def _indices(config: dict, module: str, count: int, shape: BaseShape) -> torch.Tensor:
    """Token ids of a trainable-tokens delta: LoRA's trainable_token_indices (a list for the
    embedding, or {module name: list}) or TRAINABLE_TOKENS' token_indices."""
    field = "token_indices" if config.get("peft_type") == "TRAINABLE_TOKENS" else "trainable_token_indices"
    spec = config.get(field)
    if isinstance(spec, dict):
        spec = next((v for k, v in spec.items() if re.fullmatch(rf"(.*\.)?{re.escape(k)}", module)), None)
    if not (isinstance(spec, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)):
        raise AdapterIncompatible(f"the trainable tokens of {module!r} need a list of token ids, got {spec!r}", field=field)
    if len(spec) != count or len(set(spec)) != len(spec) or not all(0 <= i < shape.vocab_size for i in spec):
        raise AdapterIncompatible(f"{len(spec)} token ids for {count} saved rows of {module!r}, or ids repeated or outside the "
                                  f"vocabulary (size {shape.vocab_size})", field=field)
    return torch.tensor(spec, dtype=torch.long)


def token_tables(config: dict, parts: dict[str, dict[str, torch.Tensor]], shape: BaseShape,
                 base_embed: torch.Tensor | None) -> TokenTables | None:
    """`base_embed`: the base's embedding weight, to drop a saved base layer equal to it (None: keep it)."""
    if not parts:
        return None
    if config.get("ensure_weight_tying"):
        raise AdapterIncompatible("ensure_weight_tying is not supported", field="ensure_weight_tying")
    width = (shape.vocab_size, shape.hidden_size)
    out = TokenTables()
    embed, head = parts.get("embed", {}), parts.get("head", {})
    for which, tensors in (("embed", embed), ("head", head)):
        module = shape.embed_path if which == "embed" else shape.head_path
        for suffix, t in tensors.items():
            t = t.float()
            if suffix in ("weight", "base_layer.weight"):
                if tuple(t.shape) != width:
                    raise AdapterIncompatible(f"{module!r} copy has shape {tuple(t.shape)}, the base's is {width}", field="modules_to_save")
                if suffix == "base_layer.weight" and base_embed is not None and torch.equal(t, base_embed.detach().float().cpu()):
                    continue  # LoRA on the embedding saves the frozen table: the base's own
                if suffix == "base_layer.weight" and shape.tied:  # PEFT would load it into the weight the head shares
                    raise AdapterIncompatible(f"the adapter's saved {module!r} table differs from the base's, whose output head "
                                              "is tied to it", field="target_modules")
                if which == "head":
                    out.head = t
                else:
                    out.embed = t
            elif suffix in ("trainable_tokens_delta", "token_adapter.trainable_tokens_delta"):
                if t.dim() != 2 or t.shape[1] != shape.hidden_size:
                    raise AdapterIncompatible(f"trainable tokens of {module!r}: rows of shape {tuple(t.shape)}, hidden size is {shape.hidden_size}",
                                              field="trainable_token_indices")
                ids = _indices(config, module.rsplit(".", 1)[-1], t.shape[0], shape)
                order = torch.argsort(ids)  # the engine looks ids up by binary search
                if which == "head":
                    out.head_ids, out.head_rows = ids[order], t[order]
                else:
                    out.token_ids, out.token_rows = ids[order], t[order]
            elif which == "embed" and suffix in ("lora_embedding_A", "lora_embedding_B"):
                continue
            else:
                what = "LoRA on the output head" if which == "head" and suffix.startswith("lora_") else f"tensor {suffix!r}"
                raise AdapterIncompatible(f"{what} of {module!r} is not supported (embedding: modules_to_save, lora_embedding_A/B, "
                                          "trainable tokens; head: modules_to_save, trainable tokens)", field="target_modules")
    if "lora_embedding_A" in embed or "lora_embedding_B" in embed:
        _embedding_lora(out, config, embed, shape)
    if shape.tied and out.token_ids is not None and out.head_ids is None:
        out.head_ids, out.head_rows = out.token_ids, out.token_rows  # PEFT ties them to the head
    return out


def _embedding_lora(out: TokenTables, config: dict, embed: dict[str, torch.Tensor], shape: BaseShape) -> None:
    a, b = embed.get("lora_embedding_A"), embed.get("lora_embedding_B")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != shape.vocab_size \
            or b.shape[0] != shape.hidden_size:
        raise AdapterIncompatible(f"LoRA on the embedding needs lora_embedding_A [r, {shape.vocab_size}] and lora_embedding_B "
                                  f"[{shape.hidden_size}, r], got {None if a is None else tuple(a.shape)} and {None if b is None else tuple(b.shape)}",
                                  field="target_modules")
    if config.get("use_dora"):
        raise AdapterIncompatible("DoRA on the embedding is not supported", field="use_dora")
    from .lora import module_scale  # the same alpha / r rules as every linear

    out.embed_a, out.embed_b = a.float(), b.float()
    out.embed_scale = module_scale(config, shape.embed_path, a.shape[0])
    if not math.isfinite(out.embed_scale):
        raise AdapterIncompatible(f"embedding LoRA scale is {out.embed_scale}", field="lora_alpha")
