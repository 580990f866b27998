// Picks the kernel table for this CPU, in one place.
#pragma once

#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace tandem {

// The best table this build has for this CPU, or the one named by `isa_override` (the TANDEM_ISA
// environment variable: generic, avx2, avx512, amx, amx-emu). Throws std::invalid_argument when the
// override is unknown, not built yet, or unsupported by the CPU.
// `source` names where the override came from in error messages ("TANDEM_ISA" or "isa").
const KernelTable& select_kernels(const char* isa_override, const char* source = "TANDEM_ISA");

struct IsaReport {
  std::vector<std::string> cpu;    // ISA levels this CPU supports
  std::vector<std::string> built;  // ISA levels this build has kernels for
};
IsaReport isa_report();

// Whether this build has kernels for the named ISA level and this CPU can run them.
bool isa_usable(const char* name);

}  // namespace tandem
