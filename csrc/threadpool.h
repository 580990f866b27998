// A pool of worker threads pinned to cores. Workers spin for a while after each task (a decode
// step launches every few hundred microseconds) and then sleep on a condition variable.
// The engine keeps one pool per NUMA node; a task is broadcast to all workers of a pool, which
// split its work through atomic task counters (see moe.cpp).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tandem {

// Work broadcast to every worker of a pool: each worker calls run(worker) once per launch.
class PoolTask {
 public:
  virtual void run(int worker) = 0;

 protected:
  ~PoolTask() = default;
};

// One counter per cache line, so workers taking tasks do not false-share.
struct alignas(64) PaddedCounter {
  std::atomic<int> v{0};
};

// One spin-wait iteration: tells the core this thread is polling (x86 `pause`).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spin (then yield, so oversubscribed threads still progress) until count >= target.
void spin_until(const std::atomic<int>& count, int target);

class ThreadPool {
 public:
  // n_workers threads; worker i is pinned to cpus[i % cpus.size()] (unpinned if cpus is empty).
  ThreadPool(std::vector<int> cpus, int n_workers, int spin_us);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(threads_.size()); }
  bool pinned() const { return pin_failures_.load() == 0; }

  // Starts `task` on every worker and returns at once. The caller guarantees the previous task
  // has returned on every worker (the engine runs one job at a time).
  void launch(PoolTask* task);

 private:
  void worker_main(int id);
  void stop_workers();  // wakes every worker with stop_ set and joins them

  std::vector<int> cpus_;
  int spin_us_;
  alignas(64) std::atomic<uint64_t> epoch_{0};
  std::atomic<PoolTask*> task_{nullptr};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> pin_failures_{0};
  std::atomic<int> pin_attempts_{0};  // workers past their pinning attempt; the constructor waits for all
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;  // last: started once everything above exists
};

// Runs fn(pool_index, worker) once on every worker of every pool and blocks until all return;
// rethrows the first exception a worker threw.
void run_on_pools(const std::vector<ThreadPool*>& pools, const std::function<void(int, int)>& fn);

// Runs fn(pool_index, item, worker) for item in [0, items[pool_index]) on that pool's workers
// (an atomic counter per pool hands items out) and blocks. For load-time work such as repacking
// weights, so each node's workers first-touch the memory of their own slice.
void parallel_for(const std::vector<ThreadPool*>& pools, const std::vector<int>& items,
                  const std::function<void(int, int, int)>& fn);

}  // namespace tandem
