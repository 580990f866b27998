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

}  // namespace tandem::amx
