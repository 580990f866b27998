// One AMX `big` kernel call in isolation: rows x tokens x K of one format, best of N calls.
// Separates the tile loop from the engine (phases, scatter) and is steady enough to compare two
// builds on a shared or noisy machine (run each build alternately, keep the best). Build against
// the extension's objects after `pip install -e .` (b = build/<wheel tag>/CMakeFiles/_C.dir/csrc):
//   g++ -O2 -std=c++20 -Icsrc benchmarks/amx_kernels.cpp $b/kernels/*/*.o $b/kernels/pack.cpp.o
//       $b/quant/format.cpp.o -o /tmp/amx_kernels -lpthread
//   /tmp/amx_kernels INT8 7168 512 64 100     # format K tokens rows calls (a V3 gate task, 512 tokens)
// Weights are random bytes (small, so fp16/fp32 scale fields stay finite): values do not matter
// for speed.
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
  const KernelTable& kt = amx_kernels();
  const FormatKernels& fk = kernels_of(kt, f);
  const FormatInfo fi = format_info(f);
  std::mt19937 rng(1);
  const size_t rb = fi.row_bytes(K), gb = fk.group_bytes(K);
  std::vector<uint8_t> rows(rb * size_t(NR));
  for (auto& b : rows) b = uint8_t(rng() & 0x3f);
  const int ng = (NR + 15) / 16;
  auto* W = static_cast<uint8_t*>(aligned_alloc(64, gb * size_t(ng)));
  for (int g = 0; g < ng; ++g) {
    std::vector<const uint8_t*> rp;
    for (int i = 0; i < 16 && g * 16 + i < NR; ++i) rp.push_back(rows.data() + size_t(g * 16 + i) * rb);
    fk.pack(rp.data(), int(rp.size()), K, W + size_t(g) * gb);
  }
  const ActKernels& ak = kernels_of(kt, fk.big_act);
  const size_t sa = ak.bytes(K);
  auto* A = static_cast<uint8_t*>(aligned_alloc(64, sa * size_t(NT + 32)));  // + tile padding rows
  std::vector<float> x(static_cast<size_t>(K));
  std::vector<const uint8_t*> act(static_cast<size_t>(NT));
  for (int t = 0; t < NT + 32; ++t) {
    for (auto& v : x) v = float(int(rng() % 200) - 100) / 50.0f;
    ak.prep(x.data(), K, A + size_t(t) * sa);
  }
  for (int t = 0; t < NT; ++t) act[size_t(t)] = A + size_t(t) * sa;
  std::vector<float> y(size_t(NT) * size_t(NR));
  auto* scratch = static_cast<uint8_t*>(aligned_alloc(64, (kt.scratch_bytes(K) + 63) / 64 * 64));
  const MatArgs m{W, gb, NR, K, act.data(), sa, NT, y.data(), size_t(NR), scratch};
  double best = 1e9;
  for (int i = 0; i < calls; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fk.big(m);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("%s K=%d tokens=%d rows=%d: %.3f ms %.2f TOP/s (%s)\n", fi.name, K, NT, NR, best * 1e3,
              2.0 * NT * NR * K / best / 1e12, fk.big_path);
  return 0;
}
