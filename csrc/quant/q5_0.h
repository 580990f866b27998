// GGUF Q5_0: 32 weights per block, w = d * (q - 16), q = 4 low bits in qs + 1 high bit in qh.
// Element j < 16: low nibble of qs[j], high bit = bit j of qh (little-endian u32);
// element j + 16: high nibble of qs[j], high bit = bit j + 16.
#pragma once

#include <cstdint>
#include <cstring>

#include "half.h"

namespace tandem {

struct block_q5_0 {
  uint16_t d;  // fp16
  uint8_t qh[4];
  uint8_t qs[16];
};
static_assert(sizeof(block_q5_0) == 22, "Q5_0 block is 22 bytes");

struct Q5_0 {
  static constexpr const char* name = "Q5_0";
  using block = block_q5_0;
  static constexpr int block_elems = 32;
  static constexpr int block_bytes = sizeof(block);
  static constexpr int row_header = 0;
  static constexpr bool online = false;

  static void dequant_block(const block& b, float* y) {
    const float d = fp16_to_f32(b.d);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < 16; ++j) {
      const int lo = int((b.qs[j] & 0x0f) | (((qh >> j) & 1u) << 4)) - 16;
      const int hi = int((b.qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16;
      y[j] = d * float(lo);
      y[j + 16] = d * float(hi);
    }
  }
};

}  // namespace tandem
