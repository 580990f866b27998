#include "threadpool.h"

#include <chrono>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace tandem {

namespace {

bool pin_current_thread(int cpu) {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
#else
  (void)cpu;
  return false;
#endif
}

}  // namespace

void spin_until(const std::atomic<int>& count, int target) {
  for (int spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 4096) cpu_relax();
    else std::this_thread::yield();
  }
}

ThreadPool::ThreadPool(std::vector<int> cpus, int n_workers, int spin_us) : cpus_(std::move(cpus)), spin_us_(spin_us) {
  threads_.reserve(size_t(n_workers));
  try {
    for (int i = 0; i < n_workers; ++i) threads_.emplace_back([this, i] { worker_main(i); });
  } catch (const std::system_error& e) {  // out of threads or memory: stop the ones started, then report
    stop_workers();
    throw std::runtime_error("could not start " + std::to_string(n_workers) + " engine threads (started " +
                             std::to_string(threads_.size()) + "): " + e.what() + "; use fewer threads");
  }
  spin_until(pin_attempts_, n_workers);  // so pinned() reports every worker's attempt, not a race with them
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void ThreadPool::launch(PoolTask* task) {
  task_.store(task, std::memory_order_relaxed);
  epoch_.fetch_add(1, std::memory_order_seq_cst);
  // A worker that registered as a sleeper before our epoch bump may be asleep: wake it under the
  // mutex. One that registers after it sees the new epoch in its wait predicate (seq_cst order).
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
}

void ThreadPool::worker_main(int id) {
  if (!cpus_.empty() && !pin_current_thread(cpus_[size_t(id) % cpus_.size()])) pin_failures_.fetch_add(1);
  pin_attempts_.fetch_add(1, std::memory_order_release);
  using clock = std::chrono::steady_clock;
  uint64_t seen = 0;
  for (;;) {
    uint64_t e = epoch_.load(std::memory_order_acquire);
    const auto spin_end = clock::now() + std::chrono::microseconds(spin_us_);
    for (int spins = 1; e == seen && !stop_.load(std::memory_order_relaxed); ++spins) {
      cpu_relax();
      if (spins % 256 == 0 && clock::now() > spin_end) break;
      e = epoch_.load(std::memory_order_acquire);
    }
    if (e == seen && !stop_.load()) {
      std::unique_lock<std::mutex> lk(mu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      cv_.wait(lk, [&] { return epoch_.load(std::memory_order_seq_cst) != seen || stop_.load(); });
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
      e = epoch_.load(std::memory_order_acquire);
    }
    if (e == seen) return;  // woken by stop with no task pending
    seen = e;
    task_.load(std::memory_order_relaxed)->run(id);
  }
}

namespace {

struct BlockingTask final : PoolTask {
  const std::function<void(int, int)>* fn = nullptr;
  int pool = 0;
  std::atomic<int>* left = nullptr;
  std::mutex* mu = nullptr;
  std::condition_variable* cv = nullptr;
  std::exception_ptr* error = nullptr;  // first exception of any worker, rethrown by the caller

  void run(int worker) override {
    try {
      (*fn)(pool, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lk(*mu);
      if (!*error) *error = std::current_exception();
    }
    // Decrement under the mutex: the waiter cannot see zero, return and destroy the mutex
    // before this worker is done with it.
    std::lock_guard<std::mutex> lk(*mu);
    if (--*left == 0) cv->notify_all();
  }
};

}  // namespace

void run_on_pools(const std::vector<ThreadPool*>& pools, const std::function<void(int, int)>& fn) {
  std::atomic<int> left{0};
  for (ThreadPool* p : pools) left += p->size();
  std::mutex mu;
  std::condition_variable cv;
  std::exception_ptr error;
  std::vector<BlockingTask> tasks(pools.size());
  for (size_t i = 0; i < pools.size(); ++i) {
    tasks[i].fn = &fn;
    tasks[i].pool = int(i);
    tasks[i].left = &left;
    tasks[i].mu = &mu;
    tasks[i].cv = &cv;
    tasks[i].error = &error;
    pools[i]->launch(&tasks[i]);
  }
  std::unique_lock<std::mutex> lk(mu);
  cv.wait(lk, [&] { return left.load(std::memory_order_acquire) == 0; });
  if (error) std::rethrow_exception(error);
}

void parallel_for(const std::vector<ThreadPool*>& pools, const std::vector<int>& items,
                  const std::function<void(int, int, int)>& fn) {
  std::unique_ptr<PaddedCounter[]> next(new PaddedCounter[pools.size()]);
  run_on_pools(pools, [&](int p, int worker) {
    for (int i; (i = next[size_t(p)].v.fetch_add(1, std::memory_order_relaxed)) < items[size_t(p)];) fn(p, i, worker);
  });
}

}  // namespace tandem
