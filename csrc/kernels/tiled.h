// The interleaved ("tiled") weight layout of the SIMD and AMX kernels: rows in groups of R
// (16 for AVX-512/AMX, 8 for AVX2), each group one contiguous region that a task streams in
// order. Inside a group the unit is the tile-row: R rows x 4 bytes, i.e. 4 consecutive int8
// codes (or 2 bf16) of every row, so one vector load feeds R independent dot products
// (vpdpbusd / dpbf16 with a broadcast activation: no horizontal sums), and 16 tile-rows are
// exactly an AMX B tile. The scale fields keep their file sizes, so a group of R full rows takes
// R times the format's row bytes (plus padding to 64 bytes).
//
// Codes are unsigned bytes (vpdpbusd and AMX multiply u8 weights by s8 activations):
//   BF16  no codes: tile-row j holds w[n][2j], w[n][2j+1] as bf16 at bytes 4n, 4n+2
//   INT8  code = q + 128          (w = scale[n] * (code - 128))
//   INT4  code = nibble 0..15     (w = d * (code - 8))
//   Q8_0  code = q + 128          (w = d * (code - 128))
//   Q5_0  code = 5-bit 0..31      (w = d * (code - 16))
//   Q4_K  code = 4-bit, Q5_K 5-bit (w = d * sc * code - dmin * m)
//   Q6_K  code = 6-bit 0..63      (w = d * sc * (code - 32))
// Planes (k counted from the start of the chunk; granule = k / 4, byte = 4n + k % 4):
//   int8 plane    tile-row per granule
//   nibble plane  tile-row i holds granule 2i in low nibbles, granule 2i + 1 in high nibbles
//   bit plane     tile-row per 8 granules: bit (granule % 8) = bit 4 of the code (5-bit formats)
//   crumb plane   tile-row per 4 granules: bits 2 (granule % 4) .. +1 = bits 4-5 (Q6_K)
//
// Functions are `static`: ISA translation units include this header (see act.h).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem::tiled {

static constexpr size_t up64(size_t n) { return (n + 63) / 64 * 64; }
static constexpr size_t tr(int R) { return 4 * size_t(R); }  // bytes of one tile-row

// BF16: Kp = K up to 32, Kp / 2 tile-rows.
static constexpr int bf16_kp(int K) { return (K + 31) / 32 * 32; }
static constexpr size_t bf16_group(int R, int K) { return size_t(bf16_kp(K)) * 2 * size_t(R); }

// INT8: [float scale[R]][int8 plane of Kp / 4 tile-rows], Kp = K up to 64.
static constexpr int int8_kp(int K) { return (K + 63) / 64 * 64; }
static constexpr size_t int8_codes(int R) { return 4 * size_t(R); }
static constexpr size_t int8_group(int R, int K) { return up64(int8_codes(R) + size_t(int8_kp(K)) * size_t(R)); }

// INT4: per 64-weight group: [float d[R]][nibble plane of 8 tile-rows] = 36 R bytes.
static constexpr size_t int4_chunk(int R) { return 36 * size_t(R); }
static constexpr size_t int4_group(int R, int K) { return up64(size_t(K / 64) * int4_chunk(R)); }

// Q8_0: int8 plane for all of K (32 R bytes per block), then fp16 d[block][R].
static constexpr size_t q8_0_chunk(int R) { return 32 * size_t(R); }
static constexpr size_t q8_0_dplane(int R, int K) { return size_t(K) * size_t(R); }
static constexpr size_t q8_0_group(int R, int K) { return up64(size_t(K / 32) * 34 * size_t(R)); }

// Q5_0: per block [nibble plane 4 tile-rows][bit plane 1 tile-row] = 20 R, then fp16 d[block][R].
static constexpr size_t q5_0_chunk(int R) { return 20 * size_t(R); }
static constexpr size_t q5_0_bits(int R) { return 16 * size_t(R); }
static constexpr size_t q5_0_dplane(int R, int K) { return size_t(K / 32) * q5_0_chunk(R); }
static constexpr size_t q5_0_group(int R, int K) { return up64(size_t(K / 32) * 22 * size_t(R)); }

// Q4_K per super-block: [fp16 d[R]][fp16 dmin[R]][12 planes x R packed 6-bit scales, byte b of
// row n at b * R + n][nibble plane 32 tile-rows] = 144 R. Q5_K adds [bit plane 8 tile-rows].
static constexpr size_t qk_dmin(int R) { return 2 * size_t(R); }
static constexpr size_t qk_scales(int R) { return 4 * size_t(R); }
static constexpr size_t qk_nibbles(int R) { return 16 * size_t(R); }
static constexpr size_t q5_k_bits(int R) { return 144 * size_t(R); }
static constexpr size_t q4_k_chunk(int R) { return 144 * size_t(R); }
static constexpr size_t q5_k_chunk(int R) { return 176 * size_t(R); }
static constexpr size_t q4_k_group(int R, int K) { return up64(size_t(K / 256) * q4_k_chunk(R)); }
static constexpr size_t q5_k_group(int R, int K) { return up64(size_t(K / 256) * q5_k_chunk(R)); }

// Q6_K per super-block: [16 planes x R int8 scales][nibble plane 32 tile-rows][crumb plane 16
// tile-rows] = 208 R; then fp16 d[super-block][R] (kept apart so chunks stay 64-byte multiples).
static constexpr size_t q6_k_nibbles(int R) { return 16 * size_t(R); }
static constexpr size_t q6_k_crumbs(int R) { return 144 * size_t(R); }
static constexpr size_t q6_k_chunk(int R) { return 208 * size_t(R); }
static constexpr size_t q6_k_dplane(int R, int K) { return size_t(K / 256) * q6_k_chunk(R); }
static constexpr size_t q6_k_group(int R, int K) { return up64(size_t(K / 256) * 210 * size_t(R)); }

}  // namespace tandem::tiled
