// Generic (portable C++) matmul for any format: decode one weight row to fp32, then dot it with
// every activation (fp32, ActKind::F32). Simple on purpose: this is the spec the ISA kernels are
// tested against.
#pragma once

#include <cstring>

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

// Rows are kept as the file has them: a "group" is one row.
template <class Fmt>
size_t row_bytes(int K) {
  return size_t(Fmt::row_header) + size_t(K / Fmt::block_elems) * size_t(Fmt::block_bytes);
}

template <class Fmt>
void pack_rows(const uint8_t* const* rows, int n, int K, uint8_t* group) {
  if (n > 0) std::memcpy(group, rows[0], row_bytes<Fmt>(K));
}

template <class Fmt>
void matmul(const MatArgs& a) {
  auto* row = static_cast<float*>(a.scratch);  // [K]
  for (int r = 0; r < a.n_rows; ++r) {
    dequant_row<Fmt>(a.w + size_t(r) * a.group_bytes, a.K, row);
    for (int t = 0; t < a.n_act; ++t)
      a.y[size_t(t) * a.y_stride + size_t(r)] = dot(row, reinterpret_cast<const float*>(a.act[t]), a.K);
  }
}

}  // namespace tandem::generic
