// AMX kernels for many tokens per expert (prefill), and the AMX kernel table: the AVX-512
// table (same tiled layout, R = 16) plus `big` kernels:
//   INT8        int8 tiles: codes (u8) x per-token Q8 activations (s8), int32 sums over all K
//   INT4        int8 tiles: codes unpacked per 64 rows to s8, x Q8_64 activations, each 64-deep
//               product scaled into fp32 sums (int4_tiles)
//   BF16        bf16 tiles straight from the weights
//   the others  dequantized per 64 rows into a bf16 panel (dequant.cpp), then bf16 tiles
// A tile-row of the weight layout is a B-tile row, so B tiles load straight from the weights;
// activation rows are evenly spaced, so A tiles load straight from them. Each call covers
// 32 rows x 32 tokens at a time in 4 accumulator tiles; partial tiles compute padding rows
// that are never stored (activation buffers carry 32 spare rows for those reads).
// The loop nest and its cache reasoning: see kRowBlock. emulated.cpp builds this file again on
// software tiles (emulate.h) as the "amx-emu" ISA, for tests on CPUs without AMX.
#include <immintrin.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <string_view>

#ifdef TANDEM_AMX_EMULATE
#include "emulate.h"
#endif

#include "../avx512/simd.h"
#include "amx.h"
#include "../../env.h"

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

// Loop nest of one call: rows in blocks of kRowBlock (a task's rows), then
//   for 32 tokens: for a K block of kKChunks chunks: for 32 rows:
//       C tiles (parked in `cbuf` between K blocks) += A tiles x B tiles
// Tile registers are not renamed, so each step's tile loads wait for the products reading the
// previous tiles: the loads must hit L1/L2 (measured on SPR, one core: both operands in L1 88% of
// the INT8 peak, both in L2 60%, activations streaming from L3 per row pair 15-25%). Here a token
// tile's activations (32 x 512 B per K block) come from L3 once per row block and stay in L1 for
// every row pair; the row block's weights (<= 64 rows x K, at most 1 MB) stay in L2 for every
// token tile (prefetched there while the block before ran: Prefetch); C of one token tile
// (32 x 64 x 4 B) stays in L1. Parking C costs 8 tile moves per 4 * kKChunks tile products.
constexpr int kRowBlock = kBigRowBlock;
constexpr int kKChunks = 8;

// Expanding the next row block of a block-scaled format into the other bf16 panel, its K-units
// spread over the tile steps of the current block (dequant_tiles): the vector units expand while
// the tile unit multiplies, instead of one waiting for the other at every block.
struct Expand {
  Format fmt = Format::BF16;
  const uint8_t* w = nullptr;  // the block's first group
  size_t gb = 0;               // its group bytes
  uint8_t* out = nullptr;      // the panel: group i at out + i * pg
  size_t pg = 0;
  int K = 0, units = 0;        // units per group
  int done = 0, total = 0;
  int per_step = 0, every = 1, tick = 0;  // see spread

  // The `total` units over `steps` tile steps: per_step at a time, every `every` steps.
  void spread(long steps) {
    const long s = steps > 0 ? steps : 1;
    per_step = int((total + s - 1) / s);
    every = s > total ? int(s / total) : 1;
  }

  void run(int n) {
    for (const int end = avx512::min_int(total, done + n); done < end; ++done) {
      const int g = done / units, u = done % units;
      dequant_units(fmt, w + size_t(g) * gb, K, out + size_t(g) * pg, u, u + 1);
    }
  }
};

// A row block's weights come from DRAM: read by the tile loads of its first token tile alone,
// they would stall those loads in one burst while DRAM idles for the rest of the block. Instead
// each tile step of a block prefetches a share of the next block's weights into L2, so DRAM
// streams while the tiles run and the next block starts on L2-resident weights. The call's last
// block prefetches what the caller runs next (MatArgs::next: the next call's first block and
// first activation rows), so a call does not start cold either.
struct Prefetch {
  const uint8_t* p[2] = {nullptr, nullptr};  // ranges [p, end), prefetched in order
  const uint8_t* end[2] = {nullptr, nullptr};
  size_t step = 0;  // bytes per tile step (whole cache lines)
  Expand* expand = nullptr;  // a next block to expand meanwhile (dequant_tiles), or none

  void next() {
    size_t budget = step;
    for (int i = 0; i < 2 && budget > 0; ++i)
      for (; p[i] < end[i] && budget > 0; p[i] += 64, budget -= 64)
        _mm_prefetch(reinterpret_cast<const char*>(p[i]), _MM_HINT_T1);
    if (expand != nullptr && expand->done < expand->total && ++expand->tick >= expand->every) {
      expand->tick = 0;
      expand->run(expand->per_step);
    }
  }
};

// The weights of the row block after [r0, r0 + kRowBlock) (after the last: m.next), spread over
// the `steps` tile steps of the current block. TANDEM_AMX_PREFETCH=0 turns it off (for an A/B).
Prefetch next_block(const MatArgs& m, int r0, long steps) {
  static const bool enabled = env_switch_on("TANDEM_AMX_PREFETCH");
  Prefetch f;
  if (!enabled) return f;
  const int next = r0 + kRowBlock;
  if (next < m.n_rows) {
    const int groups = (avx512::min_int(kRowBlock, m.n_rows - next) + 15) / 16;
    f.p[0] = m.w + size_t(next / 16) * m.group_bytes;
    f.end[0] = f.p[0] + size_t(groups) * m.group_bytes;
  } else {
    f.p[0] = m.next.w, f.end[0] = m.next.w ? m.next.w + m.next.w_bytes : nullptr;
    f.p[1] = m.next.act, f.end[1] = m.next.act ? m.next.act + m.next.act_bytes : nullptr;
  }
  size_t bytes = 0;
  for (int i = 0; i < 2; ++i) bytes += size_t(f.end[i] - f.p[i]);
  const size_t lines = (bytes + 63) / 64;
  f.step = 64 * ((lines + size_t(steps) - 1) / size_t(steps > 0 ? steps : 1));
  return f;
}

// Tile steps of one row block: token tiles x chunks x row pairs.
long block_steps(int n_act, int chunks, int nr) { return long((n_act + 31) / 32) * chunks * ((nr + 31) / 32); }

struct Panel {
  const uint8_t* a;  // first token row; rows sa bytes apart, chunk k at 64 k
  long sa;
  int nt;            // tokens
  const uint8_t* b;  // first 16-row group of the block: B tile of chunk k at b + 1024 k
  size_t gb;         // group bytes
  int nr;            // rows (<= kRowBlock)
  int chunks;
  int32_t* c;        // [32][kRowBlock] 4-byte cells: one token tile (int32 or float)
  Prefetch* pf;      // the next block's weights, a share per tile step
};

template <bool Int8, int NT, int NG>
void tile_block(const Panel& p, const uint8_t* a0, int k0, int k1, int r) {
  const uint8_t* a1 = a0 + 16 * size_t(p.sa);
  const uint8_t* b0 = p.b + size_t(r / 16) * p.gb;
  const uint8_t* b1 = b0 + p.gb;
  int32_t* c = p.c + r;
  constexpr long ldc = 4 * kRowBlock;
  if (k0 == 0) {
    _tile_zero(0);
    if constexpr (NG == 2) _tile_zero(1);
    if constexpr (NT == 2) _tile_zero(2);
    if constexpr (NT == 2 && NG == 2) _tile_zero(3);
  } else {
    _tile_loadd(0, c, ldc);
    if constexpr (NG == 2) _tile_loadd(1, c + 16, ldc);
    if constexpr (NT == 2) _tile_loadd(2, c + 16 * kRowBlock, ldc);
    if constexpr (NT == 2 && NG == 2) _tile_loadd(3, c + 16 * kRowBlock + 16, ldc);
  }
  // Each load right before its first product: the products start as soon as their tiles land.
  for (int k = k0; k < k1; ++k) {
    p.pf->next();
    _tile_loadd(4, a0 + 64 * size_t(k), p.sa);
    _tile_loadd(6, b0 + 1024 * size_t(k), 64);
    if constexpr (Int8) _tile_dpbsud(0, 4, 6);
    else _tile_dpbf16ps(0, 4, 6);
    if constexpr (NG == 2) {
      _tile_loadd(7, b1 + 1024 * size_t(k), 64);
      if constexpr (Int8) _tile_dpbsud(1, 4, 7);
      else _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (NT == 2) {
      _tile_loadd(5, a1 + 64 * size_t(k), p.sa);
      if constexpr (Int8) _tile_dpbsud(2, 5, 6);
      else _tile_dpbf16ps(2, 5, 6);
      if constexpr (NG == 2) {
        if constexpr (Int8) _tile_dpbsud(3, 5, 7);
        else _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, ldc);
  if constexpr (NG == 2) _tile_stored(1, c + 16, ldc);
  if constexpr (NT == 2) _tile_stored(2, c + 16 * kRowBlock, ldc);
  if constexpr (NT == 2 && NG == 2) _tile_stored(3, c + 16 * kRowBlock + 16, ldc);
}

// p.c[t - t0][r] = sum over all K for tokens t0 .. t0 + 32 (fewer at the end) and the panel's rows.
template <bool Int8>
void tile_tokens(const Panel& p, int t0) {
  const uint8_t* a0 = p.a + size_t(t0) * size_t(p.sa);
  const bool two_t = p.nt - t0 > 16;
  for (int k0 = 0; k0 < p.chunks; k0 += kKChunks) {
    const int k1 = avx512::min_int(p.chunks, k0 + kKChunks);
    for (int r = 0; r < p.nr; r += 32) {
      const bool two_g = p.nr - r > 16;
      if (two_t && two_g) tile_block<Int8, 2, 2>(p, a0, k0, k1, r);
      else if (two_t) tile_block<Int8, 2, 1>(p, a0, k0, k1, r);
      else if (two_g) tile_block<Int8, 1, 2>(p, a0, k0, k1, r);
      else tile_block<Int8, 1, 1>(p, a0, k0, k1, r);
    }
  }
}

int32_t* c_buffer(const MatArgs& m) {
  return reinterpret_cast<int32_t*>(static_cast<uint8_t*>(m.scratch) + 4 * tiled::bf16_group(R, m.K));
}

inline __mmask16 row_mask(int left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

Panel panel_of(const MatArgs& m, size_t base, int chunks, int r0, int32_t* cbuf, Prefetch* pf) {
  Panel p;
  p.a = m.act[0];
  p.sa = long(m.act_stride);
  p.nt = m.n_act;
  p.b = m.w + size_t(r0 / 16) * m.group_bytes + base;
  p.gb = m.group_bytes;
  p.nr = avx512::min_int(kRowBlock, m.n_rows - r0);
  p.chunks = chunks;
  p.c = cbuf;
  p.pf = pf;
  return p;
}

// Vector loads of C right after the tile stores that wrote it wait for those stores, so each
// token tile's epilogue runs after the next token tile's products have been issued, from the
// other half of the double-buffered `cbuf` (the products and the epilogue then overlap).
template <class Epilogue>
void token_tiles(const Panel& p0, int n_act, bool int8, Epilogue&& epilogue) {
  Panel p = p0;
  int prev = -1;
  for (int t0 = 0, i = 0; t0 < n_act; t0 += 32, i ^= 1) {
    p.c = p0.c + i * 32 * kRowBlock;
    if (int8) tile_tokens<true>(p, t0);
    else tile_tokens<false>(p, t0);
    if (prev >= 0) epilogue(prev, p0.c + (i ^ 1) * 32 * kRowBlock);
    prev = t0;
  }
  if (prev >= 0) epilogue(prev, p0.c + ((n_act - 1) / 32 % 2) * 32 * kRowBlock);
}

void int8_tiles(const MatArgs& m) {
  configure_tiles();
  int32_t* cbuf = c_buffer(m);
  const int chunks = tiled::int8_kp(m.K) / 64;
  for (int r0 = 0; r0 < m.n_rows; r0 += kRowBlock) {
    const uint8_t* g = m.w + size_t(r0 / 16) * m.group_bytes;
    Prefetch pf = next_block(m, r0, block_steps(m.n_act, chunks, avx512::min_int(kRowBlock, m.n_rows - r0)));
    const Panel p = panel_of(m, tiled::int8_codes(R), chunks, r0, cbuf, &pf);
    // y = scale[r] * d[t] * (sum code * q - 128 * sum q); row scales and masks once per row block.
    const int nq = (p.nr + 15) / 16;
    __m512 scale[kRowBlock / 16];
    __mmask16 mask[kRowBlock / 16];
    for (int q = 0; q < nq; ++q) {
      scale[q] = _mm512_loadu_ps(g + size_t(q) * m.group_bytes);
      mask[q] = row_mask(p.nr - 16 * q);
    }
    token_tiles(p, m.n_act, true, [&](int t0, const int32_t* c) {
      for (int t = t0; t < avx512::min_int(m.n_act, t0 + 32); ++t) {
        const uint8_t* a = m.act[t];
        int32_t sum;
        std::memcpy(&sum, a + act::q8_row_sum(m.K), 4);
        const __m512 d = _mm512_set1_ps(avx512::load_f32(a + act::q8_row_d(m.K)));
        const __m512i off = _mm512_set1_epi32(128 * sum);
        float* y = m.y + size_t(t) * m.y_stride + r0;
        for (int q = 0; q < nq; ++q) {
          const __m512i v = _mm512_loadu_si512(c + (t - t0) * kRowBlock + 16 * q);
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, off)), d);
          _mm512_mask_storeu_ps(y + 16 * q, mask[q], _mm512_mul_ps(f, scale[q]));
        }
      }
    });
  }
  _tile_release();
}

// INT4 on int8 tiles. A 64-weight chunk of every row has its own scale d, which int8 tiles cannot
// absorb inside their sums, but a chunk is exactly one tile product deep (64 K): each chunk's
// int32 products are scaled by their rows' d into fp32 sums right after the tiles are stored.
// Per 64-row block the nibbles are unpacked once into signed bytes (code - 8) in the int8 tile
// layout (a scratch panel reused by every token tile); activations are Q8_64 (s8, one scale per
// token and 64), so y = sum over chunks of d[row][chunk] * d[token][chunk] * (int32 tile sum).
// Row pairs x token tiles of 32 x 32 outputs: 4 accumulator tiles per chunk, stored to one half of
// `cb` while the epilogue scales the previous chunk's half (the tile stores and the vector loads
// of the same chunk do not follow each other).
constexpr int kCb = 32 * 32;  // int32 cells of one chunk's 32 tokens x 32 rows

// Signed codes (nibble - 8) of one 16-row group, all of K: tile-row (granule) g at 64 g.
void int4_unpack(const uint8_t* g, int K, uint8_t* out) {
  const __m512i eight = _mm512_set1_epi8(8);
  for (int c = 0; c < K / 64; ++c) {
    const uint8_t* p = g + size_t(c) * tiled::int4_chunk(R) + 64;
    for (int i = 0; i < 8; ++i) {
      const __m512i v = avx512::load(p + 64 * size_t(i));
      uint8_t* o = out + 64 * size_t(16 * c + 2 * i);
      _mm512_storeu_si512(o, _mm512_sub_epi8(avx512::low_nibbles(v), eight));
      _mm512_storeu_si512(o + 64, _mm512_sub_epi8(avx512::high_nibbles(v), eight));
    }
  }
}

// acc[t][j] += d[j] * da[t] * c[t][j] for the 32 tokens (NT == 1: 16) and 32 rows of one chunk:
// d0, d1 the rows' scales (16 each), da the first token's scale of the chunk (tokens sa apart).
template <int NT>
inline void int4_scale(const int32_t* c, const uint8_t* d0, const uint8_t* d1, const uint8_t* da, long sa,
                       float* acc) {
  const __m512 s0 = _mm512_loadu_ps(d0), s1 = _mm512_loadu_ps(d1);
  for (int t = 0; t < 16 * NT; ++t) {
    float* a = acc + 32 * t;
    const __m512 dt = _mm512_set1_ps(avx512::load_f32(da + t * sa));
    const __m512 c0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + 32 * t)), dt);
    const __m512 c1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + 32 * t + 16)), dt);
    _mm512_storeu_ps(a, _mm512_fmadd_ps(c0, s0, _mm512_loadu_ps(a)));
    _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(c1, s1, _mm512_loadu_ps(a + 16)));
  }
}

// One token tile (a0: its first activation row, da0: that row's chunk scales) x one row pair (b0,
// b1: the pair's panel groups; w0, w1: the same groups in the weights, for the chunks' d) over all
// of K -> acc [32][32].
template <int NT>
void int4_pair(const uint8_t* a0, const uint8_t* da0, long sa, const uint8_t* b0, const uint8_t* b1,
               const uint8_t* w0, const uint8_t* w1, int chunks, int32_t* cb, float* acc, Prefetch& pf) {
  const uint8_t* a1 = a0 + 16 * size_t(sa);
  std::memset(acc, 0, sizeof(float) * 32 * 16 * NT);
  constexpr long ldc = 4 * 32;
  for (int k = 0; k < chunks; ++k) {
    pf.next();
    int32_t* c = cb + (k & 1) * kCb;
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(4, a0 + 64 * size_t(k), sa);
    _tile_loadd(6, b0 + 1024 * size_t(k), 64);
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(7, b1 + 1024 * size_t(k), 64);
    _tile_dpbssd(1, 4, 7);
    if constexpr (NT == 2) {
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(5, a1 + 64 * size_t(k), sa);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16, ldc);
    if constexpr (NT == 2) {
      _tile_stored(2, c + 16 * 32, ldc);
      _tile_stored(3, c + 16 * 32 + 16, ldc);
    }
    if (k > 0) {
      const size_t ch = size_t(k - 1) * tiled::int4_chunk(R);
      int4_scale<NT>(cb + ((k - 1) & 1) * kCb, w0 + ch, w1 + ch, da0 + 4 * size_t(k - 1), sa, acc);
    }
  }
  const size_t ch = size_t(chunks - 1) * tiled::int4_chunk(R);
  int4_scale<NT>(cb + ((chunks - 1) & 1) * kCb, w0 + ch, w1 + ch, da0 + 4 * size_t(chunks - 1), sa, acc);
}

void int4_tiles(const MatArgs& m) {
  configure_tiles();
  const int chunks = m.K / 64;
  const size_t pg = size_t(m.K) * 16;  // one group's unpacked codes
  uint8_t* panel = static_cast<uint8_t*>(m.scratch);
  int32_t* cb = c_buffer(m);
  float* acc = reinterpret_cast<float*>(cb + 2 * kCb);
  const long sa = long(m.act_stride);
  for (int r0 = 0; r0 < m.n_rows; r0 += kRowBlock) {
    const int nr = avx512::min_int(kRowBlock, m.n_rows - r0);
    const int ng = (nr + 15) / 16, pairs = (ng + 1) / 2;
    const uint8_t* w = m.w + size_t(r0 / 16) * m.group_bytes;
    Prefetch pf = next_block(m, r0, block_steps(m.n_act, chunks, nr));
    for (int i = 0; i < ng; ++i) int4_unpack(w + size_t(i) * m.group_bytes, m.K, panel + size_t(i) * pg);
    // An odd group count: the pair's second group is zero codes (its outputs are never stored) and
    // borrows the first group's scales.
    if (ng % 2) std::memset(panel + size_t(ng) * pg, 0, pg);
    for (int t0 = 0; t0 < m.n_act; t0 += 32) {
      const uint8_t* a0 = m.act[0] + size_t(t0) * size_t(sa);
      const int nt = avx512::min_int(32, m.n_act - t0);
      for (int q = 0; q < pairs; ++q) {
        const int g0 = 2 * q, g1 = g0 + 1 < ng ? g0 + 1 : g0;
        const uint8_t *b0 = panel + size_t(g0) * pg, *b1 = panel + size_t(g0 + 1) * pg;
        const uint8_t *w0 = w + size_t(g0) * m.group_bytes, *w1 = w + size_t(g1) * m.group_bytes;
        const uint8_t* da0 = a0 + act::q8_64_d(m.K);
        if (nt > 16) int4_pair<2>(a0, da0, sa, b0, b1, w0, w1, chunks, cb, acc, pf);
        else int4_pair<1>(a0, da0, sa, b0, b1, w0, w1, chunks, cb, acc, pf);
        const int rows = avx512::min_int(32, nr - 32 * q);
        for (int t = 0; t < nt; ++t) {
          float* y = m.y + size_t(t0 + t) * m.y_stride + r0 + 32 * q;
          for (int h = 0; h * 16 < rows; ++h)
            _mm512_mask_storeu_ps(y + 16 * h, row_mask(rows - 16 * h), _mm512_loadu_ps(acc + 32 * t + 16 * h));
        }
      }
    }
  }
  _tile_release();
}

// Rows r0_w .. r0_w + nr of m's weights -> y columns r0_y ... (pf: what to prefetch meanwhile).
void bf16_rows(const MatArgs& m, int r0_w, int r0_y, int nr, Prefetch& pf) {
  Panel p = panel_of(m, 0, tiled::bf16_kp(m.K) / 32, r0_w, c_buffer(m), &pf);
  p.nr = nr;
  token_tiles(p, m.n_act, false, [&](int t0, const int32_t* ci) {
    const float* c = reinterpret_cast<const float*>(ci);
    for (int t = t0; t < avx512::min_int(m.n_act, t0 + 32); ++t)
      for (int q = 0; q * 16 < nr; ++q)
        _mm512_mask_storeu_ps(m.y + size_t(t) * m.y_stride + r0_y + 16 * q, row_mask(nr - 16 * q),
                              _mm512_loadu_ps(c + (t - t0) * kRowBlock + 16 * q));
  });
}

void bf16_tiles_body(const MatArgs& m) {
  for (int r0 = 0; r0 < m.n_rows; r0 += kRowBlock) {
    const int nr = avx512::min_int(kRowBlock, m.n_rows - r0);
    Prefetch pf = next_block(m, r0, block_steps(m.n_act, tiled::bf16_kp(m.K) / 32, nr));
    bf16_rows(m, r0, r0, nr, pf);
  }
}

// Block-scaled formats: kRowBlock rows at a time, dequantized into a bf16 panel, then bf16 tiles.
// Where two panels fit beside L2's other load (K <= kOverlapMaxK), the next block is expanded into
// the second panel during the current block's tile steps (Expand), and the weights prefetched are
// the block after it. Off unless TANDEM_AMX_OVERLAP=1: on the AMX box (session 9, H100 host,
// 14 threads) it made Q4_K slower, one call of 256 rows x 48 tokens 0.192 ms against 0.104 ms, and
// V2-Lite's Q4_K_M layer at T=2048 73.5 ms against 52.1 ms (the vector and tile units share the
// core's load ports and L1, so the expansion does not hide behind the tiles).
constexpr int kOverlapMaxK = 3072;  // two panels of 64 rows: <= 768 KB

bool overlap_for(int K) {
  static const bool enabled = env_opt_in("TANDEM_AMX_OVERLAP");
  return enabled && K <= kOverlapMaxK;
}

size_t c_area_bytes() { return size_t(2 * 32) * kRowBlock * 4 + 64; }

template <Format F>
void dequant_tiles(const MatArgs& m) {
  configure_tiles();
  const size_t pg = tiled::bf16_group(R, m.K);
  const bool overlap = overlap_for(m.K);
  uint8_t* panels[2] = {static_cast<uint8_t*>(m.scratch), static_cast<uint8_t*>(m.scratch)};
  if (overlap) panels[1] += 4 * pg + c_area_bytes();  // after the first panel and the C buffers
  const auto groups_of = [&](int r0) { return (avx512::min_int(kRowBlock, m.n_rows - r0) + 15) / 16; };
  const auto expand_all = [&](int r0, uint8_t* out) {
    for (int i = 0; i < groups_of(r0); ++i) dequant_group(F, m.w + size_t(r0 / 16 + i) * m.group_bytes, m.K, out + size_t(i) * pg);
  };
  if (overlap) expand_all(0, panels[0]);
  for (int r0 = 0, b = 0; r0 < m.n_rows; r0 += kRowBlock, ++b) {
    const int nr = avx512::min_int(kRowBlock, m.n_rows - r0);
    uint8_t* panel = panels[b & 1];
    const long steps = block_steps(m.n_act, tiled::bf16_kp(m.K) / 32, nr);
    Expand ex;
    Prefetch pf;
    if (overlap) {
      pf = next_block(m, r0 + kRowBlock, steps);  // the block after the one expanded meanwhile (or m.next)
      if (r0 + kRowBlock < m.n_rows) {
        ex.fmt = F, ex.w = m.w + size_t((r0 + kRowBlock) / 16) * m.group_bytes, ex.gb = m.group_bytes;
        ex.out = panels[(b + 1) & 1], ex.pg = pg, ex.K = m.K, ex.units = dequant_unit_count(m.K);
        ex.total = groups_of(r0 + kRowBlock) * ex.units;
        ex.spread(steps);
        pf.expand = &ex;
      }
    } else {
      pf = next_block(m, r0, steps);
      expand_all(r0, panel);
    }
    MatArgs sub = m;
    sub.w = panel;
    sub.group_bytes = pg;
    bf16_rows(sub, 0, r0, nr, pf);
    ex.run(ex.total);  // what the tile steps left (none when they outnumber the units)
  }
  _tile_release();
}

size_t scratch_bytes(int K) {
  const size_t panel = 4 * tiled::bf16_group(R, K);
  return panel + c_area_bytes() + (overlap_for(K) ? panel : 0);
}

KernelTable make_table() {
  // TANDEM_AMX_INT4=bf16: INT4 prefill on bf16 tiles (dequantized) as before the int8 path, for
  // comparing the two on one machine.
  const char* int4_path = std::getenv("TANDEM_AMX_INT4");
  const bool int4_bf16 = int4_path != nullptr && std::string_view(int4_path) == "bf16";
  KernelTable t = avx512_kernels();
#ifdef TANDEM_AMX_EMULATE
  t.isa = "amx-emu";
#else
  t.isa = "amx";
#endif
  t.scratch_bytes = &scratch_bytes;
  for (int i = 0; i < kFormatCount; ++i) {
    FormatKernels& k = t.fmt[i];
    switch (Format(i)) {
      case Format::INT8: k.big = &int8_tiles, k.big_act = ActKind::Q8_ROW, k.big_min = 8, k.big_path = "amx-int8"; break;
      case Format::BF16: k.big = &bf16_tiles, k.big_act = ActKind::BF16, k.big_min = 8, k.big_path = "amx-bf16"; break;
      case Format::INT4:
        if (int4_bf16) k.big = &dequant_tiles<Format::INT4>;
        else k.big = &int4_tiles, k.big_act = ActKind::Q8_64, k.big_min = 8, k.big_path = "amx-int8 (int4 unpacked)";
        break;
      case Format::Q8_0: k.big = &dequant_tiles<Format::Q8_0>; break;
      case Format::Q5_0: k.big = &dequant_tiles<Format::Q5_0>; break;
      case Format::Q4_K: k.big = &dequant_tiles<Format::Q4_K>; break;
      case Format::Q5_K: k.big = &dequant_tiles<Format::Q5_K>; break;
      case Format::Q6_K: k.big = &dequant_tiles<Format::Q6_K>; break;
    }
    // Expanding to bf16 costs the same per weight whatever the tokens: below ~16 tokens an expert
    // the AVX-512 VNNI kernels are faster (V2-Lite's Q4_K_M layer, 14 threads, session 18: 12
    // tokens an expert 6.87 ms VNNI vs 7.45 AMX; 48 tokens 20.6 vs 12.9).
    if (k.big_path == nullptr) k.big_act = ActKind::BF16, k.big_min = 16, k.big_path = "amx-bf16 (dequantized)";
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

#ifdef TANDEM_AMX_EMULATE
const KernelTable& amx_emulated_kernels() {
  static const KernelTable table = amx::make_table();
  return table;
}
#else
const KernelTable& amx_kernels() {
  static const KernelTable table = amx::make_table();
  return table;
}

uint64_t amx_spin(bool bf16, long iters) {
  // The operand tiles hold data as a kernel's would (random int8 codes; bf16 values of both signs
  // and magnitudes near 1), not zeros: a tile unit multiplying zeros may draw less power and let
  // the cores clock higher than any kernel's operands do (the lent boxes' readings of the zeroed
  // peak fell in two groups, ~28-42 and ~56-84 TOP/s INT8).
  alignas(64) static const auto operands = [] {
    std::array<std::array<uint8_t, 4096>, 2> t{};  // [int8, bf16]: tiles 4..7, 1 KB each
    uint32_t x = 2463534242u;
    for (size_t i = 0; i < 4096; ++i) {
      x ^= x << 13, x ^= x >> 17, x ^= x << 5;
      t[0][i] = uint8_t(x);
      if (i % 2 == 0) {
        const uint16_t v = uint16_t(0x3f00 + (x >> 8) % 0x100) ^ uint16_t((x & 1) << 15);  // +-[0.5, 2)
        std::memcpy(&t[1][i], &v, 2);
      }
    }
    return t;
  }();
  const uint8_t* data = operands[bf16 ? 1 : 0].data();
  amx::configure_tiles();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, data, 64);
  _tile_loadd(5, data + 1024, 64);
  _tile_loadd(6, data + 2048, 64);
  _tile_loadd(7, data + 3072, 64);
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

#endif

}  // namespace tandem
