// Plain-C++ interface between the torch-facing layer (ops.cpp: schemas, shape
// and dtype checks) and the kernels. The kernel files include no torch/ATen
// tensor headers, which keeps the one-time JIT build short (torch/library.h
// alone costs ~6 s per translation unit).
#pragma once

#include <cstdint>

namespace hotswap {

enum class Dtype { kFloat, kBFloat16, kHalf };

struct AttentionParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* token_rows;
  const int32_t* token_positions;
  int64_t N, H, KVH, D;            // query tokens, query heads, kv heads, head_dim
  int64_t num_blocks, block_size, rows, max_blocks;
  int64_t q_s0, q_s1, o_s0, o_s1;  // token / head strides of query and out (head_dim contiguous)
  int64_t k_s0, k_s1, k_s2;        // block / slot / head strides of key_cache
  int64_t v_s0, v_s1, v_s2;
  int64_t bt_s0;                   // row stride of block_tables
  double scale;
  int64_t sliding_window;
  double softcap;      // > 0: logits become softcap * tanh(logits / softcap) (Gemma 2)
  const float* sinks;  // [H] or null: one extra logit per query head in the softmax's denominator (GPT-OSS)
};

struct LoraParams {
  void* out;          // shrink: out [N, R] float32; expand: y [N, OUT]
  const void* in;     // shrink: x [N, IN];         expand: t [N, R] float32
  const void* w;      // shrink: a [S, R, IN];      expand: b [S, R, OUT]
  const int32_t* token_slots;
  const int32_t* ranks;
  int64_t N, S, R, features;  // features: IN for shrink, OUT for expand
  int64_t out_s0, in_s0, w_s0, w_s1;
};

struct NormParams {
  void* out;        // [N, D]
  const void* x;    // [N, D]
  const void* weight;  // [D]
  int64_t N, D, out_s0, x_s0;
  double eps;
  bool weight_first;  // multiply by the weight before rounding (else after, as Llama's RMSNorm)
};

struct RotaryParams {
  void* out;         // [B, H, T, D], any batch / head / token strides
  const void* x;     // [B, H, T, D]
  const void* cos;   // [B, T, D] (batch stride 0 when shared)
  const void* sin;   // [B, T, D]
  int64_t B, H, T, D;
  int64_t x_s0, x_s1, x_s2, o_s0, o_s1, o_s2;
  int64_t c_s0, c_s1, s_s0, s_s1;
};

struct RowMaxParams {
  float* values;     // [B]
  int64_t* indices;  // [B]
  const void* x;     // [B, V]
  int64_t B, V, x_s0;
};

void paged_attention_kernel(const AttentionParams& p, Dtype dtype);
void lora_shrink_kernel(const LoraParams& p, Dtype dtype);
void lora_expand_kernel(const LoraParams& p, Dtype dtype);
void rms_norm_kernel(const NormParams& p, Dtype dtype);
void row_max_kernel(const RowMaxParams& p, Dtype dtype);
void rotary_kernel(const RotaryParams& p, Dtype dtype);

}  // namespace hotswap
