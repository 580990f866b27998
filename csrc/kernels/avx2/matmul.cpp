// The AVX2 matmul: the AVX-512 kernel's scheme (see avx512/matmul.cpp) with 8 rows per group
// (one ymm lane per row). AVX2 has no vpdpbusd: u8 x s8 products go through vpmaddubsw (pairs
// to int16) and vpmaddwd (to int32). vpmaddubsw saturates at 32767, so codes stay below 64
// there (4/5/6-bit formats); the 8-bit formats (INT8, Q8_0) use |q| x sign(a, q) instead, which
// bounds each pair by 2 * 128 * 127, and need no offset correction. BF16 weights widen to fp32
// and multiply fp32 activations with FMA.
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../act.h"
#include "../kernels.h"
#include "../tiled.h"
#include "avx2.h"

namespace tandem::avx2 {

namespace {

using namespace tiled;

constexpr int R = 8;

inline int min_int(int a, int b) { return a < b ? a : b; }
inline __m256i load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline float load_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}
inline __m256 f16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256 u8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 s8x8_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// acc[n] += sum_i w[n][i] * a[i] for codes w < 64.
inline __m256i dot4(__m256i acc, __m256i w, const uint8_t* a) {
  const __m256i p = _mm256_maddubs_epi16(w, bcast4(a));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
// acc[n] += sum_i q[n][i] * a[i] for signed q = code ^ 0x80.
inline __m256i dot4_signed(__m256i acc, __m256i codes, const uint8_t* a) {
  const __m256i q = _mm256_xor_si256(codes, _mm256_set1_epi8(char(0x80)));
  const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(bcast4(a), q));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0f)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f)); }

template <int G>
inline __m256i with_bit4(__m256i codes, __m256i bits) {
  __m256i s;
  if constexpr (G <= 4) s = _mm256_slli_epi16(bits, 4 - G);
  else s = _mm256_srli_epi16(bits, G - 4);
  return _mm256_or_si256(codes, _mm256_and_si256(s, _mm256_set1_epi8(0x10)));
}
template <int G>
inline __m256i with_crumb(__m256i codes, __m256i crumbs) {
  __m256i s;
  if constexpr (2 * G <= 4) s = _mm256_slli_epi16(crumbs, 4 - 2 * G);
  else s = _mm256_srli_epi16(crumbs, 2 * G - 4);
  return _mm256_or_si256(codes, _mm256_and_si256(s, _mm256_set1_epi8(0x30)));
}

// Q4_K / Q5_K 6-bit scale and min j of 8 rows (planes of 8 bytes; see avx512/simd.h).
inline __m128i k_scale(const uint8_t* planes, int j) {
  const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15);
  if (j < 4) return _mm_and_si128(load8(planes + 8 * j), m6);
  const __m128i lo = _mm_and_si128(load8(planes + 8 * (j + 4)), m4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(load8(planes + 8 * (j - 4)), 2), _mm_set1_epi8(0x30));
  return _mm_or_si128(lo, hi);
}
inline __m128i k_min(const uint8_t* planes, int j) {
  const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15);
  if (j < 4) return _mm_and_si128(load8(planes + 8 * (j + 4)), m6);
  const __m128i lo = _mm_and_si128(_mm_srli_epi16(load8(planes + 8 * (j + 4)), 4), m4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(load8(planes + 8 * j), 2), _mm_set1_epi8(0x30));
  return _mm_or_si128(lo, hi);
}

template <int NT>
struct Acts {
  const uint8_t* a[NT];
};

template <int NT>
struct IntSums {
  __m256i x[NT], y[NT];
  IntSums() {
    for (int t = 0; t < NT; ++t) x[t] = y[t] = _mm256_setzero_si256();
  }
  __m256 sum(int t) const { return _mm256_cvtepi32_ps(_mm256_add_epi32(x[t], y[t])); }
};

template <int NT>
inline void dot_pair(IntSums<NT>& s, __m256i lo, __m256i hi, const Acts<NT>& a, size_t at) {
  for (int t = 0; t < NT; ++t) {
    s.x[t] = dot4(s.x[t], lo, a.a[t] + at);
    s.y[t] = dot4(s.y[t], hi, a.a[t] + at + 4);
  }
}

template <class Fmt>
struct Vec;

// BF16 with fp32 activations: tile-row j = (w[n][2j], w[n][2j + 1]) as bf16 pairs.
template <>
struct Vec<BF16> {
  static int chunks(int K) { return bf16_kp(K) / 32; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int c, const Acts<NT>& a, __m256 acc[NT]) {
    const uint8_t* w = g + size_t(c) * 16 * 32;
    const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
    for (int j = 0; j < 16; ++j) {
      const int k = 32 * c + 2 * j;
      if (k >= K) break;  // fp32 activations are not padded
      const __m256i v = load(w + 32 * j);
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
      for (int t = 0; t < NT; ++t) {
        const float* x = reinterpret_cast<const float*>(a.a[t]);
        acc[t] = _mm256_fmadd_ps(even, _mm256_set1_ps(x[k]), acc[t]);
        if (k + 1 < K) acc[t] = _mm256_fmadd_ps(odd, _mm256_set1_ps(x[k + 1]), acc[t]);
      }
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m256[NT]) {}
};

template <>
struct Vec<INT8> {
  static int chunks(int K) { return int8_kp(K) / 32; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int b, const Acts<NT>& a, __m256 acc[NT]) {
    const uint8_t* w = g + int8_codes(R) + size_t(b) * 8 * 32;
    IntSums<NT> s;
    for (int i = 0; i < 8; i += 2) {
      const __m256i w0 = load(w + 32 * i), w1 = load(w + 32 * (i + 1));
      for (int t = 0; t < NT; ++t) {
        s.x[t] = dot4_signed(s.x[t], w0, a.a[t] + 32 * size_t(b) + 4 * size_t(i));
        s.y[t] = dot4_signed(s.y[t], w1, a.a[t] + 32 * size_t(b) + 4 * size_t(i) + 4);
      }
    }
    for (int t = 0; t < NT; ++t) {
      const float d = load_f32(a.a[t] + act::q8_32_d(K) + 4 * size_t(b));
      acc[t] = _mm256_fmadd_ps(s.sum(t), _mm256_set1_ps(d), acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t* g, int, const Acts<NT>&, __m256 acc[NT]) {
    const __m256 scale = _mm256_loadu_ps(reinterpret_cast<const float*>(g));
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_mul_ps(acc[t], scale);
  }
};

template <>
struct Vec<INT4> {
  static int chunks(int K) { return K / 64; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int c, const Acts<NT>& a, __m256 acc[NT]) {
    const uint8_t* p = g + size_t(c) * int4_chunk(R);
    const __m256 d = _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    __m256 f[NT];
    for (int half = 0; half < 2; ++half) {
      const int b = 2 * c + half;
      IntSums<NT> s;
      for (int i = 0; i < 4; ++i) {
        const __m256i v = load(p + 32 + 32 * size_t(4 * half + i));
        dot_pair(s, low_nibbles(v), high_nibbles(v), a, 32 * size_t(b) + 8 * size_t(i));
      }
      for (int t = 0; t < NT; ++t) {
        const float da = load_f32(a.a[t] + act::q8_32_d(K) + 4 * size_t(b));
        const float sa = load_f32(a.a[t] + act::q8_32_s(K) + 4 * size_t(b));
        const __m256 v = _mm256_fmadd_ps(s.sum(t), _mm256_set1_ps(da), _mm256_set1_ps(-8.0f * sa));
        f[t] = half == 0 ? v : _mm256_add_ps(f[t], v);
      }
    }
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(f[t], d, acc[t]);
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m256[NT]) {}
};

template <class Fmt>
struct Block32 {
  static constexpr bool five = std::is_same_v<Fmt, Q5_0>;
  static int chunks(int K) { return K / 32; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int b, const Acts<NT>& a, __m256 acc[NT]) {
    IntSums<NT> s;
    const size_t at = 32 * size_t(b);
    __m256 d;
    float offset = 0.0f;
    if constexpr (five) {
      const uint8_t* p = g + size_t(b) * q5_0_chunk(R);
      const __m256i bits = load(p + q5_0_bits(R));
      d = f16x8(g + q5_0_dplane(R, K) + 16 * size_t(b));
      const __m256i v0 = load(p), v1 = load(p + 32), v2 = load(p + 64), v3 = load(p + 96);
      dot_pair(s, with_bit4<0>(low_nibbles(v0), bits), with_bit4<1>(high_nibbles(v0), bits), a, at);
      dot_pair(s, with_bit4<2>(low_nibbles(v1), bits), with_bit4<3>(high_nibbles(v1), bits), a, at + 8);
      dot_pair(s, with_bit4<4>(low_nibbles(v2), bits), with_bit4<5>(high_nibbles(v2), bits), a, at + 16);
      dot_pair(s, with_bit4<6>(low_nibbles(v3), bits), with_bit4<7>(high_nibbles(v3), bits), a, at + 24);
      offset = 16.0f;
    } else {
      const uint8_t* p = g + size_t(b) * q8_0_chunk(R);
      d = f16x8(g + q8_0_dplane(R, K) + 16 * size_t(b));
      for (int i = 0; i < 8; i += 2)
        for (int t = 0; t < NT; ++t) {
          s.x[t] = dot4_signed(s.x[t], load(p + 32 * i), a.a[t] + at + 4 * size_t(i));
          s.y[t] = dot4_signed(s.y[t], load(p + 32 * (i + 1)), a.a[t] + at + 4 * size_t(i) + 4);
        }
    }
    for (int t = 0; t < NT; ++t) {
      const float da = load_f32(a.a[t] + act::q8_32_d(K) + 4 * size_t(b));
      const float sa = load_f32(a.a[t] + act::q8_32_s(K) + 4 * size_t(b));
      const __m256 f = _mm256_fmadd_ps(s.sum(t), _mm256_set1_ps(da), _mm256_set1_ps(-offset * sa));
      acc[t] = _mm256_fmadd_ps(f, d, acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m256[NT]) {}
};
template <>
struct Vec<Q8_0> : Block32<Q8_0> {};
template <>
struct Vec<Q5_0> : Block32<Q5_0> {};

template <class Fmt>
struct KQuant45 {
  static constexpr bool five = std::is_same_v<Fmt, Q5_K>;
  static int chunks(int K) { return K / 256; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int sb, const Acts<NT>& a, __m256 acc[NT]) {
    const uint8_t* p = g + size_t(sb) * (five ? q5_k_chunk(R) : q4_k_chunk(R));
    const uint8_t* planes = p + qk_scales(R);
    const uint8_t* nib = p + qk_nibbles(R);
    __m256 s1[NT], s2[NT];
    for (int t = 0; t < NT; ++t) s1[t] = s2[t] = _mm256_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      IntSums<NT> s;
      const size_t at = 256 * size_t(sb) + 32 * size_t(j);
      const uint8_t* w = nib + 4 * 32 * size_t(j);
      const __m256i v0 = load(w), v1 = load(w + 32), v2 = load(w + 64), v3 = load(w + 96);
      if constexpr (five) {
        const __m256i bits = load(p + q5_k_bits(R) + 32 * size_t(j));
        dot_pair(s, with_bit4<0>(low_nibbles(v0), bits), with_bit4<1>(high_nibbles(v0), bits), a, at);
        dot_pair(s, with_bit4<2>(low_nibbles(v1), bits), with_bit4<3>(high_nibbles(v1), bits), a, at + 8);
        dot_pair(s, with_bit4<4>(low_nibbles(v2), bits), with_bit4<5>(high_nibbles(v2), bits), a, at + 16);
        dot_pair(s, with_bit4<6>(low_nibbles(v3), bits), with_bit4<7>(high_nibbles(v3), bits), a, at + 24);
      } else {
        dot_pair(s, low_nibbles(v0), high_nibbles(v0), a, at);
        dot_pair(s, low_nibbles(v1), high_nibbles(v1), a, at + 8);
        dot_pair(s, low_nibbles(v2), high_nibbles(v2), a, at + 16);
        dot_pair(s, low_nibbles(v3), high_nibbles(v3), a, at + 24);
      }
      const __m256 sc = u8x8_to_ps(k_scale(planes, j)), m = u8x8_to_ps(k_min(planes, j));
      for (int t = 0; t < NT; ++t) {
        const float* s16 = reinterpret_cast<const float*>(a.a[t] + act::q8_k_s16(K)) + 16 * sb + 2 * j;
        s1[t] = _mm256_fmadd_ps(s.sum(t), sc, s1[t]);
        s2[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(s16[0] + s16[1]), s2[t]);
      }
    }
    const __m256 d = f16x8(p), dmin = f16x8(p + qk_dmin(R));
    for (int t = 0; t < NT; ++t) {
      const float da = load_f32(a.a[t] + act::q8_k_d(K) + 4 * size_t(sb));
      const __m256 v = _mm256_fmsub_ps(d, s1[t], _mm256_mul_ps(dmin, s2[t]));
      acc[t] = _mm256_fmadd_ps(v, _mm256_set1_ps(da), acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m256[NT]) {}
};
template <>
struct Vec<Q4_K> : KQuant45<Q4_K> {};
template <>
struct Vec<Q5_K> : KQuant45<Q5_K> {};

template <>
struct Vec<Q6_K> {
  static int chunks(int K) { return K / 256; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int sb, const Acts<NT>& a, __m256 acc[NT]) {
    const uint8_t* p = g + size_t(sb) * q6_k_chunk(R);
    const uint8_t* nib = p + q6_k_nibbles(R);
    const uint8_t* crumbs = p + q6_k_crumbs(R);
    __m256 s1[NT];
    for (int t = 0; t < NT; ++t) s1[t] = _mm256_setzero_ps();
    for (int j = 0; j < 16; ++j) {
      IntSums<NT> s;
      const size_t at = 256 * size_t(sb) + 16 * size_t(j);
      const __m256i c = load(crumbs + 32 * size_t(j));
      const __m256i v0 = load(nib + 64 * size_t(j)), v1 = load(nib + 64 * size_t(j) + 32);
      dot_pair(s, with_crumb<0>(low_nibbles(v0), c), with_crumb<1>(high_nibbles(v0), c), a, at);
      dot_pair(s, with_crumb<2>(low_nibbles(v1), c), with_crumb<3>(high_nibbles(v1), c), a, at + 8);
      const __m256 sc = s8x8_to_ps(load8(p + 8 * size_t(j)));
      for (int t = 0; t < NT; ++t) {
        const float s16 = reinterpret_cast<const float*>(a.a[t] + act::q8_k_s16(K))[16 * sb + j];
        s1[t] = _mm256_fmadd_ps(_mm256_sub_ps(s.sum(t), _mm256_set1_ps(32.0f * s16)), sc, s1[t]);
      }
    }
    const __m256 d = f16x8(g + q6_k_dplane(R, K) + 16 * size_t(sb));
    for (int t = 0; t < NT; ++t) {
      const float da = load_f32(a.a[t] + act::q8_k_d(K) + 4 * size_t(sb));
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(s1[t], d), _mm256_set1_ps(da), acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m256[NT]) {}
};

template <class Fmt, int NT>
void group_tokens(const MatArgs& m, const uint8_t* g, int t0, __m256i rows, float* y) {
  Acts<NT> a;
  for (int t = 0; t < NT; ++t) a.a[t] = m.act[t0 + t];
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const int n = Vec<Fmt>::chunks(m.K);
  for (int c = 0; c < n; ++c) Vec<Fmt>::template chunk<NT>(g, m.K, c, a, acc);
  Vec<Fmt>::template finish<NT>(g, m.K, a, acc);
  for (int t = 0; t < NT; ++t) _mm256_maskstore_ps(y + size_t(t0 + t) * m.y_stride, rows, acc[t]);
}

template <class Fmt>
void matmul(const MatArgs& m) {
  for (int r0 = 0; r0 < m.n_rows; r0 += R) {
    const uint8_t* g = m.w + size_t(r0 / R) * m.group_bytes;
    const int nr = min_int(R, m.n_rows - r0);
    const __m256i rows = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    float* y = m.y + r0;
    int t = 0;
    for (; t + 4 <= m.n_act; t += 4) group_tokens<Fmt, 4>(m, g, t, rows, y);
    switch (m.n_act - t) {
      case 3: group_tokens<Fmt, 3>(m, g, t, rows, y); break;
      case 2: group_tokens<Fmt, 2>(m, g, t, rows, y); break;
      case 1: group_tokens<Fmt, 1>(m, g, t, rows, y); break;
      default: break;
    }
  }
}

size_t scratch_bytes(int) { return 64; }

uint64_t stream_read(const uint8_t* p, size_t n, int streams) {
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  const size_t part = n / size_t(streams);
  for (size_t i = 0; i < part; i += 256)
    for (int s = 0; s < streams; ++s)
      for (int j = 0; j < 4; ++j) {
        const uint8_t* q = p + size_t(s) * part + i + 64 * size_t(j);
        acc[j] = _mm256_xor_si256(acc[j], _mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
        acc[j] = _mm256_xor_si256(acc[j], _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32)));
      }
  const __m256i x = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
  return uint64_t(_mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 1) ^ _mm256_extract_epi64(x, 2) ^
                  _mm256_extract_epi64(x, 3));
}

KernelTable make_table() {
  KernelTable t{};
  t.isa = "avx2";
  t.scratch_bytes = &scratch_bytes;
  t.stream_read = &stream_read;
  t.swiglu = &swiglu;
  t.act[int(ActKind::F32)] = ActKernels{&act::f32_bytes, &prep_f32};
  t.act[int(ActKind::Q8_32)] = ActKernels{&act::q8_32_bytes, &prep_q8_32};
  t.act[int(ActKind::Q8_K)] = ActKernels{&act::q8_k_bytes, &prep_q8_k};
  for (int i = 0; i < kFormatCount; ++i) {
    const Format f = Format(i);
    FormatKernels k = tiled_layout(f, R);
    k.path = "avx2";
    switch (f) {
      case Format::BF16: k.act = ActKind::F32, k.matmul = &matmul<BF16>; break;
      case Format::INT8: k.act = ActKind::Q8_32, k.matmul = &matmul<INT8>; break;
      case Format::INT4: k.act = ActKind::Q8_32, k.matmul = &matmul<INT4>; break;
      case Format::Q8_0: k.act = ActKind::Q8_32, k.matmul = &matmul<Q8_0>; break;
      case Format::Q5_0: k.act = ActKind::Q8_32, k.matmul = &matmul<Q5_0>; break;
      case Format::Q4_K: k.act = ActKind::Q8_K, k.matmul = &matmul<Q4_K>; break;
      case Format::Q5_K: k.act = ActKind::Q8_K, k.matmul = &matmul<Q5_K>; break;
      case Format::Q6_K: k.act = ActKind::Q8_K, k.matmul = &matmul<Q6_K>; break;
    }
    t.fmt[i] = k;
  }
  return t;
}

}  // namespace

}  // namespace tandem::avx2

namespace tandem {

const KernelTable& avx2_kernels() {
  static const KernelTable table = avx2::make_table();
  return table;
}

}  // namespace tandem
