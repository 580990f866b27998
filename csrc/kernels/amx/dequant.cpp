// Dequantizing one group of the tiled int layout into BF16 tile-rows, for prefill on AMX-BF16
// tiles: the block-scaled formats (k-quants, Q8_0, Q5_0) change scale every 16-32 weights along
// K, which int8 tiles cannot absorb (their sums run over 64 K per instruction), so the weights of
// 64 rows (a task's row block) are expanded once per call into an L2-resident panel and then
// reused by every token tile. (INT4's scales are per 64, one product deep: it runs on int8 tiles,
// tiles.cpp, and comes here only with TANDEM_AMX_INT4=bf16.) The unpacking matches the AVX-512
// kernels (avx512/matmul.cpp).
#include <type_traits>

#include "../avx512/simd.h"
#include "amx.h"

namespace tandem::amx {

namespace {

using namespace tiled;
using avx512::load;
using avx512::R;

// One granule (16 rows x 4 codes, global granule index gi) -> BF16 tile-rows 2 gi, 2 gi + 1:
// w[n][4 gi + i] = scale[n] * code - bias[n].
inline void emit(uint8_t* out, int gi, __m512i codes, __m512 scale, __m512 bias) {
  const __m512i ff = _mm512_set1_epi32(0xff);
  const __m512 f0 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(codes, ff)), scale, bias);
  const __m512 f1 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(codes, 8), ff)), scale, bias);
  const __m512 f2 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(codes, 16), ff)), scale, bias);
  const __m512 f3 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 24)), scale, bias);
  _mm512_storeu_si512(out + 64 * size_t(2 * gi), avx512::bf16_pairs(f0, f1));
  _mm512_storeu_si512(out + 64 * size_t(2 * gi + 1), avx512::bf16_pairs(f2, f3));
}

// A nibble tile-row (granules gi, gi + 1) with its two code vectors.
inline void emit_pair(uint8_t* out, int gi, __m512i lo, __m512i hi, __m512 scale, __m512 bias) {
  emit(out, gi, lo, scale, bias);
  emit(out, gi + 1, hi, scale, bias);
}

// Each function expands K-units [u0, u1) of the group (kDequantUnit weights of every row each;
// the last unit may be partial): the same bytes in any split into ranges.
void int4(const uint8_t* g, int K, uint8_t* out, int u0, int u1) {
  for (int c = 4 * u0; c < avx512::min_int(4 * u1, K / 64); ++c) {
    const uint8_t* p = g + size_t(c) * int4_chunk(R);
    const __m512 d = _mm512_loadu_ps(p);
    const __m512 bias = _mm512_mul_ps(d, _mm512_set1_ps(8.0f));
    for (int i = 0; i < 8; ++i) {
      const __m512i v = load(p + 64 + 64 * size_t(i));
      emit_pair(out, 16 * c + 2 * i, avx512::low_nibbles(v), avx512::high_nibbles(v), d, bias);
    }
  }
}

template <bool five>
void block32(const uint8_t* g, int K, uint8_t* out, int u0, int u1) {
  for (int b = 8 * u0; b < avx512::min_int(8 * u1, K / 32); ++b) {
    const int gi = 8 * b;
    if constexpr (five) {
      const __m512 d = avx512::f16x16(g + q5_0_dplane(R, K) + 32 * size_t(b));
      const __m512 bias = _mm512_mul_ps(d, _mm512_set1_ps(16.0f));
      const uint8_t* p = g + size_t(b) * q5_0_chunk(R);
      const __m512i bits = load(p + q5_0_bits(R));
      const __m512i v0 = load(p), v1 = load(p + 64), v2 = load(p + 128), v3 = load(p + 192);
      using namespace avx512;
      emit_pair(out, gi, with_bit4<0>(low_nibbles(v0), bits), with_bit4<1>(high_nibbles(v0), bits), d, bias);
      emit_pair(out, gi + 2, with_bit4<2>(low_nibbles(v1), bits), with_bit4<3>(high_nibbles(v1), bits), d, bias);
      emit_pair(out, gi + 4, with_bit4<4>(low_nibbles(v2), bits), with_bit4<5>(high_nibbles(v2), bits), d, bias);
      emit_pair(out, gi + 6, with_bit4<6>(low_nibbles(v3), bits), with_bit4<7>(high_nibbles(v3), bits), d, bias);
    } else {
      const __m512 d = avx512::f16x16(g + q8_0_dplane(R, K) + 32 * size_t(b));
      const __m512 bias = _mm512_mul_ps(d, _mm512_set1_ps(128.0f));
      const uint8_t* p = g + size_t(b) * q8_0_chunk(R);
      for (int i = 0; i < 8; ++i) emit(out, gi + i, load(p + 64 * size_t(i)), d, bias);
    }
  }
}

template <bool five>
void kquant45(const uint8_t* g, int K, uint8_t* out, int u0, int u1) {
  using namespace avx512;
  for (int sb = u0; sb < min_int(u1, K / 256); ++sb) {
    const uint8_t* p = g + size_t(sb) * (five ? q5_k_chunk(R) : q4_k_chunk(R));
    const __m512 d = f16x16(p), dmin = f16x16(p + qk_dmin(R));
    for (int j = 0; j < 8; ++j) {
      const __m512 scale = _mm512_mul_ps(d, u8x16_to_ps(k_scale(p + qk_scales(R), j)));
      const __m512 bias = _mm512_mul_ps(dmin, u8x16_to_ps(k_min(p + qk_scales(R), j)));
      const uint8_t* w = p + qk_nibbles(R) + 256 * size_t(j);
      const __m512i v0 = load(w), v1 = load(w + 64), v2 = load(w + 128), v3 = load(w + 192);
      const int gi = 64 * sb + 8 * j;
      if constexpr (five) {
        const __m512i bits = load(p + q5_k_bits(R) + 64 * size_t(j));
        emit_pair(out, gi, with_bit4<0>(low_nibbles(v0), bits), with_bit4<1>(high_nibbles(v0), bits), scale, bias);
        emit_pair(out, gi + 2, with_bit4<2>(low_nibbles(v1), bits), with_bit4<3>(high_nibbles(v1), bits), scale, bias);
        emit_pair(out, gi + 4, with_bit4<4>(low_nibbles(v2), bits), with_bit4<5>(high_nibbles(v2), bits), scale, bias);
        emit_pair(out, gi + 6, with_bit4<6>(low_nibbles(v3), bits), with_bit4<7>(high_nibbles(v3), bits), scale, bias);
      } else {
        emit_pair(out, gi, low_nibbles(v0), high_nibbles(v0), scale, bias);
        emit_pair(out, gi + 2, low_nibbles(v1), high_nibbles(v1), scale, bias);
        emit_pair(out, gi + 4, low_nibbles(v2), high_nibbles(v2), scale, bias);
        emit_pair(out, gi + 6, low_nibbles(v3), high_nibbles(v3), scale, bias);
      }
    }
  }
}

void q6_k(const uint8_t* g, int K, uint8_t* out, int u0, int u1) {
  using namespace avx512;
  for (int sb = u0; sb < min_int(u1, K / 256); ++sb) {
    const uint8_t* p = g + size_t(sb) * q6_k_chunk(R);
    const __m512 d = f16x16(g + q6_k_dplane(R, K) + 32 * size_t(sb));
    for (int j = 0; j < 16; ++j) {
      const __m512 scale = _mm512_mul_ps(d, s8x16_to_ps(load16(p + 16 * size_t(j))));
      const __m512 bias = _mm512_mul_ps(scale, _mm512_set1_ps(32.0f));
      const __m512i c = load(p + q6_k_crumbs(R) + 64 * size_t(j));
      const uint8_t* w = p + q6_k_nibbles(R) + 128 * size_t(j);
      const __m512i v0 = load(w), v1 = load(w + 64);
      const int gi = 64 * sb + 4 * j;
      emit_pair(out, gi, with_crumb<0>(low_nibbles(v0), c), with_crumb<1>(high_nibbles(v0), c), scale, bias);
      emit_pair(out, gi + 2, with_crumb<2>(low_nibbles(v1), c), with_crumb<3>(high_nibbles(v1), c), scale, bias);
    }
  }
}

}  // namespace

void dequant_units(Format fmt, const uint8_t* group, int K, uint8_t* out, int u0, int u1) {
  switch (fmt) {
    case Format::INT4: int4(group, K, out, u0, u1); break;
    case Format::Q8_0: block32<false>(group, K, out, u0, u1); break;
    case Format::Q5_0: block32<true>(group, K, out, u0, u1); break;
    case Format::Q4_K: kquant45<false>(group, K, out, u0, u1); break;
    case Format::Q5_K: kquant45<true>(group, K, out, u0, u1); break;
    case Format::Q6_K: q6_k(group, K, out, u0, u1); break;
    case Format::BF16:
    case Format::INT8: break;  // read by their own tile kernels, never expanded
  }
}

void dequant_group(Format fmt, const uint8_t* group, int K, uint8_t* out) {
  dequant_units(fmt, group, K, out, 0, dequant_unit_count(K));
}

}  // namespace tandem::amx
