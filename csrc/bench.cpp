// Measurements of the machine for benchmarks/moe_cpu.py: DRAM read bandwidth and AMX peak, on
// threads pinned to the cpus this process may use, timed between two spin barriers.
#include "bench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#include "dispatch.h"
#include "weights.h"

namespace tandem {

namespace {

std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
#endif
  return cpus;
}

void pin(int cpu) {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
  (void)cpu;
#endif
}

// Runs body(thread, round) on `threads` pinned threads for `rounds` rounds; returns each round's
// wall time in seconds, from the moment all threads are released to the moment the last one ends.
template <class Body>
std::vector<double> timed_rounds(int threads, int rounds, Body body) {
  const std::vector<int> cpus = allowed_cpus();
  std::atomic<int> ready{0}, done{0};
  std::atomic<int> go{-1};
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&, i] {
      if (!cpus.empty()) pin(cpus[size_t(i) % cpus.size()]);
      body(i, -1);  // setup round (first touch), untimed
      for (int r = 0; r < rounds; ++r) {
        ready.fetch_add(1);
        while (go.load(std::memory_order_acquire) < r) std::this_thread::yield();
        body(i, r);
        done.fetch_add(1);
      }
    });
  std::vector<double> secs;
  using clock = std::chrono::steady_clock;
  for (int r = 0; r < rounds; ++r) {
    while (ready.load() < threads * (r + 1)) std::this_thread::yield();
    const auto t0 = clock::now();
    go.store(r, std::memory_order_release);
    // Sleep, do not spin: with as many workers as cores a spinning caller takes a worker's core
    // and stretches the round (measured: AMX peak 37 vs 67 TOP/s on 16 cores). A round lasts
    // >= 50 ms, so 20 us of wake-up is noise.
    while (done.load() < threads * (r + 1)) std::this_thread::sleep_for(std::chrono::microseconds(20));
    secs.push_back(std::chrono::duration<double>(clock::now() - t0).count());
  }
  for (auto& t : pool) t.join();
  return secs;
}

}  // namespace

double stream_read_bandwidth(size_t bytes, int threads, int rounds, int streams) {
  if (threads < 1 || rounds < 1) throw std::invalid_argument("stream_read_bandwidth: threads and rounds must be >= 1");
  // Whole 2 MB pages per thread, so every reader streams its own huge pages.
  const size_t page = size_t(2) << 20;
  const size_t slice = bytes / size_t(threads) / page * page;
  if (slice == 0) throw std::invalid_argument("stream_read_bandwidth: need at least 2 MiB per thread");
  if (streams < 0 || streams > 64 || (streams > 0 && slice % (256 * size_t(streams)) != 0))
    throw std::invalid_argument("stream_read_bandwidth: streams must be 0 (best of 1, 2, 4) or 1..64");
  const KernelTable& kt = select_kernels(nullptr);
  AlignedBytes buf(slice * size_t(threads));
  std::vector<uint64_t> sink(size_t(threads) * 8);
  // Rounds alternate 1, 2 and 4 streams per thread (a core keeps more lines in flight over
  // several streams); the best round is the machine's read bandwidth.
  const int variants = streams > 0 ? 1 : 3;
  const std::vector<double> secs = timed_rounds(threads, rounds * variants, [&](int i, int r) {
    uint8_t* p = buf.data() + size_t(i) * slice;
    if (r < 0) {  // first touch by the reading thread: pages land on its node
      for (size_t o = 0; o < slice; o += 4096) p[o] = uint8_t(o >> 12);
      return;
    }
    sink[size_t(i) * 8] += kt.stream_read(p, slice, streams > 0 ? streams : 1 << (r % variants));
  });
  double best = 0;
  for (double s : secs) best = std::max(best, double(slice) * threads / s / 1e9);
  return best;
}

double amx_peak(bool bf16, int threads, double seconds) {
  if (!isa_usable("amx")) throw std::invalid_argument("amx_peak: this build or CPU has no usable AMX");
  if (threads < 1) throw std::invalid_argument("amx_peak: threads must be >= 1");
#if defined(TANDEM_BUILD_AMX)
  // Size the rounds from a short calibration on one thread.
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t calib = amx_spin(bf16, 20000);
  const double per_iter = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 20000.0;
  const long iters = long(std::max(1000.0, seconds / std::max(per_iter, 1e-9)));
  (void)calib;
  std::vector<uint64_t> ops(size_t(threads) * 8);
  const std::vector<double> secs = timed_rounds(threads, 3, [&](int i, int r) {
    if (r >= 0) ops[size_t(i) * 8] = amx_spin(bf16, iters);
  });
  uint64_t total = 0;
  for (int i = 0; i < threads; ++i) total += ops[size_t(i) * 8];
  double best = 0;
  for (double s : secs) best = std::max(best, double(total) / s / 1e12);
  return best;
#else
  (void)bf16, (void)seconds;
  return 0.0;
#endif
}

}  // namespace tandem
