// The MoE engine's internals, shared by moe.cpp (staging a job, the phases each worker runs) and
// moe_tasks.cpp (the task bodies): the running job, each NUMA node's share of it, their buffers.
#pragma once

#include "moe.h"

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace tandem {

// Staging only grows: after the largest batch has been seen once, submit allocates nothing.
template <class V>
inline void grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// A 64-byte aligned buffer that only grows (activation rows are read by aligned/tile loads).
struct GrowBuf {
  AlignedBytes b;
  uint8_t* grow(size_t n) {
    if (b.size() < n) b = AlignedBytes(n);
    return b.data();
  }
};

// How one active expert's tokens go through one projection: which kernel, which activations.
struct Route {
  MatFn fn = nullptr;
  ActKind act = ActKind::F32;
};

// Columns per task of the per-token sum (split_down jobs).
constexpr int kSumCols = 512;

// Tile kernels may read up to this many rows past an expert's last activation row.
constexpr int kTilePadRows = 32;

// One node's share of the running job.
struct MoeEngine::NodeState {
  PaddedCounter next_px, arrived_px, next_up, arrived_up, next_ph, arrived_ph, next_down, arrived_down, next_sum;
  int n_workers = 0;  // this job's: the node's pool, plus a joined caller on node 0 (submit's join)
  int width = 0;  // this node's slice of I
  int rb_up = 0, rb_down = 0;  // rows per gate/up and per down task
  int blocks_per_expert = 0;   // gate/up tasks per active expert
  int down_blocks = 0;         // down tasks per active expert (see split_down)
  int n_up = 0, n_down = 0;
  float* h = nullptr;    // [n_pos, width]: silu(gate x) * up x, one row per (token, expert) pair
  float* acc = nullptr;  // [T, H]: this node's partial output (the caller's out when direct)
  float* y = nullptr;    // [n_pos, H]: down's output per position (split_down)
  size_t x_stride[2] = {0, 0};  // activation rows of gate's / up's x; up shares gate's when equal
  bool up_shares = true;
  size_t h_stride = 0;
  size_t kernel_scratch = 0, worker_scratch = 0;
  size_t outs = 0;  // bytes of one [max_count, rows per task] fp32 block in a worker's scratch
  GrowBuf ax[2], ah;  // activation rows [n_pos (+ tile padding)] for gate, up, down
  std::vector<float> h_buf, partial, y_buf;
  std::vector<const uint8_t*> act_gate, act_up, act_down;  // [n_pos] rows the kernels read
  std::vector<GrowBuf> scratch;  // per worker: kernel scratch, fp32 row, then [max_count, rb] outputs
  std::vector<std::array<int64_t, 5>> phase_ns;  // per worker: when it left each phase (last_phases)
  std::vector<int> tasks;                        // per worker: tasks it took (last_tasks)
  // Flow mode (jobs without `big` kernels: decode): per active expert instead of phase barriers.
  bool flow = false;
  size_t flow_cap = 0;
  std::unique_ptr<std::atomic<int>[]> px_done;  // its positions whose activations are prepared
  std::unique_ptr<std::atomic<int>[]> up_done;  // its gate/up tasks done
  std::unique_ptr<std::atomic<int>[]> h_ready;  // 1: its h rows are in down's activation layout
};

// The running job and its staging buffers (reused from job to job).
struct MoeEngine::Job {
  const Layer* layer = nullptr;
  int T = 0, k = 0, H = 0;
  uint64_t ticket = 0;
  void* out = nullptr;
  DType out_dtype = DType::F32;
  bool direct = false;  // one node and a float32 out: accumulate straight into out

  std::vector<uint8_t> x;  // [T, H] copy of the input, as given (float32 or bfloat16), unless borrowed
  const uint8_t* xp = nullptr;  // the rows the workers read: x's, or the caller's (submit's borrow_x)
  DType x_dtype = DType::F32;
  std::vector<int> count, start;  // [E] tokens per expert, fill cursor
  std::vector<int> active;        // experts with tokens, ascending
  std::vector<int> active_off;    // [n_active + 1] their ranges in pos_*
  std::vector<int> pos_tok;       // (token, expert) pairs grouped by expert, tokens ascending
  std::vector<int> pos_active;    // [n_pos] index into active
  std::vector<float> pos_w;
  std::vector<int> tok_off, tok_pos;  // split_down: token t's positions, ascending, at tok_off[t]..[t + 1]
  std::vector<Route> gate, up, down;  // [n_active]
  int n_pos = 0, max_count = 0;
  bool any_big = false;
  // Down tasks are (expert, rows of H) writing each position's output, then each token sums its
  // positions (down_expert_task, sum_token): an expert's activations are read once per task, and
  // each task streams one expert's rows. TANDEM_SPLIT_DOWN=0: tasks are rows of H looping over
  // every expert (down_task), which reads all the experts' activations in each task (with many
  // tokens per expert more bytes than the weights') and streams six short pieces at decode.
  bool split_down = false;
  // Prefill jobs whose active expert a's down reads bf16 or Q8_64 activations: its gate/up tasks
  // write them for their own columns (bf16 is per value, Q8_64 per 64 values: a row's slices at
  // multiples of 64 prepare alone, write_h_slice), so phase 2 skips it.
  bool fused_h(size_t a) const {
    return split_down && any_big && (down[a].act == ActKind::BF16 || down[a].act == ActKind::Q8_64);
  }

  int total_workers = 0;
  PaddedCounter workers_left, arrived_all, next_reduce;
};

}  // namespace tandem
