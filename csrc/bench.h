// Machine measurements for benchmarks/moe_cpu.py (exposed as tandem._C functions).
#pragma once

#include <cstddef>

namespace tandem {

// Best GB/s of `threads` pinned threads each streaming a disjoint slice of a `bytes` buffer
// (huge pages, first touched by its reader) with the best ISA's loads, over `rounds` rounds of
// each of 1, 2 and 4 streams per thread (or of `streams` only, when > 0).
double stream_read_bandwidth(size_t bytes, int threads, int rounds, int streams = 0);

// Best-of-3 TOP/s (int8) or TFLOP/s (bf16) of `threads` pinned threads issuing tile dot products
// on tiles held in registers for about `seconds` each. Throws when AMX is not usable.
double amx_peak(bool bf16, int threads, double seconds);

}  // namespace tandem
