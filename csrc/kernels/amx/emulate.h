// Software AMX tiles under the intrinsics' own names, for building the AMX kernels (tiles.cpp,
// dequant.cpp) a second time as the "amx-emu" ISA: it runs on any AVX-512 CPU, so CI checks the
// tile kernels' loop nests, strides, padding and epilogues although it has no AMX. Speed means
// nothing there; only the results do. Semantics from Intel's SDM (palette 1): 8 tiles of up to
// 16 rows x 64 bytes, shapes from the last loaded config; a load fills `rows` rows of `colsb`
// bytes and zeroes the rest; dot products run over A's columns in 4-byte (int8) or 2 x bf16
// groups, C[m][n] accumulating in order of k; bf16 products are exact in fp32, sums round to
// nearest even, denormal inputs and results flush to zero (DAZ/FTZ).
// Include after <immintrin.h>: the real intrinsics are replaced from here on.
#pragma once

#include <cstdint>
#include <cstring>

namespace tandem::amx_emulation {

struct Tiles {
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) uint8_t data[8][16][64] = {};
};

inline thread_local Tiles tiles;

inline void loadconfig(const void* cfg) {
  const auto* b = static_cast<const uint8_t*>(cfg);
  for (int t = 0; t < 8; ++t) {
    std::memcpy(&tiles.colsb[t], b + 16 + 2 * t, 2);
    tiles.rows[t] = b[48 + t];
  }
  std::memset(tiles.data, 0, sizeof(tiles.data));
}

inline void release() { tiles = Tiles{}; }

inline void zero(int t) { std::memset(tiles.data[t], 0, sizeof(tiles.data[t])); }

inline void load(int t, const void* base, long stride) {
  zero(t);
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(tiles.data[t][r], static_cast<const uint8_t*>(base) + r * stride, tiles.colsb[t]);
}

inline void store(int t, void* base, long stride) {
  for (int r = 0; r < tiles.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.data[t][r], tiles.colsb[t]);
}

template <bool SignedA, bool SignedB>
void dp_int8(int c, int a, int b) {
  const int M = tiles.rows[c], N = tiles.colsb[c] / 4, K = tiles.colsb[a] / 4;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      int32_t acc;
      std::memcpy(&acc, tiles.data[c][m] + 4 * n, 4);
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < 4; ++i) {
          const uint8_t x = tiles.data[a][m][4 * k + i], y = tiles.data[b][k][4 * n + i];
          const int32_t xv = SignedA ? int32_t(int8_t(x)) : int32_t(x);
          const int32_t yv = SignedB ? int32_t(int8_t(y)) : int32_t(y);
          acc = int32_t(uint32_t(acc) + uint32_t(xv * yv));  // wraps, as the hardware does
        }
      std::memcpy(tiles.data[c][m] + 4 * n, &acc, 4);
    }
}

inline float flush(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  std::memcpy(&v, &u, 4);
  return v;
}

inline float bf16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t u = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return flush(v);
}

inline void dp_bf16(int c, int a, int b) {
  const int M = tiles.rows[c], N = tiles.colsb[c] / 4, K = tiles.colsb[a] / 4;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc;
      std::memcpy(&acc, tiles.data[c][m] + 4 * n, 4);
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < 2; ++i)
          acc = flush(acc + bf16_at(tiles.data[a][m] + 4 * k + 2 * i) * bf16_at(tiles.data[b][k] + 4 * n + 2 * i));
      std::memcpy(tiles.data[c][m] + 4 * n, &acc, 4);
    }
}

}  // namespace tandem::amx_emulation

#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbsud
#undef _tile_dpbusd
#undef _tile_dpbuud
#undef _tile_dpbf16ps
// _tile_loadconfig and _tile_release are functions in GCC's headers: these macros shadow them.
#define _tile_loadconfig(cfg) ::tandem::amx_emulation::loadconfig(cfg)
#define _tile_release() ::tandem::amx_emulation::release()
#define _tile_loadd(t, base, stride) ::tandem::amx_emulation::load(t, base, long(stride))
#define _tile_stream_loadd(t, base, stride) ::tandem::amx_emulation::load(t, base, long(stride))
#define _tile_stored(t, base, stride) ::tandem::amx_emulation::store(t, base, long(stride))
#define _tile_zero(t) ::tandem::amx_emulation::zero(t)
#define _tile_dpbssd(c, a, b) ::tandem::amx_emulation::dp_int8<true, true>(c, a, b)
#define _tile_dpbsud(c, a, b) ::tandem::amx_emulation::dp_int8<true, false>(c, a, b)
#define _tile_dpbusd(c, a, b) ::tandem::amx_emulation::dp_int8<false, true>(c, a, b)
#define _tile_dpbuud(c, a, b) ::tandem::amx_emulation::dp_int8<false, false>(c, a, b)
#define _tile_dpbf16ps(c, a, b) ::tandem::amx_emulation::dp_bf16(c, a, b)
