"""How a base model attends, found at load by running it once on a few tokens — not by a
list of architecture names, so any model transformers builds is judged by what it does.

- **paged**: every decoder layer calls the attention function registered with
  transformers' AttentionInterface (engine/attention.py), with a `layer_idx` and keys and
  values of one shape, and a short sequence run through the paged attention gives the
  logits the model's own attention gives (so a mask the paged kernel does not know —
  bidirectional, a bias carried in attention_mask — sends the model down the next path).
  The packed forward over the paged cache serves it.
- **own**: the model computes attention itself (BLOOM's ALiBi, Falcon, GPT-J, MPT ...)
  but keeps exactly one key/value pair per layer in a transformers `DynamicCache`.
  engine/own_attention.py serves it row by row, its past gathered from the same paged cache.
- anything else (layers that keep other state — Mamba, linear attention — or keys and
  values of different widths) is refused at load with the architecture's name: the engine
  would have nowhere to keep that state, and a guess would be a wrong answer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ..errors import ModelLoadError
from .attention import ATTENTION_NAME, BATCH_KWARG, AttentionBatch
from .kv_cache import PagedKVCache

PROBE_TOKENS = 3
PAGED_LAYER_TYPES = {"full_attention", "sliding_attention", "dense", "sparse"}
"""config.layer_types entries the paged kernel implements (the last two name MLPs). Any other —
chunked_attention (Llama 4), linear_attention, hybrid ... — is a mask or a state it does not know."""
VERIFY_TOKENS = 8
VERIFY_TOLERANCE = {torch.float32: 1e-4}
"""Largest |paged - own| / max |own| of the verification logits; 2e-2 for lower precisions."""


@dataclass(frozen=True)
class AttentionLayout:
    paged: bool
    """True: attention through the registered paged function; False: the model's own (own_attention.py)."""
    kv_heads: int
    head_dim: int


class _Recorder:
    """Stands in for the AttentionBatch during the probe: records each layer's call, returns zeros."""

    def __init__(self) -> None:
        self.shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # layer -> (key shape, value shape)
        self.windows: dict[int, int] = {}  # layer -> the sliding window the paged attention will apply (0: none)
        self.problem: str | None = None

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            self.problem = f"{type(module).__name__} has no layer_idx"
        elif layer in self.shapes:
            self.problem = f"layer {layer} attends twice in one forward"
        else:
            self.shapes[layer] = (tuple(key.shape), tuple(value.shape))
            self.windows[layer] = int((sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)) or 0)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def _geometry(shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]], num_layers: int) -> tuple[int, int] | str:
    """(kv_heads, head_dim) when every layer 0..num_layers-1 keeps keys and values of one shape
    [1, kv_heads, PROBE_TOKENS, head_dim]; otherwise what is wrong."""
    if sorted(shapes) != list(range(num_layers)):
        return f"attention seen in layers {sorted(shapes)} of {num_layers}"
    kinds = {k for k, v in shapes.values()} | {v for k, v in shapes.values()}
    if len(kinds) != 1:
        return f"keys/values of several shapes {sorted(kinds)}"
    shape = kinds.pop()
    if len(shape) != 4 or shape[0] != 1 or shape[2] != PROBE_TOKENS:
        return f"keys of shape {shape}, not [batch, kv_heads, tokens, head_dim]"
    return shape[1], shape[3]


def _probe_paged(model: PreTrainedModel, ids: torch.Tensor, num_layers: int) -> tuple[int, int] | str:
    layer_types = list(getattr(model.config.get_text_config(), "layer_types", None) or [])
    unknown = set(layer_types) - PAGED_LAYER_TYPES
    if unknown:
        return f"layer types {sorted(unknown)} have masks or state the paged kernel does not implement"
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError) as e:
        return f"cannot select it: {e}"
    if model.config._attn_implementation != ATTENTION_NAME:
        return "the model does not use transformers' AttentionInterface"
    recorder = _Recorder()
    try:
        model.base_model(input_ids=ids, use_cache=False, **{BATCH_KWARG: recorder})
    except Exception as e:  # noqa: BLE001 - any failure means "not this path"; the reason is reported
        return f"probe forward failed: {type(e).__name__}: {e}"
    unwindowed = [i for i, t in enumerate(layer_types) if t == "sliding_attention" and not recorder.windows.get(i)]
    if unwindowed:
        return f"sliding layers {unwindowed} pass the attention function no sliding_window"
    return recorder.problem or _geometry(recorder.shapes, num_layers)


def _verify_paged(model: PreTrainedModel, geometry: tuple[int, int], num_layers: int, original: str) -> str | None:
    """Logits of VERIFY_TOKENS tokens through the paged attention (torch reference, a throwaway cache)
    against the model's own attention; None when they agree. Leaves the paged attention selected."""
    text = model.config.get_text_config()
    n, dev = VERIFY_TOKENS, model.device
    ids = torch.randint(0, text.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(dev)
    dtype = model.get_input_embeddings().weight.dtype  # the compute dtype, also under a quantized body
    cache = PagedKVCache(num_layers, 1, n, *geometry, dev, dtype)  # one block of n positions: positions are slots
    positions = torch.arange(n, device=dev)
    batch = AttentionBatch(cache, positions, torch.zeros(1, 1, dtype=torch.int32, device=dev), torch.zeros(n, dtype=torch.int32, device=dev),
                           positions.to(torch.int32), [], n, "torch")
    try:
        paged = model(input_ids=ids, position_ids=positions[None], use_cache=False, **{BATCH_KWARG: batch}).logits.float()
        model.set_attn_implementation(original)
        own = model(input_ids=ids, use_cache=False).logits.float()
    except Exception as e:  # noqa: BLE001
        return f"verification forward failed: {type(e).__name__}: {e}"
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
    error = float((paged - own).abs().max() / own.abs().max().clamp(min=1e-6))
    if error > VERIFY_TOLERANCE.get(dtype, 2e-2):
        return f"its logits differ from the model's own attention by {error:.2g} (relative)"
    return None


def _probe_own(model: PreTrainedModel, ids: torch.Tensor, num_layers: int) -> tuple[int, int] | str:
    cache = DynamicCache()
    try:
        model.base_model(input_ids=ids, past_key_values=cache, use_cache=True)
    except Exception as e:  # noqa: BLE001
        return f"probe forward failed: {type(e).__name__}: {e}"
    if type(cache) is not DynamicCache or len(cache.layers) != num_layers:
        return f"its cache holds {len(cache.layers)} layers for {num_layers} decoder layers"
    shapes = {}
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or getattr(layer, "keys", None) is None:
            return f"layer {i} keeps {type(layer).__name__} state, not keys and values"
        shapes[i] = (tuple(layer.keys.shape), tuple(layer.values.shape))
    return _geometry(shapes, num_layers)


OWN_ATTENTION = "_hotswap_own_attention"
"""Attribute on a probed model: its attention implementation before any engine selected the paged one."""


@torch.inference_mode()
def probe_attention(model: PreTrainedModel) -> AttentionLayout:
    """Leaves the model on the paged attention when it can take it, else on its own attention;
    raises ModelLoadError naming the architecture when neither path can serve it exactly."""
    num_layers = model.config.get_text_config().num_hidden_layers
    ids = torch.arange(1, PROBE_TOKENS + 1, device=model.device)[None]  # [1, PROBE_TOKENS]
    # The model's own attention, also when an earlier engine on this model left ours selected.
    original = getattr(model, OWN_ATTENTION, None) or model.config._attn_implementation
    setattr(model, OWN_ATTENTION, original)
    paged = _probe_paged(model, ids, num_layers)
    if not isinstance(paged, str):
        mismatch = _verify_paged(model, paged, num_layers, original)
        if mismatch is None:
            return AttentionLayout(True, *paged)
        paged = mismatch
    if model.config._attn_implementation != original:
        model.set_attn_implementation(original)
    own = _probe_own(model, ids, num_layers)
    if not isinstance(own, str):
        return AttentionLayout(False, *own)
    arch = f"{model.config.model_type} ({type(model).__name__})"
    raise ModelLoadError(f"architecture {arch} cannot be served: paged attention: {paged}; "
                         f"the model's own attention over a key/value cache: {own}", field="source")
