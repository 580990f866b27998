// Activation layouts: what a kernel reads for one token (one row of K activations), prepared
// once per call. Rows start 64-byte aligned; every layout begins with its values so that a tile
// kernel can load [tokens x 64 bytes] straight from evenly spaced rows.
//
//   F32     float x[K]                                       (generic kernels)
//   BF16    bf16 x[Kp], Kp = K rounded up to 32, zero padded (dpbf16 / AMX-BF16)
//   Q8_32   int8 q[Kp] (Kp = K rounded up to 64, zero padded), then per 32-block b:
//           float d[b], float s[b] = d[b] * sum(q of b), then float total = sum of s
//           x ~= d[b] * q; for Q8_0 / Q5_0 / INT4 / INT8 weights (their blocks are <= 64)
//   Q8_K    int8 q[K] (K % 256 == 0), float d[K/256], float s16[K/16] = sum(q) per 16
//           (unscaled: the integer sub-block scales of k-quants multiply them first)
//   Q8_ROW  int8 q[Kp] (Kp = K rounded up to 64), float d, int32 sum(q): one scale per token,
//           so a tile kernel can sum int32 over all of K (AMX-INT8 on INT8 weights)
//   Q8_64   int8 q[Kp] (Kp = K rounded up to 64), then float d[Kp / 64]: one scale per 64,
//           the depth of one int8 tile product (AMX-INT8 on INT4 weights, whose scales are per 64)
// Quantization: d = max|x| / 127, q = round-to-nearest-even(x / d) (0 when d == 0).
//
// Functions here are `static` on purpose: ISA translation units include this header, and a
// shared inline function compiled with their -m flags could be picked by the linker for
// baseline code.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem::act {

static constexpr size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

static constexpr int bf16_k(int K) { return int(round_up(size_t(K), 32)); }
static constexpr int q8_k(int K) { return int(round_up(size_t(K), 64)); }

static constexpr size_t f32_bytes(int K) { return round_up(4 * size_t(K), 64); }
static constexpr size_t bf16_bytes(int K) { return 2 * size_t(bf16_k(K)); }

// Q8_32: offsets of d[], s[] and total.
static constexpr size_t q8_32_d(int K) { return size_t(q8_k(K)); }
static constexpr size_t q8_32_s(int K) { return q8_32_d(K) + 4 * size_t(q8_k(K) / 32); }
static constexpr size_t q8_32_total(int K) { return q8_32_s(K) + 4 * size_t(q8_k(K) / 32); }
static constexpr size_t q8_32_bytes(int K) { return round_up(q8_32_total(K) + 4, 64); }

// Q8_K: offsets of d[] and s16[].
static constexpr size_t q8_k_d(int K) { return size_t(K); }
static constexpr size_t q8_k_s16(int K) { return size_t(K) + 4 * size_t(K / 256); }
static constexpr size_t q8_k_bytes(int K) { return round_up(q8_k_s16(K) + 4 * size_t(K / 16), 64); }

// Q8_ROW: offsets of d and sum.
static constexpr size_t q8_row_d(int K) { return size_t(q8_k(K)); }
static constexpr size_t q8_row_sum(int K) { return q8_row_d(K) + 4; }
static constexpr size_t q8_row_bytes(int K) { return round_up(q8_row_sum(K) + 4, 64); }

// Q8_64: offset of d[].
static constexpr size_t q8_64_d(int K) { return size_t(q8_k(K)); }
static constexpr size_t q8_64_bytes(int K) { return round_up(q8_64_d(K) + 4 * size_t(q8_k(K) / 64), 64); }

}  // namespace tandem::act
