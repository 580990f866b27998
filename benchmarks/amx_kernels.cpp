// One AMX `big` kernel call in isolation: rows x tokens x K of one format, best and median of N
// calls. Separates the tile loop from the engine (phases, scatter) and is steady enough to compare
// two builds on a shared or noisy machine (run each build alternately, keep the best). Build against
// the extension's objects after `pip install -e .` (b = build/<wheel tag>/CMakeFiles/_C.dir/csrc):
//   g++ -O2 -std=c++20 -Icsrc benchmarks/amx_kernels.cpp $b/kernels/*/*.o $b/kernels/pack.cpp.o
//       $b/quant/format.cpp.o -o /tmp/amx_kernels -lpthread
//   /tmp/amx_kernels INT8 7168 512 64 100      # format K tokens rows calls (a V3 gate task, 512 tokens)
//   /tmp/amx_kernels INT8 2048 192 256 100 256 64
// The last two: copies of the weights and of the activations that successive calls cycle through
// (default 1 each: both stay in cache). Many weight copies make every call read its weights from
// DRAM, as the engine's tasks do; many activation copies make it read tokens from L3 or DRAM, as
// a task does whose tokens another core prepared. Comparing the four corners splits a call's time
// into tile work and the wait for each operand.
// Weights are random bytes in 0x20..0x3f, so every fp16/fp32 scale field is a finite, normal
// number: values do not matter for speed, but denormal scales do (each product with one takes a
// microcode assist; with bytes 0..0x3f one fp32 scale in 64 was denormal, which made INT4's
// per-chunk scaling look 9x slower than INT8 in session 9).
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/kernels.h"
#include "quant/format.h"

using namespace tandem;

int main(int argc, char** argv) {
  syscall(SYS_arch_prctl, 0x1023, 18);  // ARCH_REQ_XCOMP_PERM, XTILEDATA: AMX for this process
  const Format f = parse_format(argc > 1 ? argv[1] : "INT8");
  const int K = argc > 2 ? atoi(argv[2]) : 2048, NT = argc > 3 ? atoi(argv[3]) : 256;
  const int NR = argc > 4 ? atoi(argv[4]) : 64, calls = argc > 5 ? atoi(argv[5]) : 100;
  const int wcopies = argc > 6 ? std::max(1, atoi(argv[6])) : 1, acopies = argc > 7 ? std::max(1, atoi(argv[7])) : 1;
  // AMX_KERNELS_EMULATED=1: the software-tile build (checks this program where the CPU lacks AMX).
  const char* emu = std::getenv("AMX_KERNELS_EMULATED");
  const KernelTable& kt = emu != nullptr && emu[0] == '1' ? amx_emulated_kernels() : amx_kernels();
  const FormatKernels& fk = kernels_of(kt, f);
  const FormatInfo fi = format_info(f);
  std::mt19937 rng(1);
  const size_t rb = fi.row_bytes(K), gb = fk.group_bytes(K);
  std::vector<uint8_t> rows(rb * size_t(NR));
  for (auto& b : rows) b = uint8_t(0x20 | (rng() & 0x1f));
  const int ng = (NR + 15) / 16;
  const size_t wbytes = gb * size_t(ng);
  auto* W = static_cast<uint8_t*>(aligned_alloc(64, wbytes * size_t(wcopies)));
  for (int g = 0; g < ng; ++g) {
    std::vector<const uint8_t*> rp;
    for (int i = 0; i < 16 && g * 16 + i < NR; ++i) rp.push_back(rows.data() + size_t(g * 16 + i) * rb);
    fk.pack(rp.data(), int(rp.size()), K, W + size_t(g) * gb);
  }
  for (int c = 1; c < wcopies; ++c) std::copy(W, W + wbytes, W + size_t(c) * wbytes);
  const ActKernels& ak = kernels_of(kt, fk.big_act);
  const size_t sa = ak.bytes(K), abytes = sa * size_t(NT + 32);  // + tile padding rows
  auto* A = static_cast<uint8_t*>(aligned_alloc(64, abytes * size_t(acopies)));
  std::vector<float> x(static_cast<size_t>(K));
  for (int t = 0; t < NT + 32; ++t) {
    for (auto& v : x) v = float(int(rng() % 200) - 100) / 50.0f;
    ak.prep(x.data(), K, A + size_t(t) * sa);
  }
  for (int c = 1; c < acopies; ++c) std::copy(A, A + abytes, A + size_t(c) * abytes);
  std::vector<std::vector<const uint8_t*>> act(static_cast<size_t>(acopies));
  for (int c = 0; c < acopies; ++c)
    for (int t = 0; t < NT; ++t) act[size_t(c)].push_back(A + size_t(c) * abytes + size_t(t) * sa);
  std::vector<float> y(size_t(NT) * size_t(NR));
  auto* scratch = static_cast<uint8_t*>(aligned_alloc(64, (kt.scratch_bytes(K) + 63) / 64 * 64));
  std::vector<double> times;
  for (int i = 0; i < calls; ++i) {
    // The next call's first weights and tokens, as the engine names them (prefetched by this call).
    const int n = i + 1;
    const NextCall next{W + size_t(n % wcopies) * wbytes, size_t(std::min(ng, kBigRowBlock / 16)) * gb,
                        act[size_t(n % acopies)][0], size_t(std::min(NT, 32)) * sa};
    const MatArgs m{W + size_t(i % wcopies) * wbytes, gb, NR, K, act[size_t(i % acopies)].data(), sa, NT,
                    y.data(), size_t(NR), scratch, next};
    const auto t0 = std::chrono::steady_clock::now();
    fk.big(m);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double best = times.front(), med = times[times.size() / 2];
  std::printf("%s K=%d tokens=%d rows=%d copies w=%d (%.1f MB) a=%d (%.1f MB): best %.3f ms %.2f TOP/s, median %.3f ms (%s)\n",
              fi.name, K, NT, NR, wcopies, wbytes * wcopies / 1e6, acopies, abytes * acopies / 1e6, best * 1e3,
              2.0 * NT * NR * K / best / 1e12, med * 1e3, fk.big_path);
  return 0;
}
