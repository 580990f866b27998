// The AVX-512 matmul: one kernel, the format a template parameter. Weights are in the tiled
// layout (tiled.h, 16 rows per group); each zmm lane accumulates one row, so a tile-row load
// (16 rows x 4 codes) feeds one vpdpbusd per token with the token's 4 activations broadcast
// (one vdpbf16ps for BF16). Tokens go NT <= 4 at a time through one group: at decode (T <= 4)
// every weight byte is read once and decoded once for all tokens; the loop streams the group
// sequentially, the order the hardware prefetchers follow best.
//
// Per format, Vec<Fmt>::chunk adds one K-chunk of one group into NT fp32 accumulators:
// integer dot products per scale block (u8 codes x s8 activations), then the block's scales.
// Offsets: codes are stored with an offset (tiled.h), removed with the activation block sums
// that the Q8 layouts carry (act.h): sum (code - o) * q = sum code * q - o * sum q.
#include <cstdlib>
#include <type_traits>

#include "simd.h"

namespace tandem::avx512 {

namespace {

using namespace tiled;

template <int NT>
struct Acts {
  const uint8_t* a[NT];
};

// Two independent dpbusd chains per token (granules alternate), summed at the block's end,
// halve the dependency chain that bounds a single token's loop.
template <int NT>
struct IntSums {
  __m512i x[NT], y[NT];
  IntSums() {
    for (int t = 0; t < NT; ++t) x[t] = y[t] = _mm512_setzero_si512();
  }
  __m512 sum(int t) const { return _mm512_cvtepi32_ps(_mm512_add_epi32(x[t], y[t])); }
};

// One nibble tile-row (granules 2i, 2i+1 at activation byte offset `at`) for NT tokens.
template <int NT>
inline void dot_pair(IntSums<NT>& s, __m512i lo, __m512i hi, const Acts<NT>& a, size_t at) {
  for (int t = 0; t < NT; ++t) {
    s.x[t] = dot4(s.x[t], lo, a.a[t] + at);
    s.y[t] = dot4(s.y[t], hi, a.a[t] + at + 4);
  }
}

template <class Fmt>
struct Vec;

template <>
struct Vec<BF16> {
  static int chunks(int K) { return bf16_kp(K) / 32; }
  // Activations: bf16 pairs; tile-row j holds k = 2j, 2j + 1 of the 16 rows.
  template <int NT>
  static void chunk(const uint8_t* g, int, int c, const Acts<NT>& a, __m512 acc[NT]) {
    const uint8_t* w = g + size_t(c) * 16 * 64;
    __m512 acc2[NT];
    for (int t = 0; t < NT; ++t) acc2[t] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j += 2) {
      const __m512i w0 = load(w + 64 * j), w1 = load(w + 64 * (j + 1));
      for (int t = 0; t < NT; ++t) {
        const uint8_t* x = a.a[t] + 64 * size_t(c) + 4 * size_t(j);
        acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)w0, (__m512bh)bcast4(x));
        acc2[t] = _mm512_dpbf16_ps(acc2[t], (__m512bh)w1, (__m512bh)bcast4(x + 4));
      }
    }
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_add_ps(acc[t], acc2[t]);
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m512[NT]) {}
};

template <>
struct Vec<INT8> {
  static int chunks(int K) { return int8_kp(K) / 32; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int b, const Acts<NT>& a, __m512 acc[NT]) {
    const uint8_t* w = g + int8_codes(R) + size_t(b) * 8 * 64;
    IntSums<NT> s;
    for (int i = 0; i < 8; i += 2) {
      const __m512i w0 = load(w + 64 * i), w1 = load(w + 64 * (i + 1));
      for (int t = 0; t < NT; ++t) {
        s.x[t] = dot4(s.x[t], w0, a.a[t] + 32 * size_t(b) + 4 * size_t(i));
        s.y[t] = dot4(s.y[t], w1, a.a[t] + 32 * size_t(b) + 4 * size_t(i) + 4);
      }
    }
    for (int t = 0; t < NT; ++t) {
      const float d = load_f32(a.a[t] + act::q8_32_d(K) + 4 * size_t(b));
      acc[t] = _mm512_fmadd_ps(s.sum(t), _mm512_set1_ps(d), acc[t]);
    }
  }
  // y = scale * (sum d * code * q - 128 * sum of the activations)
  template <int NT>
  static void finish(const uint8_t* g, int K, const Acts<NT>& a, __m512 acc[NT]) {
    const __m512 scale = _mm512_loadu_ps(g);
    for (int t = 0; t < NT; ++t) {
      const float total = load_f32(a.a[t] + act::q8_32_total(K));
      acc[t] = _mm512_mul_ps(_mm512_sub_ps(acc[t], _mm512_set1_ps(128.0f * total)), scale);
    }
  }
};

template <>
struct Vec<INT4> {
  static int chunks(int K) { return K / 64; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int c, const Acts<NT>& a, __m512 acc[NT]) {
    const uint8_t* p = g + size_t(c) * int4_chunk(R);
    const __m512 d = _mm512_loadu_ps(p);
    __m512 f[NT];
    for (int half = 0; half < 2; ++half) {  // one 32-block of activations each
      const int b = 2 * c + half;
      IntSums<NT> s;
      for (int i = 0; i < 4; ++i) {
        const __m512i v = load(p + 64 + 64 * size_t(4 * half + i));
        dot_pair(s, low_nibbles(v), high_nibbles(v), a, 32 * size_t(b) + 8 * size_t(i));
      }
      for (int t = 0; t < NT; ++t) {
        const float da = load_f32(a.a[t] + act::q8_32_d(K) + 4 * size_t(b));
        const float sa = load_f32(a.a[t] + act::q8_32_s(K) + 4 * size_t(b));
        const __m512 v = _mm512_fmadd_ps(s.sum(t), _mm512_set1_ps(da), _mm512_set1_ps(-8.0f * sa));
        f[t] = half == 0 ? v : _mm512_add_ps(f[t], v);
      }
    }
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(f[t], d, acc[t]);
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m512[NT]) {}
};

// Q8_0 and Q5_0: one 32-block per chunk, w = d * (code - offset).
template <class Fmt>
struct Block32 {
  static constexpr bool five = std::is_same_v<Fmt, Q5_0>;
  static int chunks(int K) { return K / 32; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int b, const Acts<NT>& a, __m512 acc[NT]) {
    IntSums<NT> s;
    const size_t at = 32 * size_t(b);
    __m512 d;
    if constexpr (five) {
      const uint8_t* p = g + size_t(b) * q5_0_chunk(R);
      const __m512i bits = load(p + q5_0_bits(R));
      d = f16x16(g + q5_0_dplane(R, K) + 32 * size_t(b));
      const __m512i v0 = load(p), v1 = load(p + 64), v2 = load(p + 128), v3 = load(p + 192);
      dot_pair(s, with_bit4<0>(low_nibbles(v0), bits), with_bit4<1>(high_nibbles(v0), bits), a, at);
      dot_pair(s, with_bit4<2>(low_nibbles(v1), bits), with_bit4<3>(high_nibbles(v1), bits), a, at + 8);
      dot_pair(s, with_bit4<4>(low_nibbles(v2), bits), with_bit4<5>(high_nibbles(v2), bits), a, at + 16);
      dot_pair(s, with_bit4<6>(low_nibbles(v3), bits), with_bit4<7>(high_nibbles(v3), bits), a, at + 24);
    } else {
      const uint8_t* p = g + size_t(b) * q8_0_chunk(R);
      d = f16x16(g + q8_0_dplane(R, K) + 32 * size_t(b));
      for (int i = 0; i < 8; i += 2) dot_pair(s, load(p + 64 * i), load(p + 64 * (i + 1)), a, at + 4 * size_t(i));
    }
    constexpr float offset = five ? 16.0f : 128.0f;
    for (int t = 0; t < NT; ++t) {
      const float da = load_f32(a.a[t] + act::q8_32_d(K) + 4 * size_t(b));
      const float sa = load_f32(a.a[t] + act::q8_32_s(K) + 4 * size_t(b));
      const __m512 f = _mm512_fmadd_ps(s.sum(t), _mm512_set1_ps(da), _mm512_set1_ps(-offset * sa));
      acc[t] = _mm512_fmadd_ps(f, d, acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m512[NT]) {}
};
template <>
struct Vec<Q8_0> : Block32<Q8_0> {};
template <>
struct Vec<Q5_0> : Block32<Q5_0> {};

// Q4_K and Q5_K: per super-block, 8 sub-blocks of 32 with 6-bit scale and min.
// sum w * x = da * (d * sum_j sc_j * isum_j - dmin * sum_j m_j * sum_j(q)).
template <class Fmt>
struct KQuant45 {
  static constexpr bool five = std::is_same_v<Fmt, Q5_K>;
  static int chunks(int K) { return K / 256; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int sb, const Acts<NT>& a, __m512 acc[NT]) {
    const uint8_t* p = g + size_t(sb) * (five ? q5_k_chunk(R) : q4_k_chunk(R));
    const uint8_t* planes = p + qk_scales(R);
    const uint8_t* nib = p + qk_nibbles(R);
    __m512 s1[NT], s2[NT];
    for (int t = 0; t < NT; ++t) s1[t] = s2[t] = _mm512_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      IntSums<NT> s;
      const size_t at = 256 * size_t(sb) + 32 * size_t(j);
      const uint8_t* w = nib + 4 * 64 * size_t(j);
      const __m512i v0 = load(w), v1 = load(w + 64), v2 = load(w + 128), v3 = load(w + 192);
      if constexpr (five) {
        const __m512i bits = load(p + q5_k_bits(R) + 64 * size_t(j));
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
      const __m512 sc = u8x16_to_ps(k_scale(planes, j)), m = u8x16_to_ps(k_min(planes, j));
      for (int t = 0; t < NT; ++t) {
        const float* s16 = reinterpret_cast<const float*>(a.a[t] + act::q8_k_s16(K)) + 16 * sb + 2 * j;
        s1[t] = _mm512_fmadd_ps(s.sum(t), sc, s1[t]);
        s2[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(s16[0] + s16[1]), s2[t]);
      }
    }
    const __m512 d = f16x16(p), dmin = f16x16(p + qk_dmin(R));
    for (int t = 0; t < NT; ++t) {
      const float da = load_f32(a.a[t] + act::q8_k_d(K) + 4 * size_t(sb));
      const __m512 v = _mm512_fmsub_ps(d, s1[t], _mm512_mul_ps(dmin, s2[t]));
      acc[t] = _mm512_fmadd_ps(v, _mm512_set1_ps(da), acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m512[NT]) {}
};
template <>
struct Vec<Q4_K> : KQuant45<Q4_K> {};
template <>
struct Vec<Q5_K> : KQuant45<Q5_K> {};

// Q6_K: 16 sub-blocks of 16 with int8 scales; sum w * x = da * d * sum_j sc_j (isum_j - 32 s16_j).
template <>
struct Vec<Q6_K> {
  static int chunks(int K) { return K / 256; }
  template <int NT>
  static void chunk(const uint8_t* g, int K, int sb, const Acts<NT>& a, __m512 acc[NT]) {
    const uint8_t* p = g + size_t(sb) * q6_k_chunk(R);
    const uint8_t* nib = p + q6_k_nibbles(R);
    const uint8_t* crumbs = p + q6_k_crumbs(R);
    __m512 s1[NT];
    for (int t = 0; t < NT; ++t) s1[t] = _mm512_setzero_ps();
    for (int j = 0; j < 16; ++j) {
      IntSums<NT> s;
      const size_t at = 256 * size_t(sb) + 16 * size_t(j);
      const __m512i c = load(crumbs + 64 * size_t(j));
      const __m512i v0 = load(nib + 128 * size_t(j)), v1 = load(nib + 128 * size_t(j) + 64);
      dot_pair(s, with_crumb<0>(low_nibbles(v0), c), with_crumb<1>(high_nibbles(v0), c), a, at);
      dot_pair(s, with_crumb<2>(low_nibbles(v1), c), with_crumb<3>(high_nibbles(v1), c), a, at + 8);
      const __m512 sc = s8x16_to_ps(load16(p + 16 * size_t(j)));
      for (int t = 0; t < NT; ++t) {
        const float s16 = reinterpret_cast<const float*>(a.a[t] + act::q8_k_s16(K))[16 * sb + j];
        s1[t] = _mm512_fmadd_ps(_mm512_sub_ps(s.sum(t), _mm512_set1_ps(32.0f * s16)), sc, s1[t]);
      }
    }
    const __m512 d = f16x16(g + q6_k_dplane(R, K) + 32 * size_t(sb));
    for (int t = 0; t < NT; ++t) {
      const float da = load_f32(a.a[t] + act::q8_k_d(K) + 4 * size_t(sb));
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(s1[t], d), _mm512_set1_ps(da), acc[t]);
    }
  }
  template <int NT>
  static void finish(const uint8_t*, int, const Acts<NT>&, __m512[NT]) {}
};

// How far ahead (bytes) each group's stream is prefetched into L2 besides the hardware
// prefetchers. Measured on the 16-core Xeon (15 threads, T = 1 and 4): 8 KB beat 0, 512 and
// 2048 on every shape, up to 1.5x at T = 1. TANDEM_PREFETCH overrides it (0 = off; read once).
size_t g_prefetch = 8192;

template <class Fmt, int NT>
void group_tokens(const MatArgs& m, const uint8_t* g, int t0, __mmask16 rows, float* y) {
  Acts<NT> a;
  for (int t = 0; t < NT; ++t) a.a[t] = m.act[t0 + t];
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  const int n = Vec<Fmt>::chunks(m.K);
  const size_t per_chunk = m.group_bytes / size_t(n > 0 ? n : 1);
  for (int c = 0; c < n; ++c) {
    if (g_prefetch != 0) {
      const uint8_t* ahead = g + size_t(c) * per_chunk + g_prefetch;
      for (size_t o = 0; o < per_chunk; o += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + o), _MM_HINT_T1);
    }
    Vec<Fmt>::template chunk<NT>(g, m.K, c, a, acc);
  }
  Vec<Fmt>::template finish<NT>(g, m.K, a, acc);
  for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(y + size_t(t0 + t) * m.y_stride, rows, acc[t]);
}

template <class Fmt>
void matmul(const MatArgs& m) {
  for (int r0 = 0; r0 < m.n_rows; r0 += R) {
    const uint8_t* g = m.w + size_t(r0 / R) * m.group_bytes;
    const int nr = min_int(R, m.n_rows - r0);
    const __mmask16 rows = __mmask16((1u << nr) - 1);
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

// Four independent accumulators: the loads do not wait on each other, so many lines are in flight.
uint64_t stream_read(const uint8_t* p, size_t n, int streams) {
  __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  const size_t part = n / size_t(streams);
  for (size_t i = 0; i < part; i += 256)
    for (int s = 0; s < streams; ++s)
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_xor_si512(acc[j], _mm512_load_si512(p + size_t(s) * part + i + 64 * size_t(j)));
  const __m512i x = _mm512_xor_si512(_mm512_xor_si512(acc[0], acc[1]), _mm512_xor_si512(acc[2], acc[3]));
  return uint64_t(_mm512_reduce_or_epi64(x));
}

KernelTable make_table() {
  KernelTable t{};
  t.isa = "avx512";
  t.scratch_bytes = &scratch_bytes;
  fill_table(t);
  return t;
}

}  // namespace

void fill_table(KernelTable& t) {
  t.stream_read = &stream_read;
  t.swiglu = &swiglu;
  if (const char* env = std::getenv("TANDEM_PREFETCH")) g_prefetch = size_t(std::strtoul(env, nullptr, 10)) / 64 * 64;
  t.act[int(ActKind::F32)] = ActKernels{&act::f32_bytes, &prep_f32};
  t.act[int(ActKind::BF16)] = ActKernels{&act::bf16_bytes, &prep_bf16};
  t.act[int(ActKind::Q8_32)] = ActKernels{&act::q8_32_bytes, &prep_q8_32};
  t.act[int(ActKind::Q8_K)] = ActKernels{&act::q8_k_bytes, &prep_q8_k};
  t.act[int(ActKind::Q8_ROW)] = ActKernels{&act::q8_row_bytes, &prep_q8_row};
  t.act[int(ActKind::Q8_64)] = ActKernels{&act::q8_64_bytes, &prep_q8_64};
  for (int i = 0; i < kFormatCount; ++i) {
    const Format f = Format(i);
    FormatKernels k = tiled_layout(f, R);
    k.path = "avx512-vnni";
    switch (f) {
      case Format::BF16: k.act = ActKind::BF16, k.matmul = &matmul<BF16>, k.path = "avx512-bf16"; break;
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
}

}  // namespace tandem::avx512

namespace tandem {

const KernelTable& avx512_kernels() {
  static const KernelTable table = avx512::make_table();
  return table;
}

}  // namespace tandem
