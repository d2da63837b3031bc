// Batched per-token LoRA on CPU (each token its own adapter slot):
//   shrink: out[t, :rank] = A[s] x[t]      (A: [S, R, IN])
//   expand: y[t] += t[t, :rank] B[s, :rank]  (B: [S, R, OUT], scale folded in)
//
// The tokens of each slot, wherever they sit in the batch (a prefill chunk's
// run, decoding rows of one adapter scattered among others), are cut into tiles
// whose tokens share every load of the adapter's weights: a decode batch reads
// each distinct adapter's weights once, not once per row (memory bound), and a
// prefill run reuses each weight row across the tile like a small GEMM. A token's
// result does not depend on its tile (the same sums in the same order).
// Accumulation in fp32; y is rounded once, after the add.
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
constexpr int TE = 16;       // tokens per expand tile
constexpr int OB = 384;      // outputs per work item of a several-token expand (whole blocks of 6 and 8 chunks)

struct Tile {
  int first;  // index into Plan::rows
  int count;
  int slot;
};

struct Plan {
  std::vector<int64_t> rows;  // token indices grouped by slot (batch order within a slot)
  std::vector<Tile> tiles;
};

// Tiles of up to max_tokens tokens of one slot, after checking every slot and rank.
Plan plan(const LoraParams& p, int max_tokens, const char* op) {
  std::vector<int64_t> count(p.S + 1, 0);
  for (int64_t i = 0; i < p.N; ++i) {
    const int s = p.token_slots[i];
    if (s < 0) continue;
    TORCH_CHECK(s < p.S, op, ": token_slots[", i, "] = ", s, " but there are ", p.S, " slots");
    TORCH_CHECK(p.ranks[s] >= 0 && p.ranks[s] <= p.R, op, ": ranks[", s, "] = ", p.ranks[s], " outside 0..", p.R);
    ++count[s + 1];
  }
  for (int64_t s = 0; s < p.S; ++s) count[s + 1] += count[s];  // count[s]: where slot s's tokens start
  Plan out;
  out.rows.resize(count[p.S]);
  std::vector<int64_t> at(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < p.N; ++i)
    if (p.token_slots[i] >= 0) out.rows[at[p.token_slots[i]]++] = i;
  for (int64_t s = 0; s < p.S; ++s)
    for (int64_t f = count[s]; f < count[s + 1]; f += max_tokens)
      out.tiles.push_back({static_cast<int>(f), static_cast<int>(std::min<int64_t>(max_tokens, count[s + 1] - f)),
                           static_cast<int>(s)});
  return out;
}

// Multiply-adds of a call, to decide whether it is worth the thread pool.
int64_t work(const LoraParams& p, const std::vector<Tile>& tiles) {
  int64_t total = 0;
  for (const Tile& t : tiles) total += int64_t{t.count} * p.ranks[t.slot] * p.features;
  return total;
}

// ---- shrink ------------------------------------------------------------------

// TT tokens times RB rows of A: TT * RB dot products over IN, x rows widened
// to fp32 once per tile (xs). Token tt's outputs go to out + rows[tt] * out_s0.
template <typename T, int TT, int RB>
void shrink_block(const float* xs, int64_t xs_s0, const T* a, int64_t a_s1, int IN, float* out, const int64_t* rows,
                  int64_t out_s0) {
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
    for (int rb = 0; rb < RB; ++rb) out[rows[tt] * out_s0 + rb] = hsum(acc[tt][rb]);
}

#ifdef HOTSWAP_HAVE_BF16_DOT
// The same on bf16 x and A as stored: exact products, fp32 sums, half the
// instructions of widening both operands.
template <int TT, int RB>
void shrink_block_bf16(const c10::BFloat16* x, const int64_t* rows, int64_t x_s0, const c10::BFloat16* a, int64_t a_s1,
                       int IN, float* out, int64_t out_s0) {
  __m512 acc[TT][RB];
  for (int tt = 0; tt < TT; ++tt)
    for (int rb = 0; rb < RB; ++rb) acc[tt][rb] = _mm512_setzero_ps();
  const int chunks = (IN + 31) / 32;
  for (int c = 0; c < chunks; ++c) {
    __m512i av[RB];
    // The next RB rows' same chunk (rows are contiguous: the next block of this adapter's A)
    for (int rb = 0; rb < RB; ++rb) __builtin_prefetch(a + (RB + rb) * a_s1 + c * 32, 0, 3);
    for (int rb = 0; rb < RB; ++rb) av[rb] = load32(a + rb * a_s1, c, IN);
    for (int tt = 0; tt < TT; ++tt) {
      const __m512i xv = load32(x + rows[tt] * x_s0, c, IN);
      for (int rb = 0; rb < RB; ++rb) acc[tt][rb] = dot_bf16(acc[tt][rb], xv, av[rb]);
    }
  }
  for (int tt = 0; tt < TT; ++tt)
    for (int rb = 0; rb < RB; ++rb) out[rows[tt] * out_s0 + rb] = hsum((vf)acc[tt][rb]);
}
#endif

// All `rank` rows of A for a tile of TT tokens (batch rows rows[0..TT)), four rows of A at a time.
template <typename T, int TT>
void shrink_tile(const T* x, const int64_t* rows, int64_t x_s0, const float* xs, int64_t xs_s0, const T* a, int64_t a_s1,
                 int IN, int rank, float* out, int64_t out_s0) {
  int r = 0;
#ifdef HOTSWAP_HAVE_BF16_DOT
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; r + 4 <= rank; r += 4) shrink_block_bf16<TT, 4>(x, rows, x_s0, a + r * a_s1, a_s1, IN, out + r, out_s0);
    for (; r < rank; ++r) shrink_block_bf16<TT, 1>(x, rows, x_s0, a + r * a_s1, a_s1, IN, out + r, out_s0);
    return;
  }
#endif
  for (; r + 4 <= rank; r += 4) shrink_block<T, TT, 4>(xs, xs_s0, a + r * a_s1, a_s1, IN, out + r, rows, out_s0);
  for (; r < rank; ++r) shrink_block<T, TT, 1>(xs, xs_s0, a + r * a_s1, a_s1, IN, out + r, rows, out_s0);
}

template <typename T>
void shrink(const LoraParams& p, const Plan& plan) {
  const std::vector<Tile>& tiles = plan.tiles;
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
      const int64_t* rows = &plan.rows[t.first];
      if (widen)
        for (int tt = 0; tt < t.count; ++tt)
          for (int c = 0; c < in_pad / W; ++c) store(&xs[tt * in_pad + c * W], load_at(xp + rows[tt] * p.in_s0, c, IN));
      const T* a = ap + t.slot * p.w_s0;
      const int rank = p.ranks[t.slot];
      switch (t.count) {
#define HS_CASE(N) \
  case N: shrink_tile<T, N>(xp, rows, p.in_s0, xs.data(), in_pad, a, p.w_s1, IN, rank, op, p.out_s0); break;
        HS_CASE(1) HS_CASE(2) HS_CASE(3) HS_CASE(4)
#undef HS_CASE
      }
      for (int tt = 0; tt < t.count; ++tt) std::fill(op + rows[tt] * p.out_s0 + rank, op + rows[tt] * p.out_s0 + R, 0.f);
    }
  });
}

// ---- expand ------------------------------------------------------------------
//
// B is stored [S, R, OUT]: an adapter's first `rank` rows are one contiguous
// block, so a rank-r adapter reads exactly its r x OUT weights, front to back,
// whatever the slots' rank capacity (a [S, OUT, R] layout pulls a whole cache
// line per output even at rank 8). Accumulation in fp32 from y; y is rounded
// once.

// One token (decode), C full 16-output chunks from chunk c0: the accumulators
// stay in registers while the token's `rank` rows stream past.
template <typename T, int C>
inline void expand_block(int c0, int rank, const T* b, int64_t b_s1, const float* tv, T* y) {
  vf acc[C];
  for (int c = 0; c < C; ++c) acc[c] = load(y + (c0 + c) * W);
  for (int r = 0; r < rank; ++r) {
    const vf tr = splat(tv[r]);
    const T* row = b + r * b_s1 + c0 * W;
    // The rows are `rank` separate streams: fetch each one's next block while this one computes,
    // into every cache level (a non-temporal prefetch read ~25% slower: bench/bench_kernels.py).
    const char* ahead = reinterpret_cast<const char*>(row + C * W);
    for (int k = 0; k < static_cast<int>(C * W * sizeof(T)); k += 64) __builtin_prefetch(ahead + k, 0, 3);
    for (int c = 0; c < C; ++c) acc[c] += tr * load(row + c * W);
  }
  for (int c = 0; c < C; ++c) store(y + (c0 + c) * W, acc[c]);
}

// One token over all OUT outputs: 256 at a time, then the last partial chunks.
template <typename T>
void expand_one(int OUT, int rank, const T* b, int64_t b_s1, const float* tv, T* y) {
  constexpr int C = 256 / W;
  const int full = OUT / W;
  int c = 0;
  for (; c + C <= full; c += C) expand_block<T, C>(c, rank, b, b_s1, tv, y);
  for (; c + 4 <= full; c += 4) expand_block<T, 4>(c, rank, b, b_s1, tv, y);
  for (; c < full; ++c) expand_block<T, 1>(c, rank, b, b_s1, tv, y);
  if (OUT % W) {  // the tail: masked loads
    vf acc = load_at(y, full, OUT);
    for (int r = 0; r < rank; ++r) acc += splat(tv[r]) * load_at(b + r * b_s1, full, OUT);
    store_at(y, full, OUT, acc);
  }
}

// C whole 16-output chunks from output o: a compile-time count, so the NT x C accumulators stay
// in registers (a runtime count spilled them to the stack: 2-3x slower at a shared adapter's 64 tokens).
template <typename T, int NT, int C>
inline void expand_group_block(int64_t o, int rank, const T* b, int64_t b_s1, const float* tp, int64_t t_s0, T* y,
                               int64_t y_s0, const int64_t* rows) {
  vf acc[NT][C];
  for (int u = 0; u < NT; ++u)
    for (int c = 0; c < C; ++c) acc[u][c] = load(y + rows[u] * y_s0 + o + c * W);
  for (int r = 0; r < rank; ++r) {
    const T* row = b + r * b_s1 + o;
    const char* next = reinterpret_cast<const char*>(row + b_s1);  // the next rank row's same block
    for (int k = 0; k < static_cast<int>(C * W * sizeof(T)); k += 64) __builtin_prefetch(next + k, 0, 3);
    vf bv[C];
    for (int c = 0; c < C; ++c) bv[c] = load(row + c * W);
    for (int u = 0; u < NT; ++u) {
      const vf tr = splat(tp[rows[u] * t_s0 + r]);
      for (int c = 0; c < C; ++c) acc[u][c] += tr * bv[c];
    }
  }
  for (int u = 0; u < NT; ++u)
    for (int c = 0; c < C; ++c) store(y + rows[u] * y_s0 + o + c * W, acc[u][c]);
}

// Up to 4 tokens of one slot (batch rows rows[0..NT)), 8 output chunks at a time (6 for 3-4 tokens): each B load
// serves every token of the group.
template <typename T, int NT>
void expand_group(int64_t o0, int64_t o1, int OUT, int rank, const T* b, int64_t b_s1, const float* tp, int64_t t_s0,
                  T* y, int64_t y_s0, const int64_t* rows) {
  constexpr int C = NT <= 2 ? 8 : 6;  // NT x C accumulators
  for (; o0 + C * W <= o1; o0 += C * W) expand_group_block<T, NT, C>(o0, rank, b, b_s1, tp, t_s0, y, y_s0, rows);
  for (int64_t o = o0; o < o1; o += C * W) {  // the last outputs: a partial block, masked at the row's end
    const int c0 = static_cast<int>(o / W), chunks = static_cast<int>(std::min<int64_t>(C, (o1 - o + W - 1) / W));
    vf acc[NT][C];
    for (int u = 0; u < NT; ++u)
      for (int c = 0; c < chunks; ++c) acc[u][c] = load_at(y + rows[u] * y_s0, c0 + c, OUT);
    for (int r = 0; r < rank; ++r) {
      const T* row = b + r * b_s1;
      vf bv[C];
      for (int c = 0; c < chunks; ++c) bv[c] = load_at(row, c0 + c, OUT);
      for (int u = 0; u < NT; ++u) {
        const vf tr = splat(tp[rows[u] * t_s0 + r]);
        for (int c = 0; c < chunks; ++c) acc[u][c] += tr * bv[c];
      }
    }
    for (int u = 0; u < NT; ++u)
      for (int c = 0; c < chunks; ++c) store_at(y + rows[u] * y_s0, c0 + c, OUT, acc[u][c]);
  }
}

#ifdef HOTSWAP_HAVE_BF16_DOT
// Expand on bf16 B with vdpbf16ps, two rank rows per instruction. Each token's t is rounded to bf16 first
// (PEFT's bf16 LoRA rounds lora_A's output to bf16 too) and read as pairs (t[r], t[r+1]); rows r and r+1 of
// a 32-output group are interleaved in registers (one two-source word permute per 16 outputs), so
// each instruction does 32 multiply-adds into 16 outputs kept in natural order. Products are exact and sums
// fp32, as on the widening path, in about half its instructions: 1.3-1.5x its speed hot, on one thread
// (64 tokens over 16 or 64 r16 adapters, 576 -> 576 / 1536 outputs).

// Up to 16 outputs of a row that has n left (none when n <= 0, where load_at's mask would be undefined).
inline vf load_upto(const c10::BFloat16* p, int n) { return n > 0 ? load_at(p, 0, n) : vf{}; }

// Word indices that interleave two rows' 32 outputs: outputs 0-15 as pairs (row r, row r+1), then 16-31.
alignas(64) static const uint16_t kPairIdx[64] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47,
  16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// One pair of rank rows (r0 and the next; SECOND false: r0 alone, an odd rank's last row) into the block's
// accumulators. FULL: every group is whole, so loads need no mask (and the loop no branch that would make
// the compiler keep the accumulators on the stack).
template <int NT, int P, bool FULL, bool SECOND>
__attribute__((always_inline)) inline void pair_step(__m512 (&lo)[NT][P], __m512 (&hi)[NT][P], const c10::BFloat16* r0,
                                                     int64_t b_s1, int left, const uint32_t* const* tq, int q) {
  __m512i tv[NT];
  for (int u = 0; u < NT; ++u) tv[u] = _mm512_set1_epi32(static_cast<int>(tq[u][q]));
  for (int g = 0; g < P; ++g) {
    const __m512i x0 = FULL ? _mm512_loadu_si512(r0 + g * 32) : load32(r0, g, left);
    const __m512i x1 = !SECOND ? _mm512_setzero_si512() : FULL ? _mm512_loadu_si512(r0 + b_s1 + g * 32) : load32(r0 + b_s1, g, left);
    const __m512i bl = _mm512_permutex2var_epi16(x0, _mm512_load_si512(kPairIdx), x1);
    const __m512i bh = _mm512_permutex2var_epi16(x0, _mm512_load_si512(kPairIdx + 32), x1);
    for (int u = 0; u < NT; ++u) {
      lo[u][g] = dot_bf16(lo[u][g], tv[u], bl);
      hi[u][g] = dot_bf16(hi[u][g], tv[u], bh);
    }
  }
}

// NT tokens (rows y[u], t pairs tq[u]) times P groups of 32 outputs from output o: the block's B rows are read
// once for all NT tokens. Without FULL, groups past the row's end (OUT) are masked: P = 1 serves its last outputs.
template <int NT, int P, bool FULL>
inline void expand_pairs_block(int64_t o, int OUT, int rank, const c10::BFloat16* b, int64_t b_s1,
                               const uint32_t* const* tq, c10::BFloat16* const* y) {
  const int left = static_cast<int>(OUT - o);  // outputs of the row from o on
  __m512 lo[NT][P], hi[NT][P];  // outputs g * 32 + 0..15 and + 16..31 of token u
  for (int u = 0; u < NT; ++u)
    for (int g = 0; g < P; ++g) {
      const c10::BFloat16* at = y[u] + o + g * 32;
      lo[u][g] = (__m512)(FULL ? load(at) : load_upto(at, left - g * 32));
      hi[u][g] = (__m512)(FULL ? load(at + W) : load_upto(at + W, left - g * 32 - W));
    }
  const int whole = rank / 2;
  const c10::BFloat16* r0 = b + o;
  for (int q = 0; q < whole; ++q, r0 += 2 * b_s1) {
    // This pair's rows, the next block's outputs: separate streams the hardware prefetcher may not follow.
    for (int k = 0; k < P * 64; k += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(r0 + P * 32) + k, 0, 3);
      __builtin_prefetch(reinterpret_cast<const char*>(r0 + b_s1 + P * 32) + k, 0, 3);
    }
    pair_step<NT, P, FULL, true>(lo, hi, r0, b_s1, left, tq, q);
  }
  // An odd rank's last row: the row after it, past the rank, may hold anything and is not read.
  if (rank % 2) pair_step<NT, P, FULL, false>(lo, hi, r0, b_s1, left, tq, whole);
  for (int u = 0; u < NT; ++u)
    for (int g = 0; g < P; ++g) {
      c10::BFloat16* at = y[u] + o + g * 32;
      if (FULL) {
        store(at, (vf)lo[u][g]);
        store(at + W, (vf)hi[u][g]);
      } else {
        store_at(at, 0, left - g * 32, (vf)lo[u][g]);  // (writes nothing where none is left)
        store_at(at + W, 0, left - g * 32 - W, (vf)hi[u][g]);
      }
    }
}

// NT tokens of one slot over outputs [o0, o1) (o0 a multiple of 32): whole blocks of P groups, then the
// last groups one at a time. P keeps the 2 x NT x P accumulators in registers.
template <int NT>
void expand_pairs(int64_t o0, int64_t o1, int OUT, int rank, const c10::BFloat16* b, int64_t b_s1,
                  const uint32_t* const* tq, c10::BFloat16* const* y) {
  constexpr int P = NT == 1 ? 8 : NT == 2 ? 6 : NT == 3 ? 4 : 3;
  int64_t o = o0;
  for (; o + P * 32 <= o1; o += P * 32) expand_pairs_block<NT, P, true>(o, OUT, rank, b, b_s1, tq, y);
  for (; o + 32 <= o1; o += 32) expand_pairs_block<NT, 1, true>(o, OUT, rank, b, b_s1, tq, y);
  if (o < o1) expand_pairs_block<NT, 1, false>(o, OUT, rank, b, b_s1, tq, y);
}

// A tile's tokens (batch rows rows[0..count)) over outputs [o0, o1), four at a time.
void expand_tile_bf16(int64_t o0, int64_t o1, int OUT, int rank, const c10::BFloat16* b, int64_t b_s1, const float* tp,
                      int64_t t_s0, c10::BFloat16* yp, int64_t y_s0, const int64_t* rows, int count,
                      std::vector<uint32_t>& pairs) {
  // Each token's t rounded to bf16, zeros past the rank (an odd rank's last pair has a zero second half),
  // read as uint32 pairs (t[r], t[r + 1]).
  const int chunks = (rank + W - 1) / W;
  pairs.resize(static_cast<size_t>(count) * chunks * W / 2);
  c10::BFloat16* t16 = reinterpret_cast<c10::BFloat16*>(pairs.data());
  const uint32_t* tq[TE];
  c10::BFloat16* y[TE];
  for (int u = 0; u < count; ++u) {
    for (int c = 0; c < chunks; ++c) store(t16 + (u * chunks + c) * W, load_at(tp + rows[u] * t_s0, c, rank));
    tq[u] = pairs.data() + u * chunks * W / 2;
    y[u] = yp + rows[u] * y_s0;
  }
  int u = 0;
  for (; u + 4 <= count; u += 4) expand_pairs<4>(o0, o1, OUT, rank, b, b_s1, tq + u, y + u);
  switch (count - u) {
    case 3: expand_pairs<3>(o0, o1, OUT, rank, b, b_s1, tq + u, y + u); break;
    case 2: expand_pairs<2>(o0, o1, OUT, rank, b, b_s1, tq + u, y + u); break;
    case 1: expand_pairs<1>(o0, o1, OUT, rank, b, b_s1, tq + u, y + u); break;
  }
}
#endif

template <typename T>
void expand(const LoraParams& p, const Plan& plan) {
  const std::vector<Tile>& tiles = plan.tiles;
  const int OUT = static_cast<int>(p.features);
  const int64_t parts = (OUT + OB - 1) / OB;
  const float* tp = static_cast<const float*>(p.in);
  const T* bp = static_cast<const T*>(p.w);
  T* yp = static_cast<T*>(p.out);
  // Work items: a one-token tile is one item over all outputs (one sequential
  // read of its B block); longer tiles split their outputs into OB-wide parts.
  struct Item {
    int tile;
    int64_t o0, o1;
  };
  std::vector<Item> items;
  for (int i = 0; i < static_cast<int>(tiles.size()); ++i) {
    if (tiles[i].count == 1) {
      items.push_back({i, 0, OUT});
      continue;
    }
    for (int64_t part = 0; part < parts; ++part) items.push_back({i, part * OB, std::min<int64_t>((part + 1) * OB, OUT)});
  }
  run_items(static_cast<int64_t>(items.size()), work(p, tiles), [&](auto take) {
    [[maybe_unused]] std::vector<uint32_t> pairs;  // bf16 t pairs of the item's tokens (bf16 dot path)
    for (int64_t w = take(); w >= 0; w = take()) {
      const Tile& tile = tiles[items[w].tile];
      const int64_t o0 = items[w].o0, o1 = items[w].o1;
      const T* b = bp + tile.slot * p.w_s0;
      const int rank = p.ranks[tile.slot];
      const int64_t* rows = &plan.rows[tile.first];
#ifdef HOTSWAP_HAVE_BF16_DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        expand_tile_bf16(o0, o1, OUT, rank, b, p.w_s1, tp, p.in_s0, yp, p.out_s0, rows, tile.count, pairs);
        continue;
      }
#endif
      if (tile.count == 1) {
        expand_one<T>(OUT, rank, b, p.w_s1, tp + rows[0] * p.in_s0, yp + rows[0] * p.out_s0);
        continue;
      }
      int u = 0;
      for (; u + 4 <= tile.count; u += 4)
        expand_group<T, 4>(o0, o1, OUT, rank, b, p.w_s1, tp, p.in_s0, yp, p.out_s0, rows + u);
      switch (tile.count - u) {  // the last 1-3 tokens also share each B load
        case 3: expand_group<T, 3>(o0, o1, OUT, rank, b, p.w_s1, tp, p.in_s0, yp, p.out_s0, rows + u); break;
        case 2: expand_group<T, 2>(o0, o1, OUT, rank, b, p.w_s1, tp, p.in_s0, yp, p.out_s0, rows + u); break;
        case 1: expand_group<T, 1>(o0, o1, OUT, rank, b, p.w_s1, tp, p.in_s0, yp, p.out_s0, rows + u); break;
      }
    }
  });
}

}  // namespace

void lora_shrink_kernel(const LoraParams& p, Dtype dtype) {
  const Plan planned = plan(p, TS, "lora_shrink");
  // Tokens without LoRA get a zero row; every other row is written by its tile.
  float* op = static_cast<float*>(p.out);
  for (int64_t i = 0; i < p.N; ++i)
    if (p.token_slots[i] < 0) std::fill(op + i * p.out_s0, op + i * p.out_s0 + p.R, 0.f);
  switch (dtype) {
    case Dtype::kFloat: return shrink<float>(p, planned);
    case Dtype::kBFloat16: return shrink<c10::BFloat16>(p, planned);
    case Dtype::kHalf: return shrink<c10::Half>(p, planned);
  }
}

void lora_expand_kernel(const LoraParams& p, Dtype dtype) {
  const Plan planned = plan(p, TE, "lora_expand");
  switch (dtype) {
    case Dtype::kFloat: return expand<float>(p, planned);
    case Dtype::kBFloat16: return expand<c10::BFloat16>(p, planned);
    case Dtype::kHalf: return expand<c10::Half>(p, planned);
  }
}

}  // namespace hotswap
