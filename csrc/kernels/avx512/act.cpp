// Activation preparation with AVX-512 (layouts: kernels/act.h). Runs once per (token, expert)
// position and call, so it only has to be cheap next to the matmul, not optimal.
#include "simd.h"

namespace tandem::avx512 {

namespace {

// Loads x[i .. i + 16) with zeros past K.
inline __m512 load_x(const float* x, int i, int K) {
  if (i + 16 <= K) return _mm512_loadu_ps(x + i);
  if (i >= K) return _mm512_setzero_ps();
  return _mm512_maskz_loadu_ps(__mmask16((1u << (K - i)) - 1), x + i);
}

inline __m512 abs_ps(__m512 v) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff))); }

float amax(const float* x, int i0, int i1, int K) {
  __m512 m = _mm512_setzero_ps();
  for (int i = i0; i < i1; i += 16) m = _mm512_max_ps(m, abs_ps(load_x(x, i, K)));
  return _mm512_reduce_max_ps(m);
}

// q[i0 .. i1) = round(x / d) as int8 (i1 - i0 a multiple of 16); returns sum(q).
int quantize(const float* x, int i0, int i1, int K, float inv_d, int8_t* q) {
  const __m512 s = _mm512_set1_ps(inv_d);
  __m512i sum = _mm512_setzero_si512();
  for (int i = i0; i < i1; i += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load_x(x, i, K), s));  // nearest even
    sum = _mm512_add_epi32(sum, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
  }
  return _mm512_reduce_add_epi32(sum);
}

inline float inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

}  // namespace

void prep_f32(const float* x, int K, uint8_t* dst) { std::memcpy(dst, x, size_t(K) * 4); }

void swiglu(float* h, const float* up, int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, h + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

void prep_bf16(const float* x, int K, uint8_t* dst) {
  for (int i = 0; i < act::bf16_k(K); i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * size_t(i)), to_bf16(load_x(x, i, K)));
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

void prep_q8_row(const float* x, int K, uint8_t* dst) {
  const int Kp = act::q8_k(K);
  const float d = amax(x, 0, Kp, K) / 127.0f;
  const int sum = quantize(x, 0, Kp, K, inverse(d), reinterpret_cast<int8_t*>(dst));
  std::memcpy(dst + act::q8_row_d(K), &d, 4);
  std::memcpy(dst + act::q8_row_sum(K), &sum, 4);
}

void prep_q8_64(const float* x, int K, uint8_t* dst) {
  auto* q = reinterpret_cast<int8_t*>(dst);
  auto* d = reinterpret_cast<float*>(dst + act::q8_64_d(K));
  for (int b = 0; b < act::q8_k(K) / 64; ++b) {
    d[b] = amax(x, 64 * b, 64 * b + 64, K) / 127.0f;
    quantize(x, 64 * b, 64 * b + 64, K, inverse(d[b]), q);
  }
}

}  // namespace tandem::avx512
