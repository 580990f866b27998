// INT8: symmetric, one fp32 scale per output channel (row), quantized online at load.
// Row layout: [fp32 scale][int8 q[K]]; w = scale * q, scale = max|w| / 127, q = rint(w / scale).
// The scale spans the whole row so NUMA slices of a row (down's columns) share it unchanged.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tandem {

struct INT8 {
  static constexpr const char* name = "INT8";
  static constexpr int block_elems = 1;
  static constexpr int block_bytes = 1;
  static constexpr int row_header = 4;  // the row's fp32 scale
  static constexpr bool online = true;

  static void dequant_row(const uint8_t* row, int K, float* y) {
    float scale;
    std::memcpy(&scale, row, 4);
    const auto* q = reinterpret_cast<const int8_t*>(row + row_header);
    for (int i = 0; i < K; ++i) y[i] = scale * float(q[i]);
  }

  // rint (ties to even) and an IEEE division, so numpy's np.rint(w / scale) gives the same bytes.
  static void quantize_row(const float* x, int K, uint8_t* row) {
    float amax = 0.0f;
    for (int i = 0; i < K; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float scale = amax / 127.0f;
    std::memcpy(row, &scale, 4);
    auto* q = reinterpret_cast<int8_t*>(row + row_header);
    for (int i = 0; i < K; ++i) {
      const float v = scale == 0.0f ? 0.0f : std::nearbyint(x[i] / scale);
      q[i] = int8_t(std::clamp(v, -127.0f, 127.0f));
    }
  }
};

}  // namespace tandem
