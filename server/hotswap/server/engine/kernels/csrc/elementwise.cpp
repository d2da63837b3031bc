// RMSNorm on CPU in one pass over each row, instead of the eight torch ops (and
// their fp32 temporaries) transformers' eager module runs:
//   out = w * T(x * rsqrt(mean(x^2) + eps))   (weight_first = false: Llama and most)
//   out = T(w * (x * rsqrt(mean(x^2) + eps)))  (weight_first = true)
// T() rounds to the tensors' dtype where eager code rounds, so the results
// match the module up to the order of the mean's fp32 sum.
// (A fused SiLU(gate) * up was measured too: no faster than torch's two ops here.)
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace hotswap {
namespace {

// x rounded to T and widened back: what an eager op's T output holds.
template <typename T>
inline vf round_to(vf x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    T tmp[W];
    store(tmp, x);
    return load(tmp);
  }
}

constexpr int64_t kRowsPerItem = 8;

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

}  // namespace

void rms_norm_kernel(const NormParams& p, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat: return rms_norm<float>(p);
    case Dtype::kBFloat16: return rms_norm<c10::BFloat16>(p);
    case Dtype::kHalf: return rms_norm<c10::Half>(p);
  }
}

}  // namespace hotswap
