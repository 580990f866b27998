// BF16: weights kept as bf16 rows (no blocks, no scales); any row length.
#pragma once

#include <cstddef>
#include <cstdint>

#include "half.h"

namespace tandem {

struct BF16 {
  static constexpr const char* name = "BF16";
  static constexpr int block_elems = 1;
  static constexpr int block_bytes = 2;
  static constexpr int row_header = 0;
  static constexpr bool online = true;  // built at load from float32/bfloat16 tensors

  static void dequant_row(const uint8_t* row, int K, float* y) {
    for (int i = 0; i < K; ++i) {
      uint16_t b;
      std::memcpy(&b, row + 2 * size_t(i), 2);
      y[i] = bf16_to_f32(b);
    }
  }

  static void quantize_row(const float* x, int K, uint8_t* row) {
    for (int i = 0; i < K; ++i) {
      const uint16_t b = f32_to_bf16(x[i]);
      std::memcpy(row + 2 * size_t(i), &b, 2);
    }
  }
};

}  // namespace tandem
