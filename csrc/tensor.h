// A borrowed view of a caller's tensor (bindings.cpp makes it from a DLPack/ndarray object), so
// the engine's code needs neither nanobind nor torch headers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tandem {

enum class DType : uint8_t { F32, BF16, U8, I32, Other };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::U8: return "uint8";
    case DType::I32: return "int32";
    case DType::Other: break;
  }
  return "an unsupported dtype";
}

// A tensor of the wrong dtype; bindings.cpp turns it into Python's TypeError.
struct DTypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct TensorView {
  void* data = nullptr;  // C-contiguous, CPU
  DType dtype = DType::Other;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }

  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

}  // namespace tandem
