// CPUID -> kernel table. Entries are ordered best first; an ISA whose kernels are not written yet
// has a null table, so adding avx2/avx512/amx later is filling in one pointer here.
#include "dispatch.h"

#include <stdexcept>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace tandem {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// AMX tiles and int8/bf16 ops: CPUID.(7,0):EDX bits 24, 25, 22. (The OS permission request,
// arch_prctl(ARCH_REQ_XCOMP_PERM), belongs to the AMX kernels when they arrive.)
bool cpu_has_amx() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const unsigned need = (1u << 24) | (1u << 25) | (1u << 22);
  return cpu_has_avx512() && (d & need) == need;
#else
  return false;
#endif
}

bool cpu_any() { return true; }

struct Entry {
  const char* name;
  const KernelTable* (*table)();  // null: not built yet
  bool (*cpu_has)();
};

const KernelTable* generic_table() { return &generic_kernels(); }

constexpr Entry kEntries[] = {
    {"amx", nullptr, &cpu_has_amx},
    {"avx512", nullptr, &cpu_has_avx512},
    {"avx2", nullptr, &cpu_has_avx2},
    {"generic", &generic_table, &cpu_any},
};

}  // namespace

const KernelTable& select_kernels(const char* isa_override) {
  if (isa_override != nullptr && *isa_override != '\0') {
    const std::string_view want(isa_override);
    std::string names;
    for (const Entry& e : kEntries) names += (names.empty() ? "" : ", ") + std::string(e.name);
    for (const Entry& e : kEntries) {
      if (want != e.name) continue;
      if (e.table == nullptr)
        throw std::invalid_argument("TANDEM_ISA=" + std::string(want) +
                                    ": kernels for this ISA are not built yet; unset TANDEM_ISA or use 'generic'");
      if (!e.cpu_has())
        throw std::invalid_argument("TANDEM_ISA=" + std::string(want) +
                                    ": this CPU does not support it; unset TANDEM_ISA");
      return *e.table();
    }
    throw std::invalid_argument("TANDEM_ISA=" + std::string(want) + " is unknown; choose one of " + names);
  }
  for (const Entry& e : kEntries)
    if (e.table != nullptr && e.cpu_has()) return *e.table();
  return generic_kernels();
}

IsaReport isa_report() {
  IsaReport r;
  for (const Entry& e : kEntries) {
    if (e.cpu_has()) r.cpu.emplace_back(e.name);
    if (e.table != nullptr) r.built.emplace_back(e.name);
  }
  return r;
}

}  // namespace tandem
