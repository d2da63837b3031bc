"""Tiny random configs of the decoder-only architectures the engine is tested on, one
builder per architecture, each chosen to exercise what makes that architecture different.
Sliding windows are WINDOW tokens so test prompts run past them."""
from __future__ import annotations

import transformers as tf

from conftest import VOCAB

WINDOW = 6
_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=256)

ARCHS = {
    # Qwen3 with use_sliding_window: layer 0 global, layer 1 sliding (max_window_layers).
    "qwen3": lambda: tf.Qwen3Config(**_DIMS, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": lambda: tf.MistralConfig(**_DIMS, sliding_window=WINDOW),
    # Gemma 2: alternating sliding/global layers, attention and final logit soft-capping (small caps so tanh
    # bends these tiny logits), query_pre_attn_scalar != head_dim so `scaling` matters; no sdpa in transformers.
    "gemma2": lambda: tf.Gemma2Config(**_DIMS, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                      attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
    "gemma3": lambda: tf.Gemma3TextConfig(**_DIMS, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                          layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: tf.Phi3Config(**_DIMS),  # fused qkv_proj and gate_up_proj
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB),  # Conv1D linears
    "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),  # ALiBi, its own attention
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=VOCAB, max_position_embeddings=256),
    # Falcon-7B style: multi-query (one kv head), rotary, parallel attention; its own attention.
    "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                                      alibi=False, vocab_size=VOCAB, max_position_embeddings=256),
    "falcon_alibi": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                                            new_decoder_architecture=True, alibi=True, vocab_size=VOCAB),
    # GPT-OSS: attention sinks (s_aux), alternating sliding layers, experts as fused parameters.
    "gpt_oss": lambda: tf.GptOssConfig(**{**_DIMS, "intermediate_size": 32}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    # Llama 4: chunked attention (a mask the paged kernel does not implement: served by the model's own
    # attention), a no-RoPE global layer, MoE.
    "llama4": lambda: tf.Llama4TextConfig(**{**_DIMS, "intermediate_size": 32}, intermediate_size_mlp=64, head_dim=16,
                                          num_local_experts=2, num_experts_per_tok=1, attention_chunk_size=4,
                                          layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0]),
    # MiniCPM3: multi-head latent attention (keys nope 8 + rope 8 as wide as values: paged) with fewer kv heads
    # than heads, which transformers' eager attention cannot run (the load-time logit check must use the model's
    # own); embeddings, residuals and logits scaled (scale_emb, scale_depth, dim_model_base).
    "minicpm3": lambda: tf.MiniCPM3Config(**_DIMS, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=16,
                                          q_lora_rank=32, scale_emb=2.0, scale_depth=1.4, dim_model_base=32),
    # Doge: a dynamic mask from every cached value, dt_proj run over the row's whole past (LoRA there covers the
    # past too); its sliding window is in the mask, so it is served by its own attention.
    "doge": lambda: tf.DogeConfig(**_DIMS, sliding_window=WINDOW),
    "olmoe": lambda: tf.OlmoeConfig(**_DIMS, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_DIMS, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                           num_experts=4, num_experts_per_tok=2),
}
