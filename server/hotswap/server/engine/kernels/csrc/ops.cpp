// The torch-facing layer: op schemas, shape/dtype/layout checks, and the
// CPU registrations that hand plain pointers and strides to the kernels.
// Mutated arguments are marked (a!) so the ops can sit in a torch.compile
// graph (their fake implementations are registered from native.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

#include <optional>
#include <vector>

#include "kernels.h"

namespace hotswap {
namespace {

Dtype dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kHalf;
    default: TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_index_vector(const at::Tensor& t, int64_t n, const char* op, const char* name,
                        at::ScalarType type = at::kInt) {
  TORCH_CHECK(t.scalar_type() == type && t.dim() == 1 && t.size(0) == n && (n <= 1 || t.stride(0) == 1), op, ": ", name,
              " must be a contiguous ", type, " [", n, "] tensor, got ", t.scalar_type(), " ", t.sizes());
}

void paged_attention_cpu(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& token_rows,
                         const at::Tensor& token_positions, double scale, int64_t sliding_window, double softcap,
                         const std::optional<at::Tensor>& sinks) {
  const char* op = "paged_attention";
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), op, ": out and query must both be [N, H, D], got ",
              out.sizes(), " and ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(), op,
              ": key_cache and value_cache must both be [num_blocks, block_size, kv_heads, head_dim], got ",
              key_cache.sizes(), " and ", value_cache.sizes());
  const auto st = query.scalar_type();
  TORCH_CHECK(out.scalar_type() == st && key_cache.scalar_type() == st && value_cache.scalar_type() == st, op,
              ": out, query and the caches must share one dtype");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              op, ": the head_dim axis must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  (block_tables.size(1) <= 1 || block_tables.stride(1) == 1),
              op, ": block_tables must be int32 [rows, max_blocks] with contiguous rows");
  TORCH_CHECK(sliding_window >= 0, op, ": sliding_window must be >= 0");
  TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0 (0: none)");
  const int64_t N = query.size(0), H = query.size(1), D = query.size(2), KVH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, op, ": query head_dim ", D, " != cache head_dim ", key_cache.size(3));
  TORCH_CHECK(KVH > 0 && H % KVH == 0, op, ": ", H, " query heads are not a multiple of ", KVH, " kv heads");
  check_index_vector(token_rows, N, op, "token_rows");
  check_index_vector(token_positions, N, op, "token_positions");
  if (sinks.has_value())
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->dim() == 1 && sinks->size(0) == H && sinks->is_contiguous(), op,
                ": sinks must be a contiguous float32 [", H, "] (one per query head), got ", sinks->scalar_type(), " ",
                sinks->sizes());
  const Dtype dtype = dtype_of(query, op);
  if (N == 0) return;
  AttentionParams p{};
  p.out = out.mutable_data_ptr();
  p.query = query.const_data_ptr();
  p.key_cache = key_cache.const_data_ptr();
  p.value_cache = value_cache.const_data_ptr();
  p.block_tables = block_tables.const_data_ptr<int32_t>();
  p.token_rows = token_rows.const_data_ptr<int32_t>();
  p.token_positions = token_positions.const_data_ptr<int32_t>();
  p.N = N, p.H = H, p.KVH = KVH, p.D = D;
  p.num_blocks = key_cache.size(0), p.block_size = key_cache.size(1);
  p.rows = block_tables.size(0), p.max_blocks = block_tables.size(1);
  p.q_s0 = query.stride(0), p.q_s1 = query.stride(1), p.o_s0 = out.stride(0), p.o_s1 = out.stride(1);
  p.k_s0 = key_cache.stride(0), p.k_s1 = key_cache.stride(1), p.k_s2 = key_cache.stride(2);
  p.v_s0 = value_cache.stride(0), p.v_s1 = value_cache.stride(1), p.v_s2 = value_cache.stride(2);
  p.bt_s0 = block_tables.stride(0);
  p.scale = scale;
  p.sliding_window = sliding_window;
  p.softcap = softcap;
  p.sinks = sinks.has_value() ? sinks->const_data_ptr<float>() : nullptr;
  paged_attention_kernel(p, dtype);
}

// A shrink's x, a_slots and index vectors checked, into params writing out (float32 rows of out_s0).
LoraParams shrink_params(void* out, int64_t out_s0, const at::Tensor& x, const at::Tensor& a_slots,
                         const at::Tensor& token_slots, const at::Tensor& ranks, const char* op) {
  TORCH_CHECK(x.dim() == 2 && a_slots.dim() == 3, op, ": expects x [N, IN], a_slots [S, R, IN]");
  const int64_t N = x.size(0), IN = x.size(1), S = a_slots.size(0), R = a_slots.size(1);
  TORCH_CHECK(a_slots.size(2) == IN, op, ": a_slots has IN = ", a_slots.size(2), ", x has ", IN);
  TORCH_CHECK(a_slots.scalar_type() == x.scalar_type(), op, ": a_slots and x must share one dtype");
  TORCH_CHECK(x.stride(1) == 1 && a_slots.stride(2) == 1, op, ": the last axis of x and a_slots must be contiguous");
  check_index_vector(token_slots, N, op, "token_slots");
  check_index_vector(ranks, S, op, "ranks");
  return LoraParams{out, x.const_data_ptr(), a_slots.const_data_ptr(), token_slots.const_data_ptr<int32_t>(),
                    ranks.const_data_ptr<int32_t>(), N, S, R, IN, out_s0, x.stride(0), a_slots.stride(0), a_slots.stride(1)};
}

// An expand's y, b_slots and index vectors checked, into params reading t (float32 [N, R] rows of t_s0).
LoraParams expand_params(const at::Tensor& y, const void* t, int64_t t_s0, const at::Tensor& b_slots,
                         const at::Tensor& token_slots, const at::Tensor& ranks, const char* op) {
  TORCH_CHECK(y.dim() == 2 && b_slots.dim() == 3, op, ": expects y [N, OUT], b_slots [S, R, OUT]");
  const int64_t N = y.size(0), OUT = y.size(1), S = b_slots.size(0), R = b_slots.size(1);
  TORCH_CHECK(b_slots.size(2) == OUT, op, ": b_slots has OUT = ", b_slots.size(2), ", y has ", OUT);
  TORCH_CHECK(b_slots.scalar_type() == y.scalar_type(), op, ": b_slots and y must share one dtype");
  TORCH_CHECK(y.stride(1) == 1 && b_slots.stride(2) == 1, op,
              ": the last axis of y and b_slots must be contiguous (y's rows may be strided)");
  check_index_vector(token_slots, N, op, "token_slots");
  check_index_vector(ranks, S, op, "ranks");
  return LoraParams{y.mutable_data_ptr(), t, b_slots.const_data_ptr(), token_slots.const_data_ptr<int32_t>(),
                    ranks.const_data_ptr<int32_t>(), N, S, R, OUT, y.stride(0), t_s0, b_slots.stride(0), b_slots.stride(1)};
}

void lora_shrink_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_slots,
                     const at::Tensor& token_slots, const at::Tensor& ranks) {
  const char* op = "lora_shrink";
  const LoraParams p = shrink_params(out.mutable_data_ptr(), out.dim() == 2 ? out.stride(0) : 0, x, a_slots, token_slots, ranks, op);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == p.N && out.size(1) == p.R, op, ": out must be [", p.N, ", ", p.R, "], got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.stride(1) == 1, op, ": out must be float32 with a contiguous last axis");
  lora_shrink_kernel(p, dtype_of(x, op));
}

void lora_expand_cpu(const at::Tensor& y, const at::Tensor& t, const at::Tensor& b_slots,
                     const at::Tensor& token_slots, const at::Tensor& ranks) {
  const char* op = "lora_expand";
  const LoraParams p = expand_params(y, t.const_data_ptr(), t.dim() == 2 ? t.stride(0) : 0, b_slots, token_slots, ranks, op);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == p.N && t.size(1) == p.R, op, ": t must be [", p.N, ", ", p.R, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.stride(1) == 1, op, ": t must be float32 with a contiguous last axis");
  lora_expand_kernel(p, dtype_of(y, op));
}

// Shrink, the rows' LoRA scales, then expand, in one call: the per-linear LoRA of an engine step without a
// second dispatch or a Python-side t (~5 us of each linear's ~20 us at decode). The same kernels as the two
// ops, so the same results, bit for bit. Both halves are checked before either runs.
void lora_apply_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a_slots, const at::Tensor& b_slots,
                    const at::Tensor& token_slots, const at::Tensor& ranks, const std::optional<at::Tensor>& token_scales) {
  const char* op = "lora_apply";
  LoraParams shrink = shrink_params(nullptr, 0, x, a_slots, token_slots, ranks, op);  // t comes below
  const int64_t N = shrink.N, R = shrink.R;
  TORCH_CHECK(y.dim() == 2 && y.size(0) == N, op, ": y must be [", N, ", OUT] (x's rows), got ", y.sizes());
  TORCH_CHECK(b_slots.dim() == 3 && b_slots.size(0) == shrink.S && b_slots.size(1) == R && b_slots.size(2) == y.size(1), op,
              ": b_slots must be [", shrink.S, ", ", R, ", ", y.size(1), "] (a_slots' slots and ranks, y's outputs), got ",
              b_slots.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": y and x must share one dtype");
  if (token_scales.has_value())
    TORCH_CHECK(token_scales->scalar_type() == at::kFloat && token_scales->numel() == N && token_scales->is_contiguous(), op,
                ": token_scales must be a contiguous float32 tensor of ", N, " elements (one per token), got ",
                token_scales->scalar_type(), " ", token_scales->sizes());
  // t [N, R]: the calling thread's buffer, kept between calls (at most the largest step's tokens x rank).
  thread_local std::vector<float> t;
  t.resize(static_cast<size_t>(N * R));
  shrink.out = t.data(), shrink.out_s0 = R;
  const LoraParams expand = expand_params(y, t.data(), R, b_slots, token_slots, ranks, op);
  const Dtype dtype = dtype_of(y, op);
  if (N == 0) return;
  lora_shrink_kernel(shrink, dtype);
  if (token_scales.has_value()) {
    const float* scales = token_scales->const_data_ptr<float>();
    for (int64_t i = 0; i < N; ++i)
      if (shrink.token_slots[i] >= 0)
        for (int64_t r = 0; r < R; ++r) t[i * R + r] *= scales[i];
  }
  lora_expand_kernel(expand, dtype);
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() && t.stride(1) == 1,
              op, ": ", name, " must be ", like.scalar_type(), " ", like.sizes(), " with a contiguous last axis, got ",
              t.scalar_type(), " ", t.sizes());
}

void rms_norm_cpu(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps, bool weight_first) {
  const char* op = "rms_norm";
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [N, D] with a contiguous last axis, got ", x.sizes());
  check_rows(out, x, op, "out");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type() &&
                  weight.stride(0) == 1,
              op, ": weight must be a contiguous ", x.scalar_type(), " [", x.size(1), "], got ", weight.scalar_type(), " ",
              weight.sizes());
  const Dtype dtype = dtype_of(x, op);
  if (x.size(0) == 0) return;
  NormParams p{out.mutable_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(), x.size(0), x.size(1),
               out.stride(0), x.stride(0), eps, weight_first};
  rms_norm_kernel(p, dtype);
}

// New keys and values into their cache slots, both in one call: a byte copy per token and kv head
// (index_copy_ twice a layer cost ~30 us a call at decode, ~1.8 ms of a 64-row step).
void kv_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& slots) {
  const char* op = "kv_write";
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous(), op,
              ": caches must be contiguous [blocks, block_size, kv_heads, head_dim] of one shape");
  const int64_t H = k_cache.size(2), D = k_cache.size(3), num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(key.dim() == 3 && key.size(1) == H && key.size(2) == D && key.stride(2) == 1 && value.sizes() == key.sizes() &&
                  value.stride(2) == 1,
              op, ": key and value must be [tokens, ", H, ", ", D, "] with a contiguous last axis, got ", key.sizes(), " and ",
              value.sizes());
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              op, ": key, value and the caches must share one dtype");
  check_index_vector(slots, key.size(0), op, "slots", at::kLong);
  const int64_t T = key.size(0), item = k_cache.element_size(), row = D * item;
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, op, ": slot ", slot[t], " outside the cache's ", num_slots);
  }
  auto* kc = static_cast<char*>(k_cache.mutable_data_ptr());
  auto* vc = static_cast<char*>(v_cache.mutable_data_ptr());
  const auto* kp = static_cast<const char*>(key.const_data_ptr());
  const auto* vp = static_cast<const char*>(value.const_data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t dst = (slot[t] * H + h) * row;
      std::memcpy(kc + dst, kp + (t * key.stride(0) + h * key.stride(1)) * item, row);
      std::memcpy(vc + dst, vp + (t * value.stride(0) + h * value.stride(1)) * item, row);
    }
  }
}

void row_max_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x) {
  const char* op = "row_max";
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1, op, ": x must be [B, V > 0] with a contiguous last axis, got ",
              x.sizes());
  const Dtype dtype = dtype_of(x, op);
  TORCH_CHECK(values.dim() == 1 && values.size(0) == x.size(0) && values.scalar_type() == at::kFloat && values.is_contiguous(),
              op, ": values must be a contiguous float32 [", x.size(0), "]");
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == x.size(0) && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              op, ": indices must be a contiguous int64 [", x.size(0), "]");
  if (x.size(0) == 0) return;
  RowMaxParams p{values.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>(), x.const_data_ptr(), x.size(0), x.size(1),
                 x.stride(0)};
  row_max_kernel(p, dtype);
}

void rotary_one(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op,
                const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && out.sizes() == x.sizes() && out.stride(3) == 1 &&
                  out.scalar_type() == x.scalar_type(),
              op, ": ", name, " and its output must be [B, heads, T, D] of one dtype with a contiguous last axis, got ",
              x.sizes(), " and ", out.sizes());
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3) &&
                  sin.sizes() == cos.sizes() && cos.stride(2) == 1 && sin.stride(2) == 1,
              op, ": cos and sin must be [", x.size(0), ", ", x.size(2), ", ", x.size(3),
              "] with a contiguous last axis, got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), op,
              ": cos, sin and ", name, " must share one dtype");
  TORCH_CHECK(x.size(3) % 2 == 0, op, ": head_dim must be even, got ", x.size(3));
  const Dtype dtype = dtype_of(x, op);
  if (x.numel() == 0) return;
  RotaryParams p{out.mutable_data_ptr(), x.const_data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(),
                 x.size(0), x.size(1), x.size(2), x.size(3),
                 x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
                 cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)};
  rotary_kernel(p, dtype);
}

void rotary_cpu(const at::Tensor& q_out, const at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& cos, const at::Tensor& sin) {
  rotary_one(q_out, q, cos, sin, "rotary", "q");
  rotary_one(k_out, k, cos, sin, "rotary", "k");
}

}  // namespace
}  // namespace hotswap

TORCH_LIBRARY(hotswap, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor token_rows, Tensor token_positions, float scale, "
      "int sliding_window, float softcap=0., Tensor? sinks=None) -> ()");
  m.def("lora_shrink(Tensor(a!) out, Tensor x, Tensor a_slots, Tensor token_slots, Tensor ranks) -> ()");
  m.def("lora_expand(Tensor(a!) y, Tensor t, Tensor b_slots, Tensor token_slots, Tensor ranks) -> ()");
  m.def("lora_apply(Tensor(a!) y, Tensor x, Tensor a_slots, Tensor b_slots, Tensor token_slots, Tensor ranks, "
        "Tensor? token_scales=None) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps, bool weight_first) -> ()");
  m.def("row_max(Tensor(a!) values, Tensor(b!) indices, Tensor x) -> ()");
  m.def("rotary(Tensor(a!) q_out, Tensor(b!) k_out, Tensor q, Tensor k, Tensor cos, Tensor sin) -> ()");
  m.def("kv_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(hotswap, CPU, m) {
  m.impl("paged_attention", &hotswap::paged_attention_cpu);
  m.impl("lora_shrink", &hotswap::lora_shrink_cpu);
  m.impl("lora_expand", &hotswap::lora_expand_cpu);
  m.impl("lora_apply", &hotswap::lora_apply_cpu);
  m.impl("rms_norm", &hotswap::rms_norm_cpu);
  m.impl("row_max", &hotswap::row_max_cpu);
  m.impl("kv_write", &hotswap::kv_write_cpu);
  m.impl("rotary", &hotswap::rotary_cpu);
}
