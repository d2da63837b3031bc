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
    for (int64_t w = take(); w >= 0; w = take()) {
      const Tile& tile = tiles[items[w].tile];
      const int64_t o0 = items[w].o0, o1 = items[w].o1;
      const T* b = bp + tile.slot * p.w_s0;
      const int rank = p.ranks[tile.slot];
      const int64_t* rows = &plan.rows[tile.first];
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
