// Generic (portable C++) matmul for any format: decode one weight row to fp32, then dot it with
// every activation. Simple on purpose: this is the spec the ISA kernels are tested against.
#pragma once

#include "../kernels.h"

namespace tandem::generic {

// Eight independent partial sums let the compiler vectorize without -ffast-math.
inline float dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

template <class Fmt>
void matmul(const MatArgs& a) {
  float* row = a.scratch;  // [K]
  for (int r = 0; r < a.n_rows; ++r) {
    dequant_row<Fmt>(a.w + size_t(r) * a.row_bytes, a.K, row);
    for (int t = 0; t < a.n_act; ++t) a.y[size_t(t) * a.y_stride + r] = dot(row, a.act[t], a.K);
  }
}

}  // namespace tandem::generic
