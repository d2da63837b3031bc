"""Shared fixtures: tiny random models saved as real HF checkpoints (with a real
tokenizer trained here, offline) so tests go through the same loader users do."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Where no GPU is, the Triton kernels (engine/kernels/triton_ops.py) run in Triton's interpreter,
    # which is read when that module is imported: tests/test_triton_kernels.py checks them that way.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. Who are you? I am a model.",
    "Größe, naïve café — déjà vu. 日本語のテキスト。 Emoji 🙂 too!",
    "user assistant system: answer the question briefly and clearly.",
] * 10
VOCAB = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHS = {
    "llama": lambda: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


def save_tiny_checkpoint(arch: str | PretrainedConfig, out: Path, seed: int = 0) -> Path:
    """A random tiny model (an ARCHS name, or a config) + tokenizer saved as an HF folder (fp32)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = ARCHS[arch]() if isinstance(arch, str) else arch
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_checkpoint(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """The built-in default model (SmolLM2-135M-Instruct GGUF) converted once for the session:
    (cache dir, seconds the first conversion took, fingerprint)."""
    import time

    from hotswap.server.config import ModelConfig
    from hotswap.server.model.loader import load_base_model

    cache = tmp_path_factory.mktemp("hotswap-cache")
    start = time.monotonic()
    loaded = load_base_model(ModelConfig(source="default", dtype="float32", device="cpu", cache_dir=cache))
    return cache, time.monotonic() - start, loaded.fingerprint
