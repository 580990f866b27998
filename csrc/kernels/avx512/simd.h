// AVX-512 helpers shared by the AVX-512 and AMX translation units (both compiled with the
// AVX-512 flags). Everything is `static inline` (internal linkage): see kernels/act.h for why.
// Code unpacking follows the planes of kernels/tiled.h with R = 16 rows per group.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../act.h"
#include "../kernels.h"
#include "../tiled.h"

namespace tandem::avx512 {

inline constexpr int R = 16;  // rows per group: one zmm lane per row

static inline int min_int(int a, int b) { return a < b ? a : b; }

static inline __m512i load(const uint8_t* p) { return _mm512_loadu_si512(p); }

static inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc[n] += sum_i w[n][i] * a[i], i < 4: 16 rows x 4 codes (u8) times 4 activations (s8).
static inline __m512i dot4(__m512i acc, __m512i w, const uint8_t* a) { return _mm512_dpbusd_epi32(acc, w, bcast4(a)); }

static inline __m512 f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

static inline __m512 u8x16_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
static inline __m512 s8x16_to_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
static inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

static inline float load_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

static inline __m512i low_nibbles(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0f)); }
static inline __m512i high_nibbles(__m512i v) {
  return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f));
}

// codes | bit 4 taken from bit G of each byte of a bit-plane tile-row (5-bit formats).
// 16-bit shifts are safe: the mask keeps bit 4 of each byte, which came from the same byte.
template <int G>
static inline __m512i with_bit4(__m512i codes, __m512i bits) {
  __m512i s;
  if constexpr (G <= 4) s = _mm512_slli_epi16(bits, 4 - G);
  else s = _mm512_srli_epi16(bits, G - 4);
  return _mm512_ternarylogic_epi32(codes, s, _mm512_set1_epi8(0x10), 0xf8);  // codes | (s & m)
}

// codes | bits 4-5 taken from bits 2G, 2G+1 of each byte of a crumb-plane tile-row (Q6_K).
template <int G>
static inline __m512i with_crumb(__m512i codes, __m512i crumbs) {
  __m512i s;
  if constexpr (2 * G <= 4) s = _mm512_slli_epi16(crumbs, 4 - 2 * G);
  else s = _mm512_srli_epi16(crumbs, 2 * G - 4);
  return _mm512_ternarylogic_epi32(codes, s, _mm512_set1_epi8(0x30), 0xf8);
}

// Q4_K / Q5_K: the 6-bit scale (or min) j of 16 rows from the 12 packed planes (byte b of row n
// at planes + 16 b + n): j < 4 low 6 bits of bytes j (scales) / j + 4 (mins); j >= 4 a nibble of
// byte j + 4 plus the top 2 bits of byte j - 4 (scales) / j (mins).
static inline __m128i k_scale(const uint8_t* planes, int j) {
  const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15);
  if (j < 4) return _mm_and_si128(load16(planes + 16 * j), m6);
  const __m128i lo = _mm_and_si128(load16(planes + 16 * (j + 4)), m4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(load16(planes + 16 * (j - 4)), 2), _mm_set1_epi8(0x30));
  return _mm_or_si128(lo, hi);
}
static inline __m128i k_min(const uint8_t* planes, int j) {
  const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15);
  if (j < 4) return _mm_and_si128(load16(planes + 16 * (j + 4)), m6);
  const __m128i lo = _mm_and_si128(_mm_srli_epi16(load16(planes + 16 * (j + 4)), 4), m4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(load16(planes + 16 * j), 2), _mm_set1_epi8(0x30));
  return _mm_or_si128(lo, hi);
}

// fp32 -> bf16, round to nearest even (as torch and the scalar f32_to_bf16 do).
static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// Two fp32 vectors -> one bf16 tile-row: dword n = (bf16 a[n], bf16 b[n]) (a in the low half).
static inline __m512i bf16_pairs(__m512 a, __m512 b) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // words 0..15 from a, 16..31 from b
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, both);
}

// exp(x) to ~2 ulp: x = n ln2 + f (ln2 split in two for exactness), exp(f) by a degree-6
// polynomial on |f| <= ln2 / 2, then scaled by 2^n (vscalefps: overflow -> inf, underflow -> 0).
static inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Declarations shared by the AVX-512 and AMX tables.
void swiglu(float* h, const float* up, int n);
void prep_f32(const float* x, int K, uint8_t* dst);
void prep_bf16(const float* x, int K, uint8_t* dst);
void prep_q8_32(const float* x, int K, uint8_t* dst);
void prep_q8_k(const float* x, int K, uint8_t* dst);
void prep_q8_row(const float* x, int K, uint8_t* dst);
void prep_q8_64(const float* x, int K, uint8_t* dst);
void fill_table(KernelTable& t);  // the AVX-512 kernels for every format

}  // namespace tandem::avx512
