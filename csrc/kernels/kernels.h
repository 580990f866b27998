// The contract every ISA's kernels share. dispatch.cpp picks one KernelTable per engine; the
// generic table is the executable spec and every ISA table is tested against it.
//
// Per format, an ISA chooses
//   - a weight layout: rows interleaved in groups of `row_group` (tiled.h), filled once at load
//     by `pack` from rows in the format's file/row layout (quant/*.h);
//   - an activation layout (act.h) that activations are converted to once per call;
//   - `matmul` for few tokens per expert (decode: stream the weights once, memory-bound) and
//     optionally `big` for many (prefill: matrix units), each with its own activation layout.
// Kernels are plain function pointers so that ISA code lives only in its own translation unit,
// compiled with its own -m flags (see CMakeLists.txt and the note in kernels/isa.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../quant/format.h"

namespace tandem {

// Activation layouts; act.h says what their bytes are.
enum class ActKind : uint8_t { F32, BF16, Q8_32, Q8_K, Q8_ROW, Q8_64 };
inline constexpr int kActKinds = 6;

// `big` kernels work through a call's rows in blocks of this many.
inline constexpr int kBigRowBlock = 64;

// What a caller reads right after a call, for `big` kernels to prefetch into L2 during their last
// row block as they do their own next block: the next call's first weights (its first
// kBigRowBlock rows) and its first activation rows. Empty ranges (null) prefetch nothing.
struct NextCall {
  const uint8_t* w;
  size_t w_bytes;
  const uint8_t* act;
  size_t act_bytes;
};

// y[t * y_stride + r] = dot(row r of W, activation t) for r < n_rows, t < n_act.
struct MatArgs {
  const uint8_t* w;          // the first row group the call covers
  size_t group_bytes;        // row groups are this many bytes apart
  int n_rows;                // rows to write; the last group may hold padding rows past them
  int K;                     // logical row length
  const uint8_t* const* act;  // n_act activation rows in the kernel's activation layout
  size_t act_stride;         // their distance when they are evenly spaced (always so for `big`)
  int n_act;
  float* y;
  size_t y_stride;
  void* scratch;  // scratch_bytes(K) bytes owned by the calling worker, 64-byte aligned
  NextCall next;  // read by `big` kernels only
};

using MatFn = void (*)(const MatArgs&);
// rows[i] (i < n) are rows in the format's row layout (quant/*.h) of K weights; writes one
// group of `row_group` rows (rows n.. are zero padding).
using PackFn = void (*)(const uint8_t* const* rows, int n, int K, uint8_t* group);
// x: K floats -> one activation row (act_bytes(K) bytes, padding included).
using PrepFn = void (*)(const float* x, int K, uint8_t* dst);

// Plain aggregates (no default member initializers, so no constructor code exists that an ISA
// translation unit could compile with its own instructions); build them with `T x{}`.
struct FormatKernels {
  int row_group;
  size_t (*group_bytes)(int K);
  PackFn pack;
  ActKind act;
  MatFn matmul;
  // Many tokens per expert: `big` with activations in `big_act`, when an expert has at least
  // `big_min` tokens (null: `matmul` serves every count).
  ActKind big_act;
  MatFn big;
  int big_min;
  const char* path;      // names the kernels for reports, e.g. "avx512-vnni"
  const char* big_path;  // e.g. "amx-int8"; null without `big`
};

struct ActKernels {
  size_t (*bytes)(int K);
  PrepFn prep;
};

struct KernelTable {
  const char* isa;
  size_t (*scratch_bytes)(int K);
  // Reads n bytes (p 64-byte aligned, n a multiple of 256 * streams) as `streams` equal parts
  // read side by side; returns a value that depends on every byte, so the reads stay (bench.cpp).
  uint64_t (*stream_read)(const uint8_t* p, size_t n, int streams);
  // h[i] = silu(h[i]) * up[i], silu(g) = g / (1 + exp(-g)), for i < n.
  void (*swiglu)(float* h, const float* up, int n);
  FormatKernels fmt[kFormatCount];
  ActKernels act[kActKinds];
};

inline const FormatKernels& kernels_of(const KernelTable& t, Format f) { return t.fmt[int(f)]; }
inline const ActKernels& kernels_of(const KernelTable& t, ActKind a) { return t.act[int(a)]; }

// The tiled layout (tiled.h) with R rows per group (8 or 16): row_group, group_bytes, pack.
FormatKernels tiled_layout(Format f, int R);

const KernelTable& generic_kernels();
// Runs `iters` rounds of 4 tile dot products on tiles held in registers (no memory traffic; the
// operands random data, as a kernel's) on the calling thread; returns the operations done (2 per
// multiply-add). AMX builds only, after dispatch.cpp found AMX usable.
uint64_t amx_spin(bool bf16, long iters);
// Defined only in builds that compile the ISA (TANDEM_BUILD_*); call only after dispatch.cpp
// checked the CPU: their code uses the ISA's instructions.
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
const KernelTable& amx_kernels();
// The AMX kernels on software tiles (kernels/amx/emulate.h), for tests on AVX-512 CPUs; AVX-512
// builds only, after dispatch.cpp found AVX-512 usable.
const KernelTable& amx_emulated_kernels();

}  // namespace tandem
