// The one list of weight formats the engine knows, and how a row of K weights is laid out:
// [row_header bytes][K / block_elems blocks of block_bytes]. Each format's traits live in its own
// header; this file maps the runtime enum onto them (visit_format) so kernels stay templates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "bf16.h"
#include "int4.h"
#include "int8.h"
#include "k_quants.h"
#include "q5_0.h"
#include "q8_0.h"

namespace tandem {

enum class Format : uint8_t { BF16, INT8, INT4, Q8_0, Q5_0, Q4_K, Q5_K, Q6_K };
inline constexpr int kFormatCount = 8;

// Calls fn(Traits{}) for the traits type of `f`; every call site instantiates all formats.
template <class Fn>
decltype(auto) visit_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::BF16: return fn(BF16{});
    case Format::INT8: return fn(INT8{});
    case Format::INT4: return fn(INT4{});
    case Format::Q8_0: return fn(Q8_0{});
    case Format::Q5_0: return fn(Q5_0{});
    case Format::Q4_K: return fn(Q4_K{});
    case Format::Q5_K: return fn(Q5_K{});
    case Format::Q6_K: return fn(Q6_K{});
  }
  return fn(BF16{});  // unreachable: the enum is closed
}

struct FormatInfo {
  const char* name;
  int block_elems;  // K must be a multiple of this
  int block_bytes;
  int row_header;   // bytes before the first block (INT8's row scale)
  bool online;      // quantized at load from float tensors; otherwise raw GGUF blocks

  size_t row_bytes(int K) const { return size_t(row_header) + size_t(K / block_elems) * block_bytes; }
};

inline FormatInfo format_info(Format f) {
  return visit_format(f, [](auto t) {
    using T = decltype(t);
    return FormatInfo{T::name, T::block_elems, T::block_bytes, T::row_header, T::online};
  });
}

inline Format format_at(int i) { return static_cast<Format>(i); }

// Throws std::invalid_argument naming the known formats.
Format parse_format(std::string_view name);

// Row-of-blocks formats decode a row block by block; header formats (BF16, INT8) define their own.
template <class Fmt>
void dequant_row(const uint8_t* row, int K, float* y) {
  if constexpr (Fmt::block_elems == 1) {
    Fmt::dequant_row(row, K, y);
  } else {
    using B = typename Fmt::block;
    for (int i = 0; i < K / Fmt::block_elems; ++i) {
      B b;
      std::memcpy(&b, row + size_t(i) * sizeof(B), sizeof(B));  // rows are packed: no alignment promise
      Fmt::dequant_block(b, y + size_t(i) * Fmt::block_elems);
    }
  }
}

// Online formats only: quantize K floats into one row.
template <class Fmt>
void quantize_row(const float* x, int K, uint8_t* row) {
  if constexpr (Fmt::block_elems == 1) {
    Fmt::quantize_row(x, K, row);
  } else {
    using B = typename Fmt::block;
    for (int i = 0; i < K / Fmt::block_elems; ++i) {
      B b;
      Fmt::quantize_block(x + size_t(i) * Fmt::block_elems, b);
      std::memcpy(row + size_t(i) * sizeof(B), &b, sizeof(B));
    }
  }
}

}  // namespace tandem
