// Batched per-token LoRA on CPU (each token its own adapter slot):
//   shrink: out[t, :rank] = A[s] x[t]      (A: [S, R, IN])
//   expand: y[t] += B[s, :, :rank] t[t]    (B: [S, OUT, R], scale folded in)
//
// Consecutive tokens with the same slot form a run; a run is cut into tiles
// whose tokens share every load of the adapter's weights. A decode batch
// (every token a different slot) is then one weight read per token, i.e.
// memory bound; a prefill run reuses each weight row across the tile like a
// small GEMM. Accumulation in fp32; y is rounded once, after the add.
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace hotswap {
namespace {

constexpr int TS = 4;        // tokens per shrink tile (x 4 ranks = 16 accumulators)
constexpr int TE = 16;       // tokens per expand tile: amortises the transposition of B
constexpr int OB = 256;      // outputs per expand work item (a multiple of 16)
constexpr int MAX_R = 256;   // rank capacity (B's last axis)

struct Tile {
  int64_t first;
  int count;
  int slot;
};

// Tiles of consecutive tokens sharing a slot, after checking every slot and rank.
std::vector<Tile> plan(const LoraParams& p, int max_tokens, const char* op) {
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < p.N; ++i) {
    const int s = p.token_slots[i];
    if (s < 0) continue;
    TORCH_CHECK(s < p.S, op, ": token_slots[", i, "] = ", s, " but there are ", p.S, " slots");
    TORCH_CHECK(p.ranks[s] >= 0 && p.ranks[s] <= p.R, op, ": ranks[", s, "] = ", p.ranks[s], " outside 0..", p.R);
    Tile* last = tiles.empty() ? nullptr : &tiles.back();
    if (last && last->slot == s && last->first + last->count == i && last->count < max_tokens)
      last->count += 1;
    else
      tiles.push_back({i, 1, s});
  }
  return tiles;
}

// Multiply-adds of a call, to decide whether it is worth the thread pool.
int64_t work(const LoraParams& p, const std::vector<Tile>& tiles) {
  int64_t total = 0;
  for (const Tile& t : tiles) total += int64_t{t.count} * p.ranks[t.slot] * p.features;
  return total;
}

// ---- shrink ------------------------------------------------------------------

// TT tokens times RB rows of A: TT * RB dot products over IN, x rows widened
// to fp32 once per tile (xs).
template <typename T, int TT, int RB>
void shrink_block(const float* xs, int64_t xs_s0, const T* a, int64_t a_s1, int IN, float* out, int64_t out_s0) {
  vf acc[TT][RB] = {};
  const int chunks = (IN + W - 1) / W;
  for (int c = 0; c < chunks; ++c) {
    vf av[RB];
    for (int rb = 0; rb < RB; ++rb) av[rb] = load_at(a + rb * a_s1, c, IN);
    for (int tt = 0; tt < TT; ++tt) {
      const vf xv = load(xs + tt * xs_s0 + c * W);
      for (int rb = 0; rb < RB; ++rb) acc[tt][rb] += xv * av[rb];
    }
  }
  for (int tt = 0; tt < TT; ++tt)
    for (int rb = 0; rb < RB; ++rb) out[tt * out_s0 + rb] = hsum(acc[tt][rb]);
}

#ifdef HOTSWAP_HAVE_BF16_DOT
// The same on bf16 x and A as stored: exact products, fp32 sums, half the
// instructions of widening both operands.
template <int TT, int RB>
void shrink_block_bf16(const c10::BFloat16* x, int64_t x_s0, const c10::BFloat16* a, int64_t a_s1, int IN, float* out,
                       int64_t out_s0) {
  __m512 acc[TT][RB];
  for (int tt = 0; tt < TT; ++tt)
    for (int rb = 0; rb < RB; ++rb) acc[tt][rb] = _mm512_setzero_ps();
  const int chunks = (IN + 31) / 32;
  for (int c = 0; c < chunks; ++c) {
    __m512i av[RB];
    for (int rb = 0; rb < RB; ++rb) av[rb] = load32(a + rb * a_s1, c, IN);
    for (int tt = 0; tt < TT; ++tt) {
      const __m512i xv = load32(x + tt * x_s0, c, IN);
      for (int rb = 0; rb < RB; ++rb) acc[tt][rb] = dot_bf16(acc[tt][rb], xv, av[rb]);
    }
  }
  for (int tt = 0; tt < TT; ++tt)
    for (int rb = 0; rb < RB; ++rb) out[tt * out_s0 + rb] = hsum((vf)acc[tt][rb]);
}
#endif

// All `rank` rows of A for a tile of TT tokens, four rows at a time.
template <typename T, int TT>
void shrink_tile(const T* x, int64_t x_s0, const float* xs, int64_t xs_s0, const T* a, int64_t a_s1, int IN, int rank,
                 float* out, int64_t out_s0) {
  int r = 0;
#ifdef HOTSWAP_HAVE_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; r + 4 <= rank; r += 4) shrink_block_bf16<TT, 4>(x, x_s0, a + r * a_s1, a_s1, IN, out + r, out_s0);
    for (; r < rank; ++r) shrink_block_bf16<TT, 1>(x, x_s0, a + r * a_s1, a_s1, IN, out + r, out_s0);
    return;
  }
#endif
  for (; r + 4 <= rank; r += 4) shrink_block<T, TT, 4>(xs, xs_s0, a + r * a_s1, a_s1, IN, out + r, out_s0);
  for (; r < rank; ++r) shrink_block<T, TT, 1>(xs, xs_s0, a + r * a_s1, a_s1, IN, out + r, out_s0);
}

template <typename T>
void shrink(const LoraParams& p, const std::vector<Tile>& tiles) {
  const int IN = static_cast<int>(p.features), R = static_cast<int>(p.R);
  const int64_t in_pad = (IN + W - 1) / W * W;
#ifdef HOTSWAP_HAVE_BF16_DOT
  constexpr bool widen = !std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool widen = true;
#endif
  const T* xp = static_cast<const T*>(p.in);
  const T* ap = static_cast<const T*>(p.w);
  float* op = static_cast<float*>(p.out);
  run_items(static_cast<int64_t>(tiles.size()), work(p, tiles), [&](auto take) {
    std::vector<float> xs(widen ? TS * in_pad : 0);  // the tile's x rows in fp32, zero padded
    for (int64_t w = take(); w >= 0; w = take()) {
      const Tile& t = tiles[w];
      const T* x = xp + t.first * p.in_s0;
      if (widen)
        for (int tt = 0; tt < t.count; ++tt)
          for (int c = 0; c < in_pad / W; ++c) store(&xs[tt * in_pad + c * W], load_at(x + tt * p.in_s0, c, IN));
      const T* a = ap + t.slot * p.w_s0;
      const int rank = p.ranks[t.slot];
      float* o = op + t.first * p.out_s0;
      switch (t.count) {
#define HS_CASE(N) \
  case N: shrink_tile<T, N>(x, p.in_s0, xs.data(), in_pad, a, p.w_s1, IN, rank, o, p.out_s0); break;
        HS_CASE(1) HS_CASE(2) HS_CASE(3) HS_CASE(4)
#undef HS_CASE
      }
      for (int tt = 0; tt < t.count; ++tt) std::fill(o + tt * p.out_s0 + rank, o + tt * p.out_s0 + R, 0.f);
    }
  });
}

// ---- expand ------------------------------------------------------------------

// Outputs [o0, o1) of one token, for tiles too short to amortise a
// transposition: 16 rows of B times t, then one tree of horizontal sums gives
// the 16 outputs.
template <typename T>
void expand_dot(int64_t o0, int64_t o1, int OUT, int rank, int R, const T* b, int64_t b_s1, const float* tv, T* y) {
  vf tvec[MAX_R / W];
  const int rchunks = (rank + W - 1) / W;
  for (int c = 0; c < rchunks; ++c) tvec[c] = load_at(tv, c, rank, R);
  if (rchunks == 0) return;
  for (int64_t o = o0; o < o1; o += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, OUT - o));
    vf prod[W];
    for (int i = 0; i < rows; ++i) {
      const T* row = b + (o + i) * b_s1;
      vf acc = load_at(row, 0, rank, R) * tvec[0];
      for (int c = 1; c < rchunks; ++c) acc += load_at(row, c, rank, R) * tvec[c];
      prod[i] = acc;
    }
    for (int i = rows; i < W; ++i) prod[i] = vf{};
    const int oc = static_cast<int>(o / W);
    store_at(y, oc, OUT, load_at(y, oc, OUT) + reduce16(prod));
  }
}

// Outputs [o0, o1) of a tile of several tokens. B's rows are [rank] vectors,
// so each 16-output chunk of B is transposed in registers into
// bt[r] = B[o .. o+15, r] once; every token then needs `rank` broadcast FMAs
// per 16 outputs and no horizontal sums.
template <typename T>
void expand_tile(const Tile& t, int64_t o0, int64_t o1, int OUT, int rank, int R, const T* b, int64_t b_s1, const float* tp,
                 int64_t t_s0, T* yp, int64_t y_s0) {
  vf bt[MAX_R];
  const int rchunks = (rank + W - 1) / W;
  for (int64_t o = o0; o < o1; o += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, OUT - o));
    for (int cb = 0; cb < rchunks; ++cb) {
      vf* blk = bt + cb * W;
      for (int i = 0; i < rows; ++i) blk[i] = load_at(b + (o + i) * b_s1, cb, rank, R);
      for (int i = rows; i < W; ++i) blk[i] = vf{};
      transpose16(blk);
    }
    const int oc = static_cast<int>(o / W);
    for (int tt = 0; tt < t.count; ++tt) {
      const float* tv = tp + (t.first + tt) * t_s0;
      T* y = yp + (t.first + tt) * y_s0;
      // Four partial sums so consecutive FMAs do not wait on each other.
      vf acc[4] = {load_at(y, oc, OUT), vf{}, vf{}, vf{}};
      int r = 0;
      for (; r + 4 <= rank; r += 4)
        for (int u = 0; u < 4; ++u) acc[u] += tv[r + u] * bt[r + u];
      for (; r < rank; ++r) acc[0] += tv[r] * bt[r];
      store_at(y, oc, OUT, (acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
  }
}

#ifdef HOTSWAP_HAVE_BF16_DOT
// expand_tile for bf16 with vdpbf16ps: B's rows are already (r, r+1) pairs
// of bf16, so the transposition works on 32-bit pairs and each instruction
// covers two ranks. t is rounded to bf16 here (as PEFT's bf16 forward does to
// the A output), halving the instructions where prefill runs are FMA bound.
// N consecutive tokens of a tile: independent accumulators sharing each bt load.
template <int N>
inline void expand_tokens_bf16(const uint32_t (*tpair)[MAX_R / 2], const vf* bt, int npairs, c10::BFloat16* y,
                               int64_t y_s0, int oc, int OUT) {
  __m512 acc[N];
  for (int u = 0; u < N; ++u) acc[u] = (__m512)load_at(y + u * y_s0, oc, OUT);
  for (int k = 0; k < npairs; ++k)
    for (int u = 0; u < N; ++u)
      acc[u] = dot_bf16(acc[u], _mm512_set1_epi32(static_cast<int>(tpair[u][k])), (__m512i)bt[k]);
  for (int u = 0; u < N; ++u) store_at(y + u * y_s0, oc, OUT, (vf)acc[u]);
}

void expand_tile_bf16(const Tile& t, int64_t o0, int64_t o1, int OUT, int rank, int R, const c10::BFloat16* b, int64_t b_s1,
                      const float* tp, int64_t t_s0, c10::BFloat16* yp, int64_t y_s0) {
  const int npairs = (rank + 1) / 2, pchunks = (rank + 31) / 32;
  uint32_t tpair[TE][MAX_R / 2];  // (t[2k], t[2k+1]) as a bf16 pair, zero past the rank
  for (int tt = 0; tt < t.count; ++tt) {
    const float* tv = tp + (t.first + tt) * t_s0;
    for (int k = 0; k < npairs; ++k) {
      const uint32_t lo = c10::BFloat16(tv[2 * k]).x;
      const uint32_t hi = 2 * k + 1 < rank ? c10::BFloat16(tv[2 * k + 1]).x : 0u;
      tpair[tt][k] = lo | (hi << 16);
    }
  }
  vf bt[MAX_R / 2];  // bt[k] = the 16 outputs' (B[o, 2k], B[o, 2k+1])
  for (int64_t o = o0; o < o1; o += W) {
    const int rows = static_cast<int>(std::min<int64_t>(W, OUT - o));
    for (int cb = 0; cb < pchunks; ++cb) {
      vf* blk = bt + cb * W;
      for (int i = 0; i < rows; ++i) blk[i] = (vf)load32(b + (o + i) * b_s1, cb, rank, R);
      for (int i = rows; i < W; ++i) blk[i] = vf{};
      transpose16(blk);
    }
    const int oc = static_cast<int>(o / W);
    int t0 = 0;
    for (; t0 + 4 <= t.count; t0 += 4) expand_tokens_bf16<4>(&tpair[t0], bt, npairs, yp + (t.first + t0) * y_s0, y_s0, oc, OUT);
    for (; t0 < t.count; ++t0) expand_tokens_bf16<1>(&tpair[t0], bt, npairs, yp + (t.first + t0) * y_s0, y_s0, oc, OUT);
  }
}
#endif

template <typename T>
void expand(const LoraParams& p, const std::vector<Tile>& tiles) {
  const int OUT = static_cast<int>(p.features), R = static_cast<int>(p.R);
  const int64_t parts = (OUT + OB - 1) / OB;
  const float* tp = static_cast<const float*>(p.in);
  const T* bp = static_cast<const T*>(p.w);
  T* yp = static_cast<T*>(p.out);
  run_items(static_cast<int64_t>(tiles.size()) * parts, work(p, tiles), [&](auto take) {
    for (int64_t w = take(); w >= 0; w = take()) {
      const Tile& tile = tiles[w / parts];
      const int64_t o0 = (w % parts) * OB, o1 = std::min<int64_t>(o0 + OB, OUT);
      const T* b = bp + tile.slot * p.w_s0;
      const int rank = p.ranks[tile.slot];
      if (tile.count >= 3) {
#ifdef HOTSWAP_HAVE_BF16_DOT
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          expand_tile_bf16(tile, o0, o1, OUT, rank, R, b, p.w_s1, tp, p.in_s0, yp, p.out_s0);
          continue;
        }
#endif
        expand_tile<T>(tile, o0, o1, OUT, rank, R, b, p.w_s1, tp, p.in_s0, yp, p.out_s0);
      } else {
        for (int tt = 0; tt < tile.count; ++tt) {
          const int64_t tok = tile.first + tt;
          expand_dot<T>(o0, o1, OUT, rank, R, b, p.w_s1, tp + tok * p.in_s0, yp + tok * p.out_s0);
        }
      }
    }
  });
}

}  // namespace

void lora_shrink_kernel(const LoraParams& p, Dtype dtype) {
  const auto tiles = plan(p, TS, "lora_shrink");
  // Tokens without LoRA get a zero row; every other row is written by its tile.
  float* op = static_cast<float*>(p.out);
  for (int64_t i = 0; i < p.N; ++i)
    if (p.token_slots[i] < 0) std::fill(op + i * p.out_s0, op + i * p.out_s0 + p.R, 0.f);
  switch (dtype) {
    case Dtype::kFloat: return shrink<float>(p, tiles);
    case Dtype::kBFloat16: return shrink<c10::BFloat16>(p, tiles);
    case Dtype::kHalf: return shrink<c10::Half>(p, tiles);
  }
}

void lora_expand_kernel(const LoraParams& p, Dtype dtype) {
  TORCH_CHECK(p.R <= MAX_R, "lora_expand: rank capacity ", p.R, " exceeds ", MAX_R);
  const auto tiles = plan(p, TE, "lora_expand");
  switch (dtype) {
    case Dtype::kFloat: return expand<float>(p, tiles);
    case Dtype::kBFloat16: return expand<c10::BFloat16>(p, tiles);
    case Dtype::kHalf: return expand<c10::Half>(p, tiles);
  }
}

}  // namespace hotswap
