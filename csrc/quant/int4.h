// INT4: symmetric, group-wise along K (64 weights per group, one fp32 scale), quantized online.
// Symmetric (no zero point) so a later int8 matrix-unit kernel can feed (q - 8) straight into its
// tiles; 64 matches one 64-byte AVX-512/AMX row of int8. 4.5 bits per weight.
// Element j < 32 is the low nibble of qs[j], element j + 32 its high nibble; w = d * (nibble - 8),
// d = max|w| / 7, nibble = clamp(rint(w / d), -8, 7) + 8.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tandem {

struct block_int4 {
  float d;
  uint8_t qs[32];
};
static_assert(sizeof(block_int4) == 36, "INT4 block is 36 bytes");

struct INT4 {
  static constexpr const char* name = "INT4";
  using block = block_int4;
  static constexpr int block_elems = 64;
  static constexpr int block_bytes = sizeof(block);
  static constexpr int row_header = 0;
  static constexpr bool online = true;

  static void dequant_block(const block& b, float* y) {
    for (int j = 0; j < 32; ++j) {
      y[j] = b.d * float(int(b.qs[j] & 0x0f) - 8);
      y[j + 32] = b.d * float(int(b.qs[j] >> 4) - 8);
    }
  }

  static void quantize_block(const float* x, block& b) {
    float amax = 0.0f;
    for (int j = 0; j < 64; ++j) amax = std::max(amax, std::fabs(x[j]));
    b.d = amax / 7.0f;
    uint8_t nib[64];
    for (int j = 0; j < 64; ++j) {
      const float v = b.d == 0.0f ? 0.0f : std::nearbyint(x[j] / b.d);
      nib[j] = uint8_t(int(std::clamp(v, -8.0f, 7.0f)) + 8);
    }
    for (int j = 0; j < 32; ++j) b.qs[j] = uint8_t(nib[j] | (nib[j + 32] << 4));
  }
};

}  // namespace tandem
