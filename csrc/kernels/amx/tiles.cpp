// AMX kernels for many tokens per expert (prefill), and the AMX kernel table: the AVX-512
// table (same tiled layout, R = 16) plus `big` kernels:
//   INT8        int8 tiles: codes (u8) x per-token Q8 activations (s8), int32 sums over all K
//   BF16        bf16 tiles straight from the weights
//   the others  dequantized per 32 rows into a bf16 panel (dequant.cpp), then bf16 tiles
// A tile-row of the weight layout is a B-tile row, so B tiles load straight from the weights;
// activation rows are evenly spaced, so A tiles load straight from them. Each call covers
// 32 rows x 32 tokens at a time in 4 accumulator tiles; partial tiles compute padding rows
// that are never stored (activation buffers carry 32 spare rows for those reads).
// The loop nest and its cache reasoning: see tile_panel.
#include <immintrin.h>

#include "../avx512/simd.h"
#include "amx.h"

namespace tandem::amx {

namespace {

using avx512::R;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loop nest of one call (rows r0.. in pairs of 16-row groups, tokens in blocks of kTokBlock):
//   for 32 rows: for a token block: for a K block of kKChunks chunks: for 32 tokens:
//       C tiles (parked in `cbuf` between K blocks) += A tiles x B tiles
// The B tiles of one K block (2 x kKChunks KB) stay in L1 while every 32-token tile of the block
// passes over them; A tiles stream from L2, prefetched one chunk ahead. Parking C costs 8 tile
// moves per 4 * kKChunks tile products.
constexpr int kTokBlock = 256;
constexpr int kKChunks = 8;

// Tokens (n_act) start at act[0] and are act_stride apart; weights: groups of 16 rows,
// group_bytes apart, each a sequence of 1 KB B tiles along K (chunk c at c * 1024 + base).
template <bool Int8, int NT, int NG>
void tile_block(const MatArgs& m, size_t base, int k0, int k1, int chunks, int t, int r0, int32_t* c, bool first,
                bool fetch_next) {
  const uint8_t* a0 = m.act[0] + size_t(t) * m.act_stride;
  const uint8_t* a1 = a0 + 16 * m.act_stride;
  const uint8_t* b0 = m.w + size_t(r0 / 16) * m.group_bytes + base;
  const uint8_t* b1 = b0 + m.group_bytes;
  const long sa = long(m.act_stride);
  if (first) {
    _tile_zero(0);
    if constexpr (NG == 2) _tile_zero(1);
    if constexpr (NT == 2) _tile_zero(2);
    if constexpr (NT == 2 && NG == 2) _tile_zero(3);
  } else {  // c: [32 tokens][32 rows], 4-byte cells
    _tile_loadd(0, c, 128);
    if constexpr (NG == 2) _tile_loadd(1, c + 16, 128);
    if constexpr (NT == 2) _tile_loadd(2, c + 16 * 32, 128);
    if constexpr (NT == 2 && NG == 2) _tile_loadd(3, c + 16 * 32 + 16, 128);
  }
  for (int k = k0; k < k1; ++k) {
    if (k + 1 < k1)
      for (int i = 0; i < 16 * NT; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(a0 + size_t(i) * m.act_stride + 64 * size_t(k + 1)), _MM_HINT_T0);
    if (fetch_next && k + kKChunks < chunks)
      for (int i = 0; i < 16; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(b0 + 1024 * size_t(k + kKChunks) + 64 * size_t(i)), _MM_HINT_T1);
        if constexpr (NG == 2)
          _mm_prefetch(reinterpret_cast<const char*>(b1 + 1024 * size_t(k + kKChunks) + 64 * size_t(i)), _MM_HINT_T1);
      }
    _tile_loadd(4, a0 + 64 * size_t(k), sa);
    _tile_loadd(6, b0 + 1024 * size_t(k), 64);
    if constexpr (NG == 2) _tile_loadd(7, b1 + 1024 * size_t(k), 64);
    if constexpr (NT == 2) _tile_loadd(5, a1 + 64 * size_t(k), sa);
    if constexpr (Int8) {
      _tile_dpbsud(0, 4, 6);
      if constexpr (NG == 2) _tile_dpbsud(1, 4, 7);
      if constexpr (NT == 2) _tile_dpbsud(2, 5, 6);
      if constexpr (NT == 2 && NG == 2) _tile_dpbsud(3, 5, 7);
    } else {
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NG == 2) _tile_dpbf16ps(1, 4, 7);
      if constexpr (NT == 2) _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT == 2 && NG == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  if constexpr (NG == 2) _tile_stored(1, c + 16, 128);
  if constexpr (NT == 2) _tile_stored(2, c + 16 * 32, 128);
  if constexpr (NT == 2 && NG == 2) _tile_stored(3, c + 16 * 32 + 16, 128);
}

// cbuf[t - tb][r - r0] = sum over all K for tokens tb .. tb + nt and rows r0 .. r0 + 32.
template <bool Int8>
void tile_panel(const MatArgs& m, size_t base, int chunks, int tb, int nt, int r0, int32_t* cbuf) {
  const bool two_g = m.n_rows - r0 > 16;
  for (int k0 = 0; k0 < chunks; k0 += kKChunks) {
    const int k1 = avx512::min_int(chunks, k0 + kKChunks);
    for (int t = 0; t < nt; t += 32) {
      int32_t* c = cbuf + t * 32;
      const bool two_t = nt - t > 16;
      const bool first = k0 == 0, fetch = t == 0;
      if (two_t && two_g) tile_block<Int8, 2, 2>(m, base, k0, k1, chunks, tb + t, r0, c, first, fetch);
      else if (two_t) tile_block<Int8, 2, 1>(m, base, k0, k1, chunks, tb + t, r0, c, first, fetch);
      else if (two_g) tile_block<Int8, 1, 2>(m, base, k0, k1, chunks, tb + t, r0, c, first, fetch);
      else tile_block<Int8, 1, 1>(m, base, k0, k1, chunks, tb + t, r0, c, first, fetch);
    }
  }
}

int32_t* c_buffer(const MatArgs& m) {
  return reinterpret_cast<int32_t*>(static_cast<uint8_t*>(m.scratch) + 2 * tiled::bf16_group(R, m.K));
}

inline __mmask16 row_mask(int left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

void int8_tiles(const MatArgs& m) {
  configure_tiles();
  int32_t* cbuf = c_buffer(m);
  const int chunks = tiled::int8_kp(m.K) / 64;
  for (int r0 = 0; r0 < m.n_rows; r0 += 32) {
    const int nr = avx512::min_int(32, m.n_rows - r0);
    const uint8_t* g = m.w + size_t(r0 / 16) * m.group_bytes;
    for (int tb = 0; tb < m.n_act; tb += kTokBlock) {
      const int nt = avx512::min_int(kTokBlock, m.n_act - tb);
      tile_panel<true>(m, tiled::int8_codes(R), chunks, tb, nt, r0, cbuf);
      // y = scale[r] * d[t] * (sum code * q - 128 * sum q)
      for (int t = tb; t < tb + nt; ++t) {
        const uint8_t* a = m.act[t];
        int32_t sum;
        std::memcpy(&sum, a + act::q8_row_sum(m.K), 4);
        const __m512 d = _mm512_set1_ps(avx512::load_f32(a + act::q8_row_d(m.K)));
        const __m512i off = _mm512_set1_epi32(128 * sum);
        for (int half = 0; half * 16 < nr; ++half) {
          const __m512 scale = _mm512_loadu_ps(g + size_t(half) * m.group_bytes);
          const __m512i v = _mm512_loadu_si512(cbuf + (t - tb) * 32 + 16 * half);
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, off)), d);
          _mm512_mask_storeu_ps(m.y + size_t(t) * m.y_stride + r0 + 16 * half, row_mask(nr - 16 * half),
                                _mm512_mul_ps(f, scale));
        }
      }
    }
  }
  _tile_release();
}

void bf16_tiles_body(const MatArgs& m) {
  auto* cbuf = c_buffer(m);
  const int chunks = tiled::bf16_kp(m.K) / 32;
  for (int r0 = 0; r0 < m.n_rows; r0 += 32) {
    const int nr = avx512::min_int(32, m.n_rows - r0);
    for (int tb = 0; tb < m.n_act; tb += kTokBlock) {
      const int nt = avx512::min_int(kTokBlock, m.n_act - tb);
      tile_panel<false>(m, 0, chunks, tb, nt, r0, cbuf);
      const float* c = reinterpret_cast<const float*>(cbuf);
      for (int t = tb; t < tb + nt; ++t)
        for (int half = 0; half * 16 < nr; ++half)
          _mm512_mask_storeu_ps(m.y + size_t(t) * m.y_stride + r0 + 16 * half, row_mask(nr - 16 * half),
                                _mm512_loadu_ps(c + (t - tb) * 32 + 16 * half));
    }
  }
}

// Block-scaled formats: 32 rows at a time, dequantized into the scratch panel, then bf16 tiles.
template <Format F>
void dequant_tiles(const MatArgs& m) {
  configure_tiles();
  uint8_t* panel = static_cast<uint8_t*>(m.scratch);
  const size_t pg = tiled::bf16_group(R, m.K);
  for (int r0 = 0; r0 < m.n_rows; r0 += 32) {
    const int ng = m.n_rows - r0 > 16 ? 2 : 1;
    for (int i = 0; i < ng; ++i) dequant_group(F, m.w + size_t(r0 / 16 + i) * m.group_bytes, m.K, panel + size_t(i) * pg);
    MatArgs sub = m;
    sub.w = panel;
    sub.group_bytes = pg;
    sub.n_rows = avx512::min_int(32, m.n_rows - r0);
    sub.y = m.y + r0;
    bf16_tiles_body(sub);
  }
  _tile_release();
}

size_t scratch_bytes(int K) { return 2 * tiled::bf16_group(R, K) + size_t(kTokBlock) * 32 * 4 + 64; }

KernelTable make_table() {
  KernelTable t = avx512_kernels();
  t.isa = "amx";
  t.scratch_bytes = &scratch_bytes;
  for (int i = 0; i < kFormatCount; ++i) {
    FormatKernels& k = t.fmt[i];
    switch (Format(i)) {
      case Format::INT8: k.big = &int8_tiles, k.big_act = ActKind::Q8_ROW, k.big_min = 8, k.big_path = "amx-int8"; break;
      case Format::BF16: k.big = &bf16_tiles, k.big_act = ActKind::BF16, k.big_min = 8, k.big_path = "amx-bf16"; break;
      case Format::INT4: k.big = &dequant_tiles<Format::INT4>; break;
      case Format::Q8_0: k.big = &dequant_tiles<Format::Q8_0>; break;
      case Format::Q5_0: k.big = &dequant_tiles<Format::Q5_0>; break;
      case Format::Q4_K: k.big = &dequant_tiles<Format::Q4_K>; break;
      case Format::Q5_K: k.big = &dequant_tiles<Format::Q5_K>; break;
      case Format::Q6_K: k.big = &dequant_tiles<Format::Q6_K>; break;
    }
    if (k.big_path == nullptr) k.big_act = ActKind::BF16, k.big_min = 8, k.big_path = "amx-bf16 (dequantized)";
  }
  return t;
}

}  // namespace

void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  // GCC does not model ldtilecfg as reading the struct and may drop the stores above once this
  // is inlined (tiles left unconfigured: #UD on the first tile op); the barrier keeps them.
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

void bf16_tiles(const MatArgs& m) {
  configure_tiles();
  bf16_tiles_body(m);
  _tile_release();
}

}  // namespace tandem::amx

namespace tandem {

const KernelTable& amx_kernels() {
  static const KernelTable table = amx::make_table();
  return table;
}

uint64_t amx_spin(bool bf16, long iters) {
  amx::configure_tiles();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (long i = 0; i < iters; ++i) {
    if (bf16) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    } else {
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_release();
  const uint64_t per_op = bf16 ? 2ull * 16 * 16 * 32 : 2ull * 16 * 16 * 64;
  return uint64_t(iters) * 4 * per_op;
}

}  // namespace tandem
