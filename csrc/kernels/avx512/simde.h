// CI only: the AVX-512 intrinsics on CPUs without AVX-512, through SIMDe (Debian's libsimde-dev,
// headers only). A build configured with -DTANDEM_SIMDE=ON force-includes this header into the
// AVX-512 and amx-emu translation units, compiled with the AVX2 flags, so a CI box without AVX-512
// runs those kernels' code (slowly; only results mean anything). Filled in here: what SIMDe 0.7.4
// lacks, and masked loads / stores, which must not touch the lanes their mask leaves out (SIMDe's
// masked store writes all 64 bytes).
#pragma once

#include <immintrin.h>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tandem::simde_fill {

template <class T, class V>
inline void to_array(const V& v, T* out, int n) { std::memcpy(out, &v, sizeof(T) * size_t(n)); }
template <class V, class T>
inline V from_array(const T* in, int n) {
  V v;
  std::memset(&v, 0, sizeof(V));
  std::memcpy(&v, in, sizeof(T) * size_t(n));
  return v;
}

// fp32 -> bf16, round to nearest even; NaN stays NaN (quiet).
inline uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline simde__m512i cvtepi8_epi32(simde__m128i v) {
  int8_t a[16];
  int32_t r[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i) r[i] = a[i];
  return from_array<simde__m512i>(r, 16);
}
inline simde__m512i cvtepu8_epi32(simde__m128i v) {
  uint8_t a[16];
  int32_t r[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i) r[i] = a[i];
  return from_array<simde__m512i>(r, 16);
}
inline simde__m128i cvtepi32_epi8(simde__m512i v) {  // truncating, as vpmovdb
  int32_t a[16];
  int8_t r[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i) r[i] = int8_t(a[i]);
  return from_array<simde__m128i>(r, 16);
}
inline simde__m512 cvtepi32_ps(simde__m512i v) {
  int32_t a[16];
  float r[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i) r[i] = float(a[i]);
  return from_array<simde__m512>(r, 16);
}
inline simde__m512i cvtps_epi32(simde__m512 v) {  // nearest even, as the default MXCSR
  float a[16];
  int32_t r[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i) r[i] = int32_t(std::nearbyint(a[i]));
  return from_array<simde__m512i>(r, 16);
}
inline simde__m512 cvtph_ps(simde__m256i v) {
  uint16_t a[16];
  float r[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i) r[i] = _cvtsh_ss(a[i]);  // F16C, in the AVX2 flags
  return from_array<simde__m512>(r, 16);
}
inline simde__m512i cvtne2ps_pbh(simde__m512 a, simde__m512 b) {  // words 0..15 from b, 16..31 from a
  float fa[16], fb[16];
  uint16_t r[32];
  to_array(a, fa, 16);
  to_array(b, fb, 16);
  for (int i = 0; i < 16; ++i) r[i] = bf16(fb[i]), r[16 + i] = bf16(fa[i]);
  return from_array<simde__m512i>(r, 32);
}
inline simde__m256i cvtneps_pbh(simde__m512 a) {
  float fa[16];
  uint16_t r[16];
  to_array(a, fa, 16);
  for (int i = 0; i < 16; ++i) r[i] = bf16(fa[i]);
  return from_array<simde__m256i>(r, 16);
}
inline int reduce_add_epi32(simde__m512i v) {
  int32_t a[16];
  to_array(v, a, 16);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += uint32_t(a[i]);
  return int32_t(s);
}
inline float reduce_max_ps(simde__m512 v) {
  float a[16];
  to_array(v, a, 16);
  float m = a[0];
  for (int i = 1; i < 16; ++i) m = a[i] > m ? a[i] : m;
  return m;
}
inline long long reduce_or_epi64(simde__m512i v) {
  long long a[8];
  to_array(v, a, 8);
  long long s = 0;
  for (int i = 0; i < 8; ++i) s |= a[i];
  return s;
}
inline void mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 v) {
  float a[16];
  to_array(v, a, 16);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(static_cast<char*>(p) + 4 * i, &a[i], 4);
}
inline simde__m512 maskz_loadu_ps(simde__mmask16 k, const void* p) {
  float a[16] = {};
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(&a[i], static_cast<const char*>(p) + 4 * i, 4);
  return from_array<simde__m512>(a, 16);
}

}  // namespace tandem::simde_fill

#undef _mm512_cvtepi8_epi32
#undef _mm512_cvtepu8_epi32
#undef _mm512_cvtepi32_epi8
#undef _mm512_cvtepi32_ps
#undef _mm512_cvtps_epi32
#undef _mm512_cvtph_ps
#undef _mm512_cvtne2ps_pbh
#undef _mm512_cvtneps_pbh
#undef _mm512_reduce_add_epi32
#undef _mm512_reduce_max_ps
#undef _mm512_reduce_or_epi64
#undef _mm512_mask_storeu_ps
#undef _mm512_maskz_loadu_ps
#define _mm512_cvtepi8_epi32 ::tandem::simde_fill::cvtepi8_epi32
#define _mm512_cvtepu8_epi32 ::tandem::simde_fill::cvtepu8_epi32
#define _mm512_cvtepi32_epi8 ::tandem::simde_fill::cvtepi32_epi8
#define _mm512_cvtepi32_ps ::tandem::simde_fill::cvtepi32_ps
#define _mm512_cvtps_epi32 ::tandem::simde_fill::cvtps_epi32
#define _mm512_cvtph_ps ::tandem::simde_fill::cvtph_ps
#define _mm512_cvtne2ps_pbh ::tandem::simde_fill::cvtne2ps_pbh
#define _mm512_cvtneps_pbh ::tandem::simde_fill::cvtneps_pbh
#define _mm512_reduce_add_epi32 ::tandem::simde_fill::reduce_add_epi32
#define _mm512_reduce_max_ps ::tandem::simde_fill::reduce_max_ps
#define _mm512_reduce_or_epi64 ::tandem::simde_fill::reduce_or_epi64
#define _mm512_mask_storeu_ps ::tandem::simde_fill::mask_storeu_ps
#define _mm512_maskz_loadu_ps ::tandem::simde_fill::maskz_loadu_ps
