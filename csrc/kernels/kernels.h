// The contract every ISA's kernels share. The generic kernels are its executable spec; an ISA
// kernel fills the same table and is tested against them (dispatch.cpp picks one table).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../quant/format.h"

namespace tandem {

// y[t * y_stride + r] = dot(row r of W, act[t]) for r < n_rows, t < n_act.
// W rows are `row_bytes` apart in the format's layout; activations are fp32 vectors of K.
struct MatArgs {
  const uint8_t* w;
  size_t row_bytes;
  int n_rows;
  int K;
  const float* const* act;  // n_act pointers (tokens gathered without a copy)
  int n_act;
  float* y;
  size_t y_stride;
  float* scratch;  // scratch_floats(K) floats owned by the calling worker
};

using MatFn = void (*)(const MatArgs&);

struct KernelTable {
  const char* isa;
  int rows_per_task;                // rows of W one task covers (the kernel's natural tile)
  size_t (*scratch_floats)(int K);  // per-worker scratch a MatFn needs for a K-long row
  MatFn matmul[kFormatCount];       // indexed by Format
};

const KernelTable& generic_kernels();

}  // namespace tandem
