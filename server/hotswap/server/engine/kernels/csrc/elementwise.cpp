// RMSNorm on CPU in one pass over each row, instead of the eight torch ops (and
// their fp32 temporaries) transformers' eager module runs:
//   out = w * T(x * rsqrt(mean(x^2) + eps))   (weight_first = false: Llama and most)
//   out = T(w * (x * rsqrt(mean(x^2) + eps)))  (weight_first = true)
// T() rounds to the tensors' dtype where eager code rounds, so the results
// match the module up to the order of the mean's fp32 sum.
// (A fused SiLU(gate) * up was measured too: no faster than torch's two ops here.)
//
// Rotary position embedding as transformers' apply_rotary_pos_emb computes it,
//   out = T(T(x * cos) + T(rotate_half(x) * sin)),  rotate_half(x) = (-x[D/2:], x[:D/2]),
// for one tensor of heads in one pass, where eager code runs ten ops (two slices,
// a negation, a cat, three products, a sum, twice: q and k) on small tensors at
// ~10 us each. Rounding where eager code rounds makes it bit-equal in bf16 / fp16
// (products and the sum of two rounded values are exact in fp32 before their one
// rounding).
//
// Each row's maximum and the index of its first occurrence, as torch.max(x, dim=-1)
// answers (a NaN anywhere makes the row's answer that NaN, at its first
// index), on fp32, bf16 or fp16 rows: the greedy token and the sampler's health check in
// one pass, where torch's indexed reduction over [64, 49152] fp32 logits took ~2 ms of a
// ~55 ms decode step (and bf16 logits need no fp32 copy for greedy rows).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace hotswap {
namespace {

// x rounded to T and widened back, in registers: what an eager op's T output holds.
template <typename T>
inline vf round_to(vf x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return (vf)(__builtin_convertvector(bf16_rne(x), vu) << 16);  // c10::BFloat16(float)'s rounding, widened back
  } else {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    T tmp[W];
    store(tmp, x);
    return load(tmp);
#endif
  }
}

constexpr int64_t kRowsPerItem = 8;
constexpr int kRotaryChunks = 8;  // cos / sin vectors held per pass over the heads: head_dim <= 256 in one pass

template <typename T>
void rms_norm(const NormParams& p) {
  const auto* w = static_cast<const T*>(p.weight);
  const int D = static_cast<int>(p.D);
  const int chunks = (D + W - 1) / W;
  const int64_t items = (p.N + kRowsPerItem - 1) / kRowsPerItem;
  run_items(items, p.N * D * 4, [&](auto take) {
    for (int64_t item; (item = take()) >= 0;) {
      const int64_t end = std::min(p.N, (item + 1) * kRowsPerItem);
      for (int64_t r = item * kRowsPerItem; r < end; ++r) {
        const T* x = static_cast<const T*>(p.x) + r * p.x_s0;
        T* o = static_cast<T*>(p.out) + r * p.out_s0;
        vf acc{};
        for (int c = 0; c < chunks; ++c) {
          const vf v = load_at(x, c, D);
          acc += v * v;
        }
        const float inv = 1.f / std::sqrt(hsum(acc) / static_cast<float>(D) + static_cast<float>(p.eps));
        for (int c = 0; c < chunks; ++c) {
          const vf h = load_at(x, c, D) * inv;
          const vf y = p.weight_first ? load_at(w, c, D) * h : load_at(w, c, D) * round_to<T>(h);
          store_at(o, c, D, y);
        }
      }
    }
  });
}

template <typename T>
void rotary(const RotaryParams& p) {
  const int half = static_cast<int>(p.D / 2);
  const int chunks = (half + W - 1) / W;
  const int64_t items = p.B * p.T;  // one (batch, token): its cos / sin row serves every head
  run_items(items, items * p.H * p.D * 4, [&](auto take) {
    vf cos_lo[kRotaryChunks], cos_hi[kRotaryChunks], sin_lo[kRotaryChunks], sin_hi[kRotaryChunks];
    for (int64_t item; (item = take()) >= 0;) {
      const int64_t b = item / p.T, t = item % p.T;
      const T* c = static_cast<const T*>(p.cos) + b * p.c_s0 + t * p.c_s1;
      const T* s = static_cast<const T*>(p.sin) + b * p.s_s0 + t * p.s_s1;
      for (int j0 = 0; j0 < chunks; j0 += kRotaryChunks) {
        const int n = std::min(kRotaryChunks, chunks - j0);
        for (int j = 0; j < n; ++j) {
          cos_lo[j] = load_at(c, j0 + j, half), cos_hi[j] = load_at(c + half, j0 + j, half);
          sin_lo[j] = load_at(s, j0 + j, half), sin_hi[j] = load_at(s + half, j0 + j, half);
        }
        for (int64_t h = 0; h < p.H; ++h) {
          const T* x = static_cast<const T*>(p.x) + b * p.x_s0 + h * p.x_s1 + t * p.x_s2;
          T* o = static_cast<T*>(p.out) + b * p.o_s0 + h * p.o_s1 + t * p.o_s2;
          for (int j = 0; j < n; ++j) {
            const vf x1 = load_at(x, j0 + j, half), x2 = load_at(x + half, j0 + j, half);
            store_at(o, j0 + j, half, round_to<T>(x1 * cos_lo[j]) - round_to<T>(x2 * sin_lo[j]));
            store_at(o + half, j0 + j, half, round_to<T>(x2 * cos_hi[j]) + round_to<T>(x1 * sin_hi[j]));
          }
        }
      }
    }
  });
}

template <typename T>
void row_max(const RowMaxParams& p) {
  const int64_t V = p.V, full = V / W * W;
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  run_items(p.B, p.B * V, [&](auto take) {
    for (int64_t r; (r = take()) >= 0;) {
      const T* x = static_cast<const T*>(p.x) + r * p.x_s0;
      // One pass: each lane keeps its maximum and where it first reached it (strictly greater
      // replaces, so a lane keeps its first occurrence); a NaN lane never wins a comparison.
      vf m = splat(-std::numeric_limits<float>::infinity());
      vi at = lane, nan{};
      for (int64_t i = 0; i < full; i += W) {
        const vf v = load(x + i);
        const vi gt = v > m;
        m = gt ? v : m;
        at = gt ? lane + static_cast<int32_t>(i) : at;
        nan |= v != v;
      }
      float best = full ? hmax(m) : -std::numeric_limits<float>::infinity();  // values widen exactly to fp32
      int64_t first = V;
      bool any_nan = false;
      for (int l = 0; l < W && full; ++l) {
        any_nan |= nan[l] != 0;
        if (m[l] == best && at[l] < first) first = at[l];
      }
      for (int64_t i = full; i < V; ++i) {
        const float xi = static_cast<float>(x[i]);
        any_nan |= xi != xi;
        if (first == V || xi > best) best = xi, first = i;
      }
      if (any_nan) {
        first = 0;
        while (static_cast<float>(x[first]) == static_cast<float>(x[first])) ++first;
        best = static_cast<float>(x[first]);
      }
      p.values[r] = best;
      p.indices[r] = first;
    }
  });
}

}  // namespace

void row_max_kernel(const RowMaxParams& p, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat: return row_max<float>(p);
    case Dtype::kBFloat16: return row_max<c10::BFloat16>(p);
    case Dtype::kHalf: return row_max<c10::Half>(p);
  }
}

void rotary_kernel(const RotaryParams& p, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat: return rotary<float>(p);
    case Dtype::kBFloat16: return rotary<c10::BFloat16>(p);
    case Dtype::kHalf: return rotary<c10::Half>(p);
  }
}

void rms_norm_kernel(const NormParams& p, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat: return rms_norm<float>(p);
    case Dtype::kBFloat16: return rms_norm<c10::BFloat16>(p);
    case Dtype::kHalf: return rms_norm<c10::Half>(p);
  }
}

}  // namespace hotswap
