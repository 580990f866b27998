// Environment switches for A/B measurements: env_switch_on (TANDEM_FLOW, TANDEM_SPLIT_DOWN,
// TANDEM_HUGEPAGES, TANDEM_AMX_PREFETCH, TANDEM_JOIN) is on unless set to "0"; env_opt_in (TANDEM_AMX_OVERLAP,
// measured slower) is off unless set to "1"; env_count (TANDEM_DECODE_ROWS) reads a count, 0 when
// unset or not a positive number (TANDEM_PREFETCH, in the AVX-512 kernels, parses its own). Read
// once per call site (keep the result in a function-local static).
//
// `static` on purpose: ISA translation units include this header, and a shared inline function
// compiled with their -m flags could be picked by the linker for baseline code (see act.h).
#pragma once

#include <cstdlib>
#include <cstring>

namespace tandem {

static inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

static inline bool env_opt_in(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

static inline long env_count(const char* name) {
  const char* v = std::getenv(name);
  const long n = v == nullptr ? 0 : std::strtol(v, nullptr, 10);
  return n > 0 ? n : 0;
}

}  // namespace tandem
