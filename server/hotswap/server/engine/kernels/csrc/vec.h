// Portable 16-lane fp32 vectors for the hotswap CPU kernels.
//
// GCC/Clang vector extensions compile to one AVX-512 register, two AVX2 ones,
// or NEON/scalar code elsewhere, so one source serves every -march=native
// build. Intrinsics appear only where the extensions have no spelling
// (fp16 <-> fp32 conversion, masked loads); each has a portable fallback.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// vdpbf16ps (AVX512-BF16): 32 bf16 products summed pairwise into 16 fp32 lanes.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HOTSWAP_HAVE_BF16_DOT 1
#endif

namespace hotswap {

constexpr int W = 16;  // lanes per vector

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#if defined(__clang__)
#define HS_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define HS_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// ---- loads: 16 elements of T -> fp32 -------------------------------------

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf load(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widening is a shift.
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

inline vf load(const c10::Half* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  vf v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The first n (< 16) elements, zeros after: never reads past p[n - 1], so a
// row's tail or a rank below 16 cannot touch memory (or NaNs) beyond it.
template <typename T>
inline vf load_n(const T* p, int n) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  if constexpr (sizeof(T) == 4) {
    return (vf)_mm512_maskz_loadu_ps(m, p);
  } else {
    __m256i raw = _mm256_maskz_loadu_epi16(m, p);
    T tmp[W];
    std::memcpy(tmp, &raw, sizeof tmp);
    return load(tmp);
  }
#else
  vf v{};
  for (int i = 0; i < n; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// ---- stores: fp32 -> 16 elements of T -------------------------------------

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// Round to nearest even, as c10::BFloat16(float) does; NaN becomes the quiet NaN 0x7fc0.
inline vh bf16_rne(vf v) {
  vu u = (vu)v;
  vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = ((u & 0x7fffffffu) > 0x7f800000u) ? vu{} + 0x7fc0u : r;
  return __builtin_convertvector(r, vh);
}

inline void store(c10::BFloat16* p, vf v) {
#if defined(HOTSWAP_HAVE_BF16_DOT)
  // One vcvtneps2bf16 rounds the same way, except that it keeps a NaN's payload and flushes
  // denormal inputs to zero: lanes holding either (rare) take the emulated rounding instead.
  const __m512 x = (__m512)v;
  __m256i r = (__m256i)_mm512_cvtneps_pbh(x);
  const __mmask16 odd = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) |
                        (_mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(1.17549435e-38f), _CMP_LT_OQ) &
                         _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_OQ));
  if (odd) {
    const vh h = bf16_rne(v);
    __m256i e;
    std::memcpy(&e, &h, sizeof e);
    r = _mm256_mask_blend_epi16(odd, r, e);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
#else
  const vh h = bf16_rne(v);
  std::memcpy(p, &h, sizeof h);
#endif
}

inline void store(c10::Half* p, vf v) {
#if defined(__AVX512F__)
  __m256i h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#elif defined(__F16C__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < W; ++i) p[i] = c10::Half(v[i]);
#endif
}

template <typename T>
inline void store_n(T* p, vf v, int n) {
  for (int i = 0; i < n; ++i) p[i] = T(v[i]);
}

// Row helpers: a row of n elements, tail handled by the partial forms.
template <typename T>
inline vf load_at(const T* p, int c, int n) {  // chunk c of a row of n elements
  const int left = n - c * W;
  return left >= W ? load(p + c * W) : load_n(p + c * W, left);
}

// The same for a row stored with cap >= n elements (a slot's rank capacity):
// while a whole vector fits in the storage it is read unmasked and the lanes
// past n are zeroed in registers. Masked loads that miss the cache are several
// times slower on Zen (measured: LoRA expand at rank 8, cold).
template <typename T>
inline vf load_at(const T* p, int c, int n, int cap) {
  const int left = n - c * W;
  if (left >= W) return load(p + c * W);
  if (cap - c * W >= W) {
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return lane < left ? load(p + c * W) : vf{};
  }
  return load_n(p + c * W, left);
}

template <typename T>
inline void store_at(T* p, int c, int n, vf v) {
  const int left = n - c * W;
  if (left >= W) store(p + c * W, v); else store_n(p + c * W, v, left);
}

// ---- reductions ------------------------------------------------------------

inline float hsum(vf v) {
  vf a = v + HS_SHUFFLE2(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  a = a + HS_SHUFFLE2(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
  a = a + HS_SHUFFLE2(a, a, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
  return a[0] + a[1];
}

inline float hmax(vf v) {
  vf a = vmax(v, HS_SHUFFLE2(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  a = vmax(a, HS_SHUFFLE2(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3));
  a = vmax(a, HS_SHUFFLE2(a, a, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1));
  return a[0] > a[1] ? a[0] : a[1];
}

// Lanes 0..7 hold the pairwise sums of a's lanes, lanes 8..15 those of b's.
inline vf pair_sum(vf a, vf b) {
  return HS_SHUFFLE2(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         HS_SHUFFLE2(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Sixteen horizontal sums at once: lane i of the result is the sum of p[i]'s
// lanes. 15 pair_sums instead of 16 separate reductions of 4 steps each.
inline vf reduce16(const vf* p) {
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) a[i] = pair_sum(p[2 * i], p[2 * i + 1]);
  for (int i = 0; i < 4; ++i) b[i] = pair_sum(a[2 * i], a[2 * i + 1]);
  for (int i = 0; i < 2; ++i) c[i] = pair_sum(b[2 * i], b[2 * i + 1]);
  return pair_sum(c[0], c[1]);
}

// In-place 16x16 transpose (Eklundh): at each stage swap the off-diagonal
// s x s sub-blocks of every 2s x 2s block; 4 stages of 16 two-input shuffles.
inline void transpose16(vf* r) {
#define HS_STAGE(S, LO, HI)                                       \
  for (int i = 0; i < W; ++i) {                                   \
    if (i & S) continue;                                          \
    vf a = r[i], b = r[i + S];                                    \
    r[i] = HS_SHUFFLE2(a, b, LO);                                 \
    r[i + S] = HS_SHUFFLE2(a, b, HI);                             \
  }
#define HS_L8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HS_H8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define HS_L4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HS_H4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define HS_L2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HS_H2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define HS_L1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HS_H1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
  HS_STAGE(8, HS_L8, HS_H8)
  HS_STAGE(4, HS_L4, HS_H4)
  HS_STAGE(2, HS_L2, HS_H2)
  HS_STAGE(1, HS_L1, HS_H1)
#undef HS_STAGE
}

// ---- exp2 -------------------------------------------------------------------

// 2^x for x <= 0 (scores minus their running max), ~1 ulp: x = n + f with
// |f| <= 1/2, 2^f by its degree-7 Taylor polynomial (error < 6e-9), 2^n built
// in the exponent bits. Below -126 (and for -inf, i.e. masked keys) gives 0.
inline vf exp2v(vf x) {
  const vi tiny = x < splat(-126.f);
  x = tiny ? splat(-126.f) : x;
  const vf n = (x + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  const vf f = (x - n) * 0.6931471805599453f;   // f * ln 2: the polynomial is e^y
  vf p = splat(1.f / 5040.f);
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf r = p * (vf)e;
  return tiny ? vf{} : r;
}

// tanh(x), ~2 ulp: sign(x) (1 - e) / (1 + e) with e = e^(-2|x|) = 2^(-2|x| log2 e) (exp2v takes x <= 0;
// |x| past 44 gives e = 0, so +-1, and +-inf too); below |x| = 1/16, where 1 - e would cancel, its
// odd series to x^7 (next term < 1e-10 relative).
inline vf tanhv(vf x) {
  const vf ax = x < 0.f ? -x : x;
  const vf e = exp2v(ax * -2.8853900817779268f);
  const vf big = (1.f - e) / (1.f + e);
  const vf x2 = ax * ax;
  const vf small = ax * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f + x2 * (-17.f / 315.f))));
  const vf t = ax < 0.0625f ? small : big;
  return x < 0.f ? -t : t;
}

#ifdef HOTSWAP_HAVE_BF16_DOT
// Chunk c (32 elements) of a bf16 row of n elements, zeros past the end.
inline __m512i load32(const c10::BFloat16* p, int c, int n) {
  const int left = n - 32 * c;
  return left >= 32 ? _mm512_loadu_si512(p + 32 * c)
                    : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << left) - 1), p + 32 * c);
}

// The same for a row stored with cap >= n elements: unmasked read when it fits.
inline __m512i load32(const c10::BFloat16* p, int c, int n, int cap) {
  const int left = n - 32 * c;
  if (left >= 32) return _mm512_loadu_si512(p + 32 * c);
  const __mmask32 m = static_cast<__mmask32>((1ull << left) - 1);
  return cap - 32 * c >= 32 ? _mm512_maskz_mov_epi16(m, _mm512_loadu_si512(p + 32 * c)) : _mm512_maskz_loadu_epi16(m, p + 32 * c);
}

inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
#endif

}  // namespace hotswap
