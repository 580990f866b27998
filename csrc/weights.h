// A layer's routed-expert weights as the engine keeps them: per NUMA node, that node's slice of
// the intermediate dimension I (gate/up rows i0..i1 and the matching down columns), every expert,
// in the format's row layout, in memory first touched by that node's workers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

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

// One projection of one node's slice for all experts: [experts][rows][row_bytes].
struct Matrix {
  Format fmt = Format::BF16;
  int experts = 0, rows = 0, cols = 0;
  size_t row_bytes = 0;
  AlignedBytes bytes;

  const uint8_t* row(int e, int r) const { return bytes.data() + (size_t(e) * size_t(rows) + size_t(r)) * row_bytes; }
  uint8_t* row_mut(int e, int r) { return bytes.data() + (size_t(e) * size_t(rows) + size_t(r)) * row_bytes; }
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
// or uint8 [E, rows, row_bytes] of raw GGUF blocks.
struct WeightSource {
  Format fmt;
  TensorView t;
};

// Checks the three sources agree (gate/up [E, I, H], down [E, H, I]); splits I among the pools in
// proportion to `share` at multiples of down's block; fills each node's slice on its own pool.
// Throws DTypeError / std::invalid_argument with a message naming the tensor and the fix.
std::unique_ptr<Layer> build_layer(const WeightSource& gate, const WeightSource& up, const WeightSource& down,
                                   const std::vector<ThreadPool*>& pools, const std::vector<int>& share);

}  // namespace tandem
