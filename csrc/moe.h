// The CPU expert engine: routed-expert MoE for one layer at a time, run on per-NUMA-node pools.
//
//   submit: copy x (unless borrowed) / ids / w into staging, group tokens by expert, launch every node's pool
//   node n: phase 0  tasks (tokens; decode flow: positions = (token, expert) pairs): x -> the
//                    kernels' activation layout, once per call (e.g. Q8 blocks; kernels/act.h)
//           phase 1  tasks (expert, rows of gate/up in n's slice): h = silu(gate x) * up x
//           phase 2  tasks (positions): h -> down's activation layout (prefill jobs whose down
//                    reads bf16 or Q8_64: done by the phase-1 tasks, each its own columns)
//           phase 3  tasks (expert, rows of H): y[pos] = down_slice h; then, after a barrier,
//                    tasks (token, columns): acc[t] = sum of w * y over t's positions, in ascending
//                    expert order (TANDEM_SPLIT_DOWN=0: tasks (rows of H) loop over the experts,
//                    acc[t] += w * down_slice h, the same sums)
//           (several nodes) all workers: out = sum of node partials, in node order
//   Phases are separated by barriers for prefill jobs. Decode jobs (no `big` kernels) flow instead:
//   a gate/up task waits only for its expert's activations, the worker ending an expert's last
//   gate/up task prepares its h (phase 2), and down tasks take the experts in order as they are
//   ready; only the per-token sums wait at a barrier (TANDEM_FLOW=0: barriers for these too, an
//   A/B switch).
//   wait:   blocks until the job's last worker marks it complete
// Experts with few tokens run the kernels' `matmul` (decode: all workers stream disjoint rows of
// the active experts); experts with many run `big` (prefill: matrix units) where the ISA has it.
//
// One job runs at a time; a second submit waits for the running job to finish (not for its wait).
// Results do not depend on the thread count: every sum has a fixed order.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/kernels.h"
#include "tensor.h"
#include "threadpool.h"
#include "weights.h"

namespace tandem {

class MoeEngine {
 public:
  // node_cpus[n]: cpu ids of NUMA node n (real or injected); threads_per_node[n] workers there.
  MoeEngine(const std::vector<std::vector<int>>& node_cpus, const std::vector<int>& threads_per_node, int spin_us,
            const KernelTable& kernels);
  ~MoeEngine();
  MoeEngine(const MoeEngine&) = delete;
  MoeEngine& operator=(const MoeEngine&) = delete;

  int add_layer(const WeightSource& gate, const WeightSource& up, const WeightSource& down);

  // x [T, H] float32/bfloat16, ids [T, k] int32 (-1: no expert), w [T, k] float32,
  // out [T, H] float32/bfloat16 (written by the job; keep it alive until wait returns).
  // Returns a ticket for wait(). Throws DTypeError / std::invalid_argument on bad input.
  // join: the calling thread works as one more worker of node 0 and returns once it ran out of
  // tasks (the pools may still be finishing: wait as usual). For a caller that would otherwise
  // spin on the job (a stream's doorbell): its core streams experts' rows too.
  // borrow_x: the workers read x where it is instead of a copy, so x must stay as it is until the
  // job is done (a HostCall's buffers: its stream writes them again only after waiting for the
  // job). Without it x is copied before the launch (one thread: ~3.5 ms for an 8K-token V2-Lite
  // layer's 32 MB), and the caller may reuse x at once.
  uint64_t submit(int layer, const TensorView& x, const TensorView& ids, const TensorView& w, const TensorView& out,
                  bool join = false, bool borrow_x = false);
  void wait(uint64_t ticket);
  uint64_t completed() const { return completed_.load(std::memory_order_acquire); }
  // The owner of the last submitted job's `out` (the Python binding passes its array): kept until
  // the next submit has waited for that job, or until the engine is gone, so a caller that drops
  // `out` early cannot free memory the workers still write. Swap it in after submit() returns and
  // release the previous one where releasing is allowed (the binding: with the GIL held).
  std::shared_ptr<void> swap_out_owner(std::shared_ptr<void> owner) { return std::exchange(out_owner_, std::move(owner)); }

  const KernelTable& kernels() const { return kt_; }
  int n_nodes() const { return int(pools_.size()); }
  std::vector<int> threads_per_node() const;
  bool pinned() const;
  int n_layers() const;
  const Layer& layer(int i) const;

  // Rows per task when experts run the `big` (prefill) kernels: 0 picks them (see moe.cpp,
  // rows_per_task), else a multiple of 64 up to 1024. Takes effect from the next submit.
  int prefill_rows() const { return prefill_rows_.load(std::memory_order_relaxed); }
  void set_prefill_rows(int rows);

  // Where the last finished job spent its time: for each phase (prepare x, gate/up, prepare h,
  // down, node reduce), the latest moment any worker left it, in ms after the launch.
  // Call after wait(); for tuning and benchmarks.
  std::vector<double> last_phases() const;
  // ... and the earliest moment any worker left each phase: the gap to last_phases is how long the
  // first one to run out of a phase's tasks waited at its barrier (the phase's imbalance).
  std::vector<double> last_phases_first() const;
  // steady_clock ns of the last job's launch (after staging) and of its end (last worker done).
  int64_t last_launch_ns() const;
  int64_t last_done_ns() const { return done_ns_.load(std::memory_order_acquire); }
  // Tasks each worker of each node took in the last finished job (a joined caller last on node
  // 0): how the work spread, for tests and tuning. Call after wait().
  std::vector<std::vector<int>> last_tasks() const;

 private:
  struct NodeTask;
  struct NodeState;
  struct Job;
  // Each phase's latest (or earliest) stamp over every worker, in ms (last_phases, last_phases_first).
  std::vector<double> phase_ms(bool latest) const;

  void check_inputs(const Layer& L, const TensorView& x, const TensorView& ids, const TensorView& w,
                    const TensorView& out) const;
  void wait_idle();
  void stage(const Layer& L, const TensorView& x, const TensorView& ids, const TensorView& w, const TensorView& out,
             bool borrow_x);
  void run_node(int node, int worker);
  const float* x_row(int node, int t, uint8_t* scratch) const;
  void prep_x_task(int node, int pos, uint8_t* scratch);
  void prep_token_task(int node, int t, uint8_t* scratch);
  void prep_h_task(int node, int pos);
  void gate_up_task(int node, int task, int next, uint8_t* scratch);
  void down_task(int node, int task, uint8_t* scratch);
  void down_expert_task(int node, int task, int next, uint8_t* scratch);
  void write_h_slice(ActKind kind, const float* h, int r0, int nr, int width, uint8_t* row, uint8_t* tmp) const;
  void sum_token(int node, int task);
  void reduce_rows(int t);
  void finish_job();

  const KernelTable& kt_;
  std::vector<std::vector<int>> node_cpus_;
  std::vector<std::unique_ptr<Layer>> layers_;  // unique_ptr: a running job keeps a stable Layer*
  std::unique_ptr<Job> job_;
  std::unique_ptr<NodeState[]> nodes_;
  std::vector<NodeTask> node_tasks_;

  std::mutex submit_mu_;  // serializes submit/add_layer (staging and pools are per engine)
  std::mutex mu_;         // guards launched_, pairs with cv_
  std::condition_variable cv_;
  uint64_t launched_ = 0;
  std::atomic<uint64_t> completed_{0};
  std::chrono::steady_clock::time_point launched_at_;
  std::atomic<int64_t> done_ns_{0};
  std::shared_ptr<void> out_owner_;  // see swap_out_owner; destroyed after the pools (declared before them)
  std::atomic<int> prefill_rows_{0};

  std::vector<std::unique_ptr<ThreadPool>> pools_;  // last: workers stop before the state they use
};

}  // namespace tandem
