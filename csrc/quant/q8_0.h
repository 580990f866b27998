// GGUF Q8_0: 32 weights per block, w = d * q (d fp16, q int8). Consumed from the file's bytes.
#pragma once

#include <cstdint>

#include "half.h"

namespace tandem {

struct block_q8_0 {
  uint16_t d;  // fp16
  int8_t qs[32];
};
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block is 34 bytes");

struct Q8_0 {
  static constexpr const char* name = "Q8_0";
  using block = block_q8_0;
  static constexpr int block_elems = 32;
  static constexpr int block_bytes = sizeof(block);
  static constexpr int row_header = 0;
  static constexpr bool online = false;

  static void dequant_block(const block& b, float* y) {
    const float d = fp16_to_f32(b.d);
    for (int j = 0; j < 32; ++j) y[j] = float(b.qs[j]) * d;
  }
};

}  // namespace tandem
