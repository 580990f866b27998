// A layer's routed-expert weights as the engine keeps them: per NUMA node, that node's slice of
// the intermediate dimension I (gate/up rows i0..i1 and the matching down columns), every expert,
// in the layout of the engine's kernels (rows in groups, see kernels/tiled.h; the generic
// kernels keep the file's rows), in memory first touched by that node's workers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "kernels/kernels.h"
#include "quant/format.h"
#include "tensor.h"
#include "threadpool.h"

namespace tandem {

// 64-byte aligned bytes (cache lines; the alignment ISA repacks will want).
class AlignedBytes {
 public:
  explicit AlignedBytes(size_t n = 0);
  uint8_t* data() const { return ptr_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> ptr_;
  size_t size_ = 0;
};

// One projection of one node's slice for all experts: [experts][groups][group_bytes], a group
// holding row_group rows (the last one zero-padded).
struct Matrix {
  Format fmt = Format::BF16;
  int experts = 0, rows = 0, cols = 0;
  int row_group = 1, groups = 0;
  size_t group_bytes = 0;
  AlignedBytes bytes;

  // The group holding row r (r a multiple of row_group).
  const uint8_t* at(int e, int r) const {
    return bytes.data() + (size_t(e) * size_t(groups) + size_t(r / row_group)) * group_bytes;
  }
  uint8_t* group_mut(int e, int g) { return bytes.data() + (size_t(e) * size_t(groups) + size_t(g)) * group_bytes; }
};

struct NodeSlice {
  int i0 = 0, i1 = 0;  // this node's rows of gate/up = columns of down
  Matrix gate, up, down;
};

struct Layer {
  int E = 0, H = 0, I = 0;
  Format fmt[3] = {Format::BF16, Format::BF16, Format::BF16};  // gate, up, down
  std::vector<NodeSlice> nodes;

  size_t bytes() const;
};

// A caller's weight tensor: float32/bfloat16 [E, rows, cols] for online formats (quantized here),
// or uint8 [E, rows, row_bytes] of rows already in the format's row layout (GGUF blocks; for
// online formats only when `raw`, e.g. a benchmark's random rows).
struct WeightSource {
  Format fmt;
  TensorView t;
  bool raw = false;
};

// Checks the three sources agree (gate/up [E, I, H], down [E, H, I]); splits I among the pools in
// proportion to `share` at multiples of down's block (and of the kernels' row group); fills each
// node's slice on its own pool with the kernels' pack.
// Throws DTypeError / std::invalid_argument with a message naming the tensor and the fix.
std::unique_ptr<Layer> build_layer(const WeightSource& gate, const WeightSource& up, const WeightSource& down,
                                   const KernelTable& kernels, const std::vector<ThreadPool*>& pools,
                                   const std::vector<int>& share);

}  // namespace tandem
