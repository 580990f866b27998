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

// Lane by lane: N lanes of A in v -> f(lane) as N lanes of R in an RV.
template <class RV, class R, class A, int N, class V, class F>
inline RV lanes(const V& v, F f) {
  A a[N];
  R r[N];
  to_array(v, a, N);
  for (int i = 0; i < N; ++i) r[i] = f(a[i]);
  return from_array<RV>(r, N);
}

inline simde__m512i cvtepi8_epi32(simde__m128i v) { return lanes<simde__m512i, int32_t, int8_t, 16>(v, [](int8_t x) { return int32_t(x); }); }
inline simde__m512i cvtepu8_epi32(simde__m128i v) { return lanes<simde__m512i, int32_t, uint8_t, 16>(v, [](uint8_t x) { return int32_t(x); }); }
// truncating, as vpmovdb
inline simde__m128i cvtepi32_epi8(simde__m512i v) { return lanes<simde__m128i, int8_t, int32_t, 16>(v, [](int32_t x) { return int8_t(x); }); }
inline simde__m512 cvtepi32_ps(simde__m512i v) { return lanes<simde__m512, float, int32_t, 16>(v, [](int32_t x) { return float(x); }); }
// nearest even, as the default MXCSR
inline simde__m512i cvtps_epi32(simde__m512 v) { return lanes<simde__m512i, int32_t, float, 16>(v, [](float x) { return int32_t(std::nearbyint(x)); }); }
// F16C (in the AVX2 flags)
inline simde__m512 cvtph_ps(simde__m256i v) { return lanes<simde__m512, float, uint16_t, 16>(v, [](uint16_t x) { return _cvtsh_ss(x); }); }
inline simde__m256i cvtneps_pbh(simde__m512 v) { return lanes<simde__m256i, uint16_t, float, 16>(v, bf16); }
inline simde__m512i cvtne2ps_pbh(simde__m512 a, simde__m512 b) {  // words 0..15 from b, 16..31 from a
  float fa[16], fb[16];
  uint16_t r[32];
  to_array(a, fa, 16);
  to_array(b, fb, 16);
  for (int i = 0; i < 16; ++i) r[i] = bf16(fb[i]), r[16 + i] = bf16(fa[i]);
  return from_array<simde__m512i>(r, 32);
}
// The N lanes of A in v folded left to right from `init`.
template <class A, int N, class V, class F>
inline A fold(const V& v, A init, F f) {
  A a[N];
  to_array(v, a, N);
  for (int i = 0; i < N; ++i) init = f(init, a[i]);
  return init;
}

inline int reduce_add_epi32(simde__m512i v) {  // wrapping, as the vector adds
  return fold<int32_t, 16>(v, 0, [](int32_t s, int32_t x) { return int32_t(uint32_t(s) + uint32_t(x)); });
}
inline float reduce_max_ps(simde__m512 v) {
  return fold<float, 16>(v, -INFINITY, [](float m, float x) { return x > m ? x : m; });
}
inline long long reduce_or_epi64(simde__m512i v) {
  return fold<long long, 8>(v, 0LL, [](long long s, long long x) { return s | x; });
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
