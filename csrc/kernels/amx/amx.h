// Declarations shared by the AMX translation units (compiled with the AVX-512 + AMX flags).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../kernels.h"

namespace tandem::amx {

// C[tokens x rows] on tiles: 16 x 64-byte tiles; tiles 0-3 accumulate 2 token tiles x 2 row
// groups, 4-5 hold activations, 6-7 weights.
void configure_tiles();

// BF16 tiled weights (tiled.h, R = 16) x BF16 activation rows, evenly spaced (m.act_stride).
void bf16_tiles(const MatArgs& m);

// The tiled int layout of `fmt` -> BF16 tiled rows of one group (16 rows, K % 32 == 0):
// w = scale * code - bias per row and scale block, rounded to bf16.
void dequant_group(Format fmt, const uint8_t* group, int K, uint8_t* out);
// The same for K-units [u0, u1) only (kDequantUnit weights of each row; the last may be partial),
// so a group can be expanded a piece at a time between other work.
inline constexpr int kDequantUnit = 256;
inline int dequant_unit_count(int K) { return (K + kDequantUnit - 1) / kDequantUnit; }
void dequant_units(Format fmt, const uint8_t* group, int K, uint8_t* out, int u0, int u1);

}  // namespace tandem::amx
