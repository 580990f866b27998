// CPUID -> kernel table, in one place. An ISA level is usable when the CPU has its instructions,
// the OS saves their register state (XCR0), and for AMX when Linux granted this process the tile
// data state (arch_prctl(ARCH_REQ_XCOMP_PERM); without it the first tile instruction faults).
// Entries are ordered best first; TANDEM_ISA picks one by name (for debugging and tests), and
// names the one entry never picked by itself: amx-emu, the AMX kernels on software tiles.
#include "dispatch.h"

#include <stdexcept>
#include <string_view>

#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace tandem {

namespace {

#if defined(__x86_64__)
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) return Regs{};
  return r;
}

bool bit(unsigned v, int i) { return (v >> i) & 1u; }

// XCR0: which register states the OS saves on a context switch (0 without OSXSAVE).
unsigned long long xcr0() {
  if (!bit(cpuid(1, 0).c, 27)) return 0;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}
#endif

bool cpu_has_avx2() {
#if defined(__x86_64__)
  const Regs l1 = cpuid(1, 0), l7 = cpuid(7, 0);
  const bool os_ymm = (xcr0() & 0x6) == 0x6;  // SSE + AVX state
  return os_ymm && bit(l1.c, 12) /*FMA*/ && bit(l1.c, 29) /*F16C*/ && bit(l7.b, 5) /*AVX2*/;
#else
  return false;
#endif
}

// AVX-512 F/BW/VL with VNNI (int8 dot products) and BF16 (dpbf16ps): the kernels use all five.
bool cpu_has_avx512() {
#if defined(TANDEM_SIMDE)
  return cpu_has_avx2();  // the kernels run on SIMDe's AVX2 code (CMakeLists.txt's TANDEM_SIMDE)
#elif defined(__x86_64__)
  if (!cpu_has_avx2()) return false;
  const Regs l7 = cpuid(7, 0), l71 = cpuid(7, 1);
  const bool os_zmm = (xcr0() & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  return os_zmm && bit(l7.b, 16) /*F*/ && bit(l7.b, 30) /*BW*/ && bit(l7.b, 31) /*VL*/ && bit(l7.c, 11) /*VNNI*/ &&
         bit(l71.a, 5) /*AVX512_BF16*/;
#else
  return false;
#endif
}

// Asks Linux once for the AMX tile data state; the answer holds for every thread of the process.
bool amx_permitted() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_amx() {
#if defined(__x86_64__)
  if (!cpu_has_avx512()) return false;
  const Regs l7 = cpuid(7, 0);
  const bool tiles = bit(l7.d, 24) /*AMX-TILE*/ && bit(l7.d, 25) /*AMX-INT8*/ && bit(l7.d, 22) /*AMX-BF16*/;
  const bool os_tiles = (xcr0() & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  return tiles && os_tiles && amx_permitted();
#else
  return false;
#endif
}

bool cpu_any() { return true; }

struct Entry {
  const char* name;
  const KernelTable& (*table)();  // null: this build has no kernels for the ISA
  bool (*cpu_has)();
  bool automatic;  // false: only when named (TANDEM_ISA, tests)
};

#if defined(TANDEM_BUILD_AMX)
constexpr auto kAmx = &amx_kernels;
#else
constexpr const KernelTable& (*kAmx)() = nullptr;
#endif
#if defined(TANDEM_BUILD_AVX512)
constexpr auto kAvx512 = &avx512_kernels;
constexpr auto kAmxEmulated = &amx_emulated_kernels;
#else
constexpr const KernelTable& (*kAvx512)() = nullptr;
constexpr const KernelTable& (*kAmxEmulated)() = nullptr;
#endif
#if defined(TANDEM_BUILD_AVX2)
constexpr auto kAvx2 = &avx2_kernels;
#else
constexpr const KernelTable& (*kAvx2)() = nullptr;
#endif

#if defined(TANDEM_SIMDE)
constexpr bool kAvx512Automatic = false;  // emulated: only when named
#else
constexpr bool kAvx512Automatic = true;
#endif

constexpr Entry kEntries[] = {
    {"amx", kAmx, &cpu_has_amx, true},
    {"avx512", kAvx512, &cpu_has_avx512, kAvx512Automatic},
    {"avx2", kAvx2, &cpu_has_avx2, true},
    {"generic", &generic_kernels, &cpu_any, true},
    // The AMX kernels on software tiles: slow, for testing them where the CPU has no AMX.
    {"amx-emu", kAmxEmulated, &cpu_has_avx512, false},
};

}  // namespace

const KernelTable& select_kernels(const char* isa_override, const char* source) {
  if (isa_override != nullptr && *isa_override != '\0') {
    const std::string_view want(isa_override);
    std::string names;
    for (const Entry& e : kEntries) names += (names.empty() ? "" : ", ") + std::string(e.name);
    for (const Entry& e : kEntries) {
      if (want != e.name) continue;
      if (e.table == nullptr)
        throw std::invalid_argument(std::string(source) + "=" + std::string(want) +
                                    ": this build has no kernels for it (its compiler lacked the flags); "
                                    "choose another or use 'generic'");
      if (!e.cpu_has())
        throw std::invalid_argument(std::string(source) + "=" + std::string(want) +
                                    ": this CPU (or the OS) does not support it; choose another or leave it unset");
      return e.table();
    }
    throw std::invalid_argument(std::string(source) + "=" + std::string(want) + " is unknown; choose one of " + names);
  }
  for (const Entry& e : kEntries)
    if (e.automatic && e.table != nullptr && e.cpu_has()) return e.table();
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

bool isa_usable(const char* name) {
  for (const Entry& e : kEntries)
    if (std::string_view(name) == e.name) return e.table != nullptr && e.cpu_has();
  return false;
}

}  // namespace tandem
