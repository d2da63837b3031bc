// The inner loops of paged attention, one "engine" per instruction set. The
// driver (paged_attention.cpp) walks a tile's keys in blocks of 16 and calls:
//   set_query(m, q)        query vector m of the tile
//   begin_keys(base, off)  a block of 16 key rows (row i at base + off[i])
//   scores(m)              the 16 scores of vector m for that block, base-2 logits
//   begin_values(base, off, nk), accumulate(m, p)   o[m] += p[0..15] @ V block
//   finish(m, out, inv)    out = o[m] * inv in the output dtype
#pragma once

#include "vec.h"

namespace hotswap {

constexpr int KB = 16;      // keys per block (= lanes of a score vector)
constexpr int MAX_M = 32;   // query vectors per work item
constexpr int MAX_NC = 16;  // head_dim <= 256

// Any dtype, any ISA: rows widened to fp32 once per block, fp32 FMAs.
// NC = head_dim / 16 rounded up, or 0 for "any" (runtime count, arrays sized for the maximum).
template <typename T, int NC>
struct GenericEngine {
  static constexpr int CAP = NC ? NC : MAX_NC;
  const int nc, D;
  int nk = 0;
  vf q[MAX_M][CAP], o[MAX_M][CAP];  // query * scale * log2 e; output accumulators
  vf kb[KB][CAP], vb[KB][CAP];      // the current block of keys / values in fp32

  explicit GenericEngine(int d) : nc(NC ? NC : (d + W - 1) / W), D(d) {}
  // Loop bound: a constant when NC is (so accumulators stay in registers).
  int chunks() const { return NC ? NC : nc; }

  void set_query(int m, const T* qp, float qscale) {
    for (int c = 0; c < chunks(); ++c) {
      q[m][c] = load_at(qp, c, D) * qscale;
      o[m][c] = vf{};
    }
  }

  void widen(vf (*dst)[CAP], const T* base, const int64_t* off, int n) {
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < chunks(); ++c) dst[i][c] = load_at(base + off[i], c, D);
    // Zeros past the end: a masked key's probability is 0, and 0 * garbage could be NaN.
    for (int i = n; i < KB; ++i)
      for (int c = 0; c < chunks(); ++c) dst[i][c] = vf{};
  }

  void begin_keys(const T* base, const int64_t* off, int n) { widen(kb, base, off, n); }

  vf scores(int m) const {
    vf prod[KB];
    for (int i = 0; i < KB; ++i) {
      vf acc = q[m][0] * kb[i][0];
      for (int c = 1; c < chunks(); ++c) acc += q[m][c] * kb[i][c];
      prod[i] = acc;
    }
    return reduce16(prod);
  }

  void begin_values(const T* base, const int64_t* off, int n) {
    widen(vb, base, off, n);
    nk = n;
  }

  void accumulate(int m, const float* p) {
    vf acc[CAP];
    for (int c = 0; c < chunks(); ++c) acc[c] = o[m][c];
    for (int i = 0; i < nk; ++i)
      for (int c = 0; c < chunks(); ++c) acc[c] += p[i] * vb[i][c];
    for (int c = 0; c < chunks(); ++c) o[m][c] = acc[c];
  }

  void finish(int m, T* op, float inv) const {
    for (int c = 0; c < chunks(); ++c) store_at(op, c, D, o[m][c] * inv);
  }
};

#ifdef HOTSWAP_HAVE_BF16_DOT

// bf16 on CPUs with AVX512-BF16 (vdpbf16ps: 32 bf16 products summed pairwise
// into 16 fp32 lanes). Keys are used as stored: q.k is exact products with an
// fp32 sum. For P @ V the probabilities are rounded to bf16 (after the fp32
// softmax, as torch's CPU flash attention does) and two value rows are
// interleaved so each instruction takes a pair of keys.
// NB = head_dim / 32 rounded up, or 0 for "any".
template <int NB>
struct Bf16DotEngine {
  static constexpr int CAP = NB ? NB : MAX_NC / 2;
  const int nb, nco, D;
  const __mmask32 tail;  // valid lanes of the last 32-element chunk
  const bool ragged;     // head_dim not a multiple of 32: the last chunk needs the mask
  int npairs = 0;
  float qscale = 1.f;
  __m512i q[MAX_M][CAP];          // query rows as stored (bf16), zero padded
  vf o[MAX_M][2 * CAP];
  const c10::BFloat16* krow[KB];
  __m512i vpair[KB / 2][2 * CAP];  // [pair][16 dims]: (v[2i][d], v[2i+1][d]) for 16 dims d

  explicit Bf16DotEngine(int d)
      : nb(NB ? NB : (d + 31) / 32), nco((d + W - 1) / W), D(d),
        tail(static_cast<__mmask32>((1ull << (d % 32)) - 1)), ragged(d % 32 != 0) {}
  // Loop bounds, constants when NB is (so accumulators stay in registers). With
  // NB fixed the output runs over 2 * NB chunks; past head_dim they stay zero.
  int n32() const { return NB ? NB : nb; }
  int n16() const { return NB ? 2 * NB : 2 * nb; }

  __m512i load32(const c10::BFloat16* p, int c) const {
    return c + 1 < n32() || !ragged ? _mm512_loadu_si512(p + 32 * c) : _mm512_maskz_loadu_epi16(tail, p + 32 * c);
  }

  void set_query(int m, const c10::BFloat16* qp, float scale) {
    qscale = scale;  // applied to the fp32 scores: the bf16 query stays exact
    for (int c = 0; c < n32(); ++c) q[m][c] = load32(qp, c);
    for (int c = 0; c < n16(); ++c) o[m][c] = vf{};
  }

  void begin_keys(const c10::BFloat16* base, const int64_t* off, int) {
    for (int i = 0; i < KB; ++i) krow[i] = base + off[i];  // padded offsets stay readable
  }

  vf scores(int m) const {
    vf prod[KB];
    for (int i = 0; i < KB; ++i) {
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)q[m][0], (__m512bh)load32(krow[i], 0));
      for (int c = 1; c < n32(); ++c) acc = _mm512_dpbf16_ps(acc, (__m512bh)q[m][c], (__m512bh)load32(krow[i], c));
      prod[i] = (vf)acc;
    }
    return reduce16(prod) * qscale;
  }

  void begin_values(const c10::BFloat16* base, const int64_t* off, int n) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    npairs = (n + 1) / 2;
    for (int i = 0; i < npairs; ++i) {
      const c10::BFloat16* a = base + off[2 * i];
      const c10::BFloat16* b = base + off[2 * i + 1];
      const bool odd = 2 * i + 1 >= n;  // last key alone: pair it with zeros, not a padded row
      for (int c = 0; c < n32(); ++c) {
        const __m512i za = load32(a, c), zb = odd ? _mm512_setzero_si512() : load32(b, c);
        vpair[i][2 * c] = _mm512_permutex2var_epi16(za, lo, zb);
        vpair[i][2 * c + 1] = _mm512_permutex2var_epi16(za, hi, zb);
      }
    }
  }

  void accumulate(int m, const float* p) {
    alignas(32) uint32_t pairs[KB / 2];  // probabilities of keys (2i, 2i+1) as a bf16 pair
    _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
    __m512 acc[2 * CAP];
    for (int c = 0; c < n16(); ++c) acc[c] = (__m512)o[m][c];
    for (int i = 0; i < npairs; ++i) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[i]));
      for (int c = 0; c < n16(); ++c) acc[c] = _mm512_dpbf16_ps(acc[c], pb, (__m512bh)vpair[i][c]);
    }
    for (int c = 0; c < n16(); ++c) o[m][c] = (vf)acc[c];
  }

  void finish(int m, c10::BFloat16* op, float inv) const {
    for (int c = 0; c < nco; ++c) store_at(op, c, D, o[m][c] * inv);
  }
};
#endif

}  // namespace hotswap
