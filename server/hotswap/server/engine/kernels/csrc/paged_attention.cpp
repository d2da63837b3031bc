// Paged attention on CPU: every query token of a packed batch attends to its
// row's keys through a block table (flash-attn's paged layout).
//
// Work item = a tile, kv head by kv head. A tile is up to MAX_M / G consecutive query
// tokens of one row; with the G query heads that share the kv head that makes
// M = tokens * G query vectors, so each key/value row is fetched from memory
// once per M dot products: decode tiles are one token (M = G), prefill chunks
// share every key among up to 32 query vectors.
// Two-pass softmax: all scores of the tile's key range go to a per-thread
// buffer (base-2 logits: the scale carries log2 e), then one max and one
// vectorised exp per score, then P @ V. That drops the per-block rescaling of
// an online softmax, which is most of the cost at decode's G = 3.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "attention_engines.h"
#include "kernels.h"
#include "parallel.h"

namespace hotswap {
namespace {

struct Tile {
  int64_t first;   // first query token
  int count;       // consecutive tokens, all of one row
  int row;
  int kmin, kmax;  // union of the tokens' key ranges
};

inline int key_lo(const AttentionParams& a, int p) {
  return a.sliding_window > 0 ? static_cast<int>(std::max<int64_t>(0, p - a.sliding_window + 1)) : 0;
}

// Per-thread buffers that grow to the longest tile seen and are reused.
struct Scratch {
  std::vector<float> sc;            // [M][len_pad] scores, then probabilities
  std::vector<int64_t> koff, voff;  // [len_pad] element offset of each key's / value's row
  float l[MAX_M];
  int lo[MAX_M], hi[MAX_M];
};

inline bool misses(const Scratch& s, int m, int j0, int nk) { return s.hi[m] < j0 || s.lo[m] > j0 + nk - 1; }

// Asks for up to 16 rows ahead of use. A row's blocks sit at random places
// (the block table), so the hardware prefetcher only ever sees short strided
// runs; at decode, with cold caches, these misses take most of the time.
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* off, int n, int64_t row_bytes) {
  for (int i = 0; i < n; ++i) {
    const char* p = reinterpret_cast<const char*>(base + off[i]);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b);
  }
}

template <typename T, typename Engine>
void run_tile(const AttentionParams& a, const Tile& t, int64_t h, Engine& e, Scratch& s) {
  const int G = static_cast<int>(a.H / a.KVH), M = t.count * G;
  const int len = t.kmax - t.kmin + 1, nblk = (len + KB - 1) / KB, len_pad = nblk * KB;
  const float qscale = static_cast<float>(a.scale * 1.4426950408889634);  // log2(e): softmax in base 2
  // Soft-capping in base 2: c tanh(s / c) for the natural logit s = x / log2 e is C tanh(x / C), C = c log2 e.
  const float cap = static_cast<float>(a.softcap * 1.4426950408889634), inv_cap = a.softcap > 0 ? 1.f / cap : 0.f;

  // Row offsets of the keys kmin..kmax; the padding repeats key kmin (a readable row; masked).
  s.koff.resize(len_pad);
  s.voff.resize(len_pad);
  const int32_t* bt = a.block_tables + t.row * a.bt_s0;
  for (int64_t i = 0, lb = t.kmin / a.block_size, off = t.kmin % a.block_size; i < len; ++i) {
    const int64_t blk = bt[lb];
    s.koff[i] = blk * a.k_s0 + off * a.k_s1 + h * a.k_s2;
    s.voff[i] = blk * a.v_s0 + off * a.v_s1 + h * a.v_s2;
    if (++off == a.block_size) off = 0, ++lb;
  }
  for (int i = len; i < len_pad; ++i) s.koff[i] = s.koff[0], s.voff[i] = s.voff[0];

  const T* query = static_cast<const T*>(a.query);
  for (int m = 0; m < M; ++m) {
    const int64_t tok = t.first + m / G, head = h * G + m % G;
    e.set_query(m, query + tok * a.q_s0 + head * a.q_s1, qscale);
    s.hi[m] = a.token_positions[tok];
    s.lo[m] = key_lo(a, s.hi[m]);
  }

  // Pass 1: scores, masked to each vector's own key range.
  s.sc.resize(static_cast<size_t>(M) * len_pad);
  const vf ninf = splat(-std::numeric_limits<float>::infinity());
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vf vmax_m[MAX_M];
  for (int m = 0; m < M; ++m) vmax_m[m] = ninf;
  const T* kc = static_cast<const T*>(a.key_cache);
  const T* vc = static_cast<const T*>(a.value_cache);
  const int64_t row_bytes = a.D * static_cast<int64_t>(sizeof(T));
  prefetch_rows(kc, &s.koff[0], std::min(2 * KB, len), row_bytes);
  for (int b = 0; b < nblk; ++b) {
    const int j0 = t.kmin + b * KB, nk = std::min(KB, len - b * KB);
    // Keys two blocks ahead for this pass, this block's values for the next one (they stay in L2).
    if (b + 2 < nblk) prefetch_rows(kc, &s.koff[(b + 2) * KB], std::min(KB, len - (b + 2) * KB), row_bytes);
    prefetch_rows(vc, &s.voff[b * KB], nk, row_bytes);
    e.begin_keys(kc, &s.koff[b * KB], nk);
    for (int m = 0; m < M; ++m) {
      float* dst = &s.sc[static_cast<size_t>(m) * len_pad + b * KB];
      vf x = ninf;
      if (!misses(s, m, j0, nk)) {
        x = e.scores(m);
        if (a.softcap > 0) x = tanhv(x * inv_cap) * cap;  // before the mask, as transformers' eager attention
        if (s.lo[m] > j0 || s.hi[m] < j0 + KB - 1) {
          const vi j = lane + j0;
          x = ((j < s.lo[m]) | (j > s.hi[m])) ? ninf : x;
        }
        vmax_m[m] = vmax(vmax_m[m], x);
      }
      store(dst, x);
    }
  }
  // Softmax numerators in place, and their sums. A sink (GPT-OSS) is one more logit per query head in
  // the max and the sum, with no value: it only lowers every key's probability.
  for (int m = 0; m < M; ++m) {
    float* row = &s.sc[static_cast<size_t>(m) * len_pad];
    float mx = hmax(vmax_m[m]);  // finite: every vector sees at least its own position
    const float sink = a.sinks ? a.sinks[h * G + m % G] * 1.4426950408889634f : 0.f;
    if (a.sinks) mx = std::max(mx, sink);
    vf sum{};
    for (int b = 0; b < nblk; ++b) {
      const vf p = exp2v(load(row + b * KB) - mx);
      store(row + b * KB, p);
      sum += p;
    }
    s.l[m] = hsum(sum) + (a.sinks ? std::exp2(sink - mx) : 0.f);
  }
  // Pass 2: P @ V.
  for (int b = 0; b < nblk; ++b) {
    const int j0 = t.kmin + b * KB, nk = std::min(KB, len - b * KB);
    e.begin_values(vc, &s.voff[b * KB], nk);
    for (int m = 0; m < M; ++m)
      if (!misses(s, m, j0, nk)) e.accumulate(m, &s.sc[static_cast<size_t>(m) * len_pad + b * KB]);
  }
  T* out = static_cast<T*>(a.out);
  for (int m = 0; m < M; ++m) {
    const int64_t tok = t.first + m / G, head = h * G + m % G;
    e.finish(m, out + tok * a.o_s0 + head * a.o_s1, 1.f / s.l[m]);  // l >= 1: the max contributes 2^0
  }
}

// Groups the tokens into tiles, after checking every index the kernel will
// follow, so a bad table raises instead of reading out of bounds.
std::vector<Tile> plan_tiles(const AttentionParams& a) {
  std::vector<Tile> tiles;
  std::vector<int> row_lo(a.rows, std::numeric_limits<int>::max()), row_hi(a.rows, -1);
  const int64_t max_tokens = std::max<int64_t>(1, MAX_M / (a.H / a.KVH));
  const int64_t capacity = a.max_blocks * a.block_size;
  for (int64_t i = 0; i < a.N; ++i) {
    const int r = a.token_rows[i];
    if (r < 0) continue;
    TORCH_CHECK(r < a.rows, "paged_attention: token_rows[", i, "] = ", r, " but block_tables has ", a.rows, " rows");
    const int p = a.token_positions[i];
    TORCH_CHECK(p >= 0 && p < capacity, "paged_attention: token_positions[", i, "] = ", p,
                " outside the block table's ", capacity, " positions");
    const int lo = key_lo(a, p);
    row_lo[r] = std::min(row_lo[r], lo);
    row_hi[r] = std::max(row_hi[r], p);
    Tile* last = tiles.empty() ? nullptr : &tiles.back();
    if (last && last->row == r && last->first + last->count == i && last->count < max_tokens) {
      last->count += 1;
      last->kmin = std::min(last->kmin, lo);
      last->kmax = std::max(last->kmax, p);
    } else {
      tiles.push_back({i, 1, r, lo, p});
    }
  }
  // Only the blocks in use: a sliding-window engine may have freed the older ones.
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t b = row_lo[r] / a.block_size; row_hi[r] >= 0 && b <= row_hi[r] / a.block_size; ++b) {
      const int32_t blk = a.block_tables[r * a.bt_s0 + b];
      TORCH_CHECK(blk >= 0 && blk < a.num_blocks, "paged_attention: block_tables[", r, ", ", b, "] = ", blk,
                  " but the cache has ", a.num_blocks, " blocks");
    }
  return tiles;
}

// The first keys of the next work, requested while the current one computes:
// decode tiles are short (ctx 100 = 7 blocks), so their first misses matter.
template <typename T>
void prefetch_head(const AttentionParams& a, const Tile& t, int64_t h) {
  const int32_t* bt = a.block_tables + t.row * a.bt_s0;
  const char* kc = static_cast<const char*>(a.key_cache);
  const int n = std::min(2 * KB, t.kmax - t.kmin + 1);
  for (int64_t i = 0, j = t.kmin; i < n; ++i, ++j) {
    const char* p = kc + sizeof(T) * (bt[j / a.block_size] * a.k_s0 + (j % a.block_size) * a.k_s1 + h * a.k_s2);
    for (int64_t b = 0; b < a.D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
  }
}

// Work item = one tile, its kv heads in turn.
template <typename T, typename Engine>
void run_all(const AttentionParams& a, const std::vector<Tile>& tiles) {
  int64_t work = 0;  // multiply-adds: keys x query vectors x head_dim x 2 (q.k and p.v)
  for (const Tile& t : tiles) work += int64_t{t.kmax - t.kmin + 1} * t.count * a.H * a.D * 2;
  run_items(static_cast<int64_t>(tiles.size()), work, [&](auto take) {
    auto engine = std::make_unique<Engine>(static_cast<int>(a.D));  // ~25-100 KB: not on the stack
    Scratch s;
    for (int64_t w = take(), next; w >= 0; w = next) {
      next = take();
      for (int64_t h = 0; h < a.KVH; ++h) {
        if (h + 1 < a.KVH) prefetch_head<T>(a, tiles[w], h + 1);
        else if (next >= 0) prefetch_head<T>(a, tiles[next], 0);
        run_tile<T>(a, tiles[w], h, *engine, s);
      }
    }
  });
}

// Unrolled engines for the common head dims, a runtime-sized one for the rest.
template <typename T>
void run_generic(const AttentionParams& a, const std::vector<Tile>& tiles) {
  switch ((a.D + W - 1) / W) {
    case 4: return run_all<T, GenericEngine<T, 4>>(a, tiles);
    case 8: return run_all<T, GenericEngine<T, 8>>(a, tiles);
    default: return run_all<T, GenericEngine<T, 0>>(a, tiles);
  }
}

void run_bf16(const AttentionParams& a, const std::vector<Tile>& tiles) {
#ifdef HOTSWAP_HAVE_BF16_DOT
  switch ((a.D + 31) / 32) {
    case 2: return run_all<c10::BFloat16, Bf16DotEngine<2>>(a, tiles);
    case 4: return run_all<c10::BFloat16, Bf16DotEngine<4>>(a, tiles);
    default: return run_all<c10::BFloat16, Bf16DotEngine<0>>(a, tiles);
  }
#else
  run_generic<c10::BFloat16>(a, tiles);
#endif
}

}  // namespace

void paged_attention_kernel(const AttentionParams& a, Dtype dtype) {
  TORCH_CHECK(a.D >= 1 && a.D <= W * MAX_NC, "paged_attention: head_dim must be 1..", W * MAX_NC);
  TORCH_CHECK(a.H / a.KVH <= MAX_M, "paged_attention: at most ", MAX_M, " query heads per kv head");
  const auto tiles = plan_tiles(a);
  switch (dtype) {
    case Dtype::kFloat: return run_generic<float>(a, tiles);
    case Dtype::kBFloat16: return run_bf16(a, tiles);
    case Dtype::kHalf: return run_generic<c10::Half>(a, tiles);
  }
}

}  // namespace hotswap
