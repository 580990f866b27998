// Activation preparation with AVX2 (layouts: kernels/act.h): fp32 rows for BF16 weights, Q8
// blocks for the integer formats.
#include <immintrin.h>

#include <cstring>

#include "../act.h"
#include "avx2.h"

namespace tandem::avx2 {

namespace {

inline __m256 load_x(const float* x, int i, int K) {
  if (i + 8 <= K) return _mm256_loadu_ps(x + i);
  alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int j = 0; i + j < K && j < 8; ++j) tail[j] = x[i + j];
  return _mm256_load_ps(tail);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

float amax(const float* x, int i0, int i1, int K) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  for (int i = i0; i < i1; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(load_x(x, i, K), abs_mask));
  return hmax(m);
}

// q[i0 .. i1) = round(x / d) (i1 - i0 a multiple of 16); returns sum(q).
int quantize(const float* x, int i0, int i1, int K, float inv_d, int8_t* q) {
  const __m256 s = _mm256_set1_ps(inv_d);
  __m256i sum = _mm256_setzero_si256();
  for (int i = i0; i < i1; i += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load_x(x, i, K), s));  // nearest even
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load_x(x, i + 8, K), s));
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);  // 16 x int16, in order
    const __m128i p = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), p);
  }
  return hsum(sum);
}

inline float inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

}  // namespace

void prep_f32(const float* x, int K, uint8_t* dst) { std::memcpy(dst, x, size_t(K) * 4); }

namespace {

// exp(x) as in avx512/simd.h; 2^n built in the exponent bits, n clamped so it stays a normal
// power of two (beyond +-88 the result saturates to inf / 0 through the clamp of x).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), f);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace

void swiglu(float* h, const float* up, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(h + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) {
    alignas(32) float g[8] = {h[i], 0, 0, 0, 0, 0, 0, 0};
    alignas(32) float e[8];
    _mm256_store_ps(e, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_load_ps(g))));
    h[i] = h[i] / (1.0f + e[0]) * up[i];
  }
}

void prep_q8_32(const float* x, int K, uint8_t* dst) {
  const int Kp = act::q8_k(K);
  auto* q = reinterpret_cast<int8_t*>(dst);
  auto* d = reinterpret_cast<float*>(dst + act::q8_32_d(K));
  auto* s = reinterpret_cast<float*>(dst + act::q8_32_s(K));
  float total = 0.0f;
  for (int b = 0; b < Kp / 32; ++b) {
    const float db = amax(x, 32 * b, 32 * b + 32, K) / 127.0f;
    const int sum = quantize(x, 32 * b, 32 * b + 32, K, inverse(db), q);
    d[b] = db;
    s[b] = db * float(sum);
    total += s[b];
  }
  std::memcpy(dst + act::q8_32_total(K), &total, 4);
}

void prep_q8_k(const float* x, int K, uint8_t* dst) {
  auto* q = reinterpret_cast<int8_t*>(dst);
  auto* d = reinterpret_cast<float*>(dst + act::q8_k_d(K));
  auto* s16 = reinterpret_cast<float*>(dst + act::q8_k_s16(K));
  for (int b = 0; b < K / 256; ++b) {
    d[b] = amax(x, 256 * b, 256 * b + 256, K) / 127.0f;
    const float inv = inverse(d[b]);
    for (int j = 0; j < 16; ++j) {
      const int i = 256 * b + 16 * j;
      s16[i / 16] = float(quantize(x, i, i + 16, K, inv, q));
    }
  }
}

}  // namespace tandem::avx2
