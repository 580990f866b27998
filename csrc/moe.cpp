#include "moe_job.h"

#include "kernels/act.h"
#include "env.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace tandem {

struct MoeEngine::NodeTask final : PoolTask {
  MoeEngine* engine = nullptr;
  int node = 0;
  void run(int worker) override { engine->run_node(node, worker); }
};

MoeEngine::MoeEngine(const std::vector<std::vector<int>>& node_cpus, const std::vector<int>& threads_per_node,
                     int spin_us, const KernelTable& kernels)
    : kt_(kernels), node_cpus_(node_cpus), job_(std::make_unique<Job>()) {
  if (node_cpus.empty() || node_cpus.size() != threads_per_node.size())
    throw std::invalid_argument("need one thread count per NUMA node, and at least one node");
  const size_t n = node_cpus.size();
  nodes_.reset(new NodeState[n]);
  node_tasks_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (threads_per_node[i] < 1) throw std::invalid_argument("every NUMA node needs at least one thread");
    nodes_[i].n_workers = threads_per_node[i];
    const size_t slots = size_t(threads_per_node[i]) + (i == 0 ? 1 : 0);  // node 0: a joined caller too
    nodes_[i].scratch = std::vector<GrowBuf>(slots);
    nodes_[i].phase_ns.assign(slots, {0, 0, 0, 0, 0});
    nodes_[i].tasks.assign(slots, 0);
    node_tasks_[i].engine = this;
    node_tasks_[i].node = int(i);
  }
  for (size_t i = 0; i < n; ++i)
    pools_.push_back(std::make_unique<ThreadPool>(node_cpus[i], threads_per_node[i], spin_us));
}

MoeEngine::~MoeEngine() {
  std::lock_guard<std::mutex> g(submit_mu_);
  wait_idle();
  pools_.clear();
}

std::vector<int> MoeEngine::threads_per_node() const {
  std::vector<int> t;
  for (const auto& p : pools_) t.push_back(p->size());
  return t;
}

bool MoeEngine::pinned() const {
  return std::all_of(pools_.begin(), pools_.end(), [](const auto& p) { return p->pinned(); });
}

void MoeEngine::set_prefill_rows(int rows) {
  if (rows < 0 || rows > 1024 || rows % 64 != 0)
    throw std::invalid_argument("prefill_rows must be 0 (automatic) or a multiple of 64 up to 1024; got " +
                                std::to_string(rows));
  prefill_rows_.store(rows, std::memory_order_relaxed);
}

int MoeEngine::n_layers() const { return int(layers_.size()); }

const Layer& MoeEngine::layer(int i) const {
  if (i < 0 || i >= int(layers_.size()))
    throw std::invalid_argument("layer " + std::to_string(i) + " does not exist; this engine has " +
                                std::to_string(layers_.size()) + " layer(s)");
  return *layers_[size_t(i)];
}

int MoeEngine::add_layer(const WeightSource& gate, const WeightSource& up, const WeightSource& down) {
  std::lock_guard<std::mutex> g(submit_mu_);
  wait_idle();
  std::vector<ThreadPool*> pools;
  for (auto& p : pools_) pools.push_back(p.get());
  layers_.push_back(build_layer(gate, up, down, kt_, pools, threads_per_node()));
  return int(layers_.size()) - 1;
}

void MoeEngine::wait_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return completed_.load(std::memory_order_acquire) == launched_; });
}

void MoeEngine::check_inputs(const Layer& L, const TensorView& x, const TensorView& ids, const TensorView& w,
                             const TensorView& out) const {
  if (x.dtype != DType::F32 && x.dtype != DType::BF16)
    throw DTypeError(std::string("x must be float32 or bfloat16; got ") + dtype_name(x.dtype));
  if (x.ndim != 2 || x.shape[1] != L.H)
    throw std::invalid_argument("x must be [T, H] with H = " + std::to_string(L.H) + " for this layer; got shape " +
                                x.shape_str());
  const int64_t T = x.shape[0];
  if (ids.dtype != DType::I32) throw DTypeError(std::string("ids must be int32; got ") + dtype_name(ids.dtype));
  if (ids.ndim != 2 || ids.shape[0] != T || ids.shape[1] < 1)
    throw std::invalid_argument("ids must be [T, k] with T = " + std::to_string(T) + " and k >= 1; got shape " +
                                ids.shape_str());
  const int64_t k = ids.shape[1];
  if (T * k > INT_MAX / 2) throw std::invalid_argument("T * k is too large for one submit; split the batch");
  if (w.dtype != DType::F32) throw DTypeError(std::string("w must be float32; got ") + dtype_name(w.dtype));
  if (w.ndim != 2 || w.shape[0] != T || w.shape[1] != k)
    throw std::invalid_argument("w must have the shape of ids " + ids.shape_str() + "; got " + w.shape_str());
  if (out.dtype != DType::F32 && out.dtype != DType::BF16)
    throw DTypeError(std::string("out must be float32 or bfloat16; got ") + dtype_name(out.dtype));
  if (out.ndim != 2 || out.shape[0] != T || out.shape[1] != L.H)
    throw std::invalid_argument("out must have the shape of x " + x.shape_str() + "; got " + out.shape_str());
  const auto* id = static_cast<const int32_t*>(ids.data);
  for (int64_t i = 0; i < T * k; ++i)
    if (id[i] < -1 || id[i] >= L.E)
      throw std::invalid_argument("ids[" + std::to_string(i / k) + ", " + std::to_string(i % k) +
                                  "] = " + std::to_string(id[i]) + " is out of range for a layer of " +
                                  std::to_string(L.E) + " experts (valid: 0.." + std::to_string(L.E - 1) +
                                  ", or -1 for no expert)");
}

uint64_t MoeEngine::submit(int layer_id, const TensorView& x, const TensorView& ids, const TensorView& w,
                           const TensorView& out, bool join, bool borrow_x) {
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> g(submit_mu_);
    const Layer& L = layer(layer_id);
    check_inputs(L, x, ids, w, out);
    wait_idle();
    job_->total_workers = 0;
    for (size_t n = 0; n < pools_.size(); ++n) {
      nodes_[n].n_workers = pools_[n]->size() + (join && n == 0 ? 1 : 0);
      job_->total_workers += nodes_[n].n_workers;
    }
    stage(L, x, ids, w, out, borrow_x);
    {
      std::lock_guard<std::mutex> lk(mu_);
      ticket = ++launched_;
      job_->ticket = ticket;
      if (job_->T == 0) completed_.store(ticket, std::memory_order_release);
    }
    if (job_->T == 0) {
      cv_.notify_all();
      return ticket;
    }
    launched_at_ = std::chrono::steady_clock::now();
    for (size_t n = 0; n < pools_.size(); ++n) pools_[n]->launch(&node_tasks_[n]);
  }
  // The job counts this thread among node 0's workers: it must run its share, whatever it finds.
  if (join) run_node(0, pools_[0]->size());
  return ticket;
}

void MoeEngine::wait(uint64_t ticket) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (ticket == 0 || ticket > launched_)
      throw std::invalid_argument("wait: unknown ticket " + std::to_string(ticket));
  }
  // Spin briefly first: a decode step's result often lands within microseconds. Not longer: a
  // caller spinning for long takes a core from the workers (measured: 1 ms stalls at 14-16
  // threads on 16 cores with a 1 ms spin here).
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  while (completed_.load(std::memory_order_acquire) < ticket && std::chrono::steady_clock::now() < until) {
  }
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return completed_.load(std::memory_order_acquire) >= ticket; });
}

namespace {

// TANDEM_DECODE_ROWS=N fixes the rows of decode tasks (rounded down to a multiple of 16, at least
// 16) for A/B runs; unset or 0: rows_per_task's rule. Read once.
int decode_rows() {
  static const long n = env_count("TANDEM_DECODE_ROWS");
  return n == 0 ? 0 : int(std::clamp<long>(n / 16 * 16, 16, 4096));
}

// Rows per task: a multiple of 64 (so of every row group) or 16. Prefill (`big` kernels): a
// task's rows all read the same activation rows (one expert's tokens for gate/up, every expert's
// h for down), which come from L3 or DRAM once per task and from L2 for every further 64-row
// block, so tasks take up to 256 rows leaving >= 4 a worker (`fixed` > 0: that many rows).
int rows_per_task(int64_t rows, int workers, bool big, int fixed) {
  if (big) {
    if (fixed > 0) return fixed;
    int rb = 256;
    while (rb > 64 && (rows + rb - 1) / rb < 4 * int64_t(workers)) rb /= 2;
    return rb;
  }
  // Decode: each task streams its rows once, so longer tasks are longer sequential streams. Up to
  // 256 rows, keeping >= 2 tasks per worker (flow mode overlaps the experts' phases, which evens
  // the tail). V2-Lite Q4_K_M on the 16-core Xeon, 14 threads (session 16, runs alternating):
  // against the earlier rule (up to 128 rows, >= 8 tasks per worker: 64 at one token, 128 at 16)
  // end-to-end GPU decode went from 85.1 / 85.4 to 92.5 / 94.0 tok/s, 16 users from 186 / 165 to
  // 195 / 181; one layer alone (moe_cpu.py) moved within its noise at T = 1 and 2.96 -> 2.83 ms at 16.
  if (const int fixed_decode = decode_rows(); fixed_decode > 0) return fixed_decode;
  const int64_t per = rows / (int64_t(workers) * 2);
  return int(std::clamp<int64_t>(per / 16 * 16, 16, 256));
}

Route route_of(const FormatKernels& f, int count) {
  if (f.big != nullptr && count >= f.big_min) return Route{f.big, f.big_act};
  return Route{f.matmul, f.act};
}

// TANDEM_FLOW=0 puts decode jobs back on the phase barriers (an A/B switch for benchmarks).
bool flow_enabled() {
  static const bool on = env_switch_on("TANDEM_FLOW");
  return on;
}

// TANDEM_SPLIT_DOWN=0 puts jobs back on down tasks of rows of H over every expert, with x prepared
// per position and (prefill) h converted in phase 2: an A/B switch for benchmarks.
bool split_down_enabled() {
  static const bool on = env_switch_on("TANDEM_SPLIT_DOWN");
  return on;
}

// Runs the tasks 0..n-1 that this worker claims from counter c: run(task, next), next being the
// task claimed ahead of it (`ahead`: so the running one can prefetch what that one reads first;
// prefill phases only, a held task may lengthen the phase's tail by one) or -1.
template <class F>
void run_tasks(PaddedCounter& c, int n, bool ahead, F&& run) {
  if (!ahead) {
    for (int t; (t = c.v.fetch_add(1, std::memory_order_relaxed)) < n;) run(t, -1);
    return;
  }
  int t = c.v.fetch_add(1, std::memory_order_relaxed);
  while (t < n) {
    const int next = c.v.fetch_add(1, std::memory_order_relaxed);
    run(t, next < n ? next : -1);
    t = next;
  }
}

}  // namespace

void MoeEngine::stage(const Layer& L, const TensorView& x, const TensorView& ids, const TensorView& w,
                      const TensorView& out, bool borrow_x) {
  Job& j = *job_;
  j.layer = &L;
  j.T = int(x.shape[0]);
  j.k = int(ids.shape[1]);
  j.H = L.H;
  j.out = out.data;
  j.out_dtype = out.dtype;
  j.direct = pools_.size() == 1 && out.dtype == DType::F32;
  const size_t TH = size_t(j.T) * size_t(j.H), TK = size_t(j.T) * size_t(j.k);

  // The workers convert x (phase 0), from the caller's memory (borrow_x) or else from a raw copy,
  // so that the caller may reuse x at once.
  j.x_dtype = x.dtype;
  const size_t xb = TH * (x.dtype == DType::F32 ? 4 : 2);
  if (borrow_x) {
    j.xp = static_cast<const uint8_t*>(x.data);
  } else {
    grow(j.x, xb);
    if (xb) std::memcpy(j.x.data(), x.data, xb);
    j.xp = j.x.data();
  }

  // Counting sort of the (token, expert) pairs by expert.
  const auto* id = static_cast<const int32_t*>(ids.data);
  const auto* wt = static_cast<const float*>(w.data);
  j.count.assign(size_t(L.E), 0);
  grow(j.start, size_t(L.E));
  for (size_t i = 0; i < TK; ++i)
    if (id[i] >= 0) ++j.count[size_t(id[i])];
  j.active.clear();
  j.active_off.clear();
  j.gate.clear();
  j.up.clear();
  j.down.clear();
  int n_pos = 0;
  j.max_count = 0;
  j.any_big = false;
  const FormatKernels &fg = kernels_of(kt_, L.fmt[0]), &fu = kernels_of(kt_, L.fmt[1]), &fd = kernels_of(kt_, L.fmt[2]);
  for (int e = 0; e < L.E; ++e) {
    const int c = j.count[size_t(e)];
    if (c == 0) continue;  // experts without tokens cost nothing
    j.active.push_back(e);
    j.active_off.push_back(n_pos);
    j.start[size_t(e)] = n_pos;
    n_pos += c;
    j.max_count = std::max(j.max_count, c);
    j.gate.push_back(route_of(fg, c));
    j.up.push_back(route_of(fu, c));
    j.down.push_back(route_of(fd, c));
    j.any_big = j.any_big || j.gate.back().fn != fg.matmul || j.down.back().fn != fd.matmul;
  }
  j.active_off.push_back(n_pos);
  j.n_pos = n_pos;
  grow(j.pos_tok, size_t(n_pos));
  grow(j.pos_w, size_t(n_pos));
  grow(j.pos_active, size_t(n_pos));
  for (size_t i = 0; i < TK; ++i) {
    if (id[i] < 0) continue;
    const int p = j.start[size_t(id[i])]++;
    j.pos_tok[size_t(p)] = int(i / size_t(j.k));
    j.pos_w[size_t(p)] = wt[i];
  }
  for (size_t a = 0; a < j.active.size(); ++a)
    for (int p = j.active_off[a]; p < j.active_off[a + 1]; ++p) j.pos_active[size_t(p)] = int(a);
  j.split_down = split_down_enabled();
  if (j.split_down) {  // each token's positions, ascending: the experts' order, as down_task sums
    j.tok_off.assign(size_t(j.T) + 1, 0);
    for (int p = 0; p < n_pos; ++p) ++j.tok_off[size_t(j.pos_tok[size_t(p)]) + 1];
    for (int t = 0; t < j.T; ++t) j.tok_off[size_t(t) + 1] += j.tok_off[size_t(t)];
    grow(j.tok_pos, size_t(n_pos));
    std::vector<int>& fill = j.start;  // reused as a cursor per token
    grow(fill, size_t(j.T));
    std::copy(j.tok_off.begin(), j.tok_off.end() - 1, fill.begin());
    for (int p = 0; p < n_pos; ++p) j.tok_pos[size_t(fill[size_t(j.pos_tok[size_t(p)])]++)] = p;
  }

  const int n_active = int(j.active.size());
  const size_t rows_pad = size_t(n_pos) + kTilePadRows;
  for (size_t n = 0; n < pools_.size(); ++n) {
    NodeState& ns = nodes_[n];
    const NodeSlice& sl = L.nodes[n];
    ns.width = sl.i1 - sl.i0;
    grow(ns.h_buf, size_t(n_pos) * size_t(ns.width));
    ns.h = ns.h_buf.data();
    if (j.direct) {
      ns.acc = static_cast<float*>(out.data);
    } else {
      grow(ns.partial, TH);
      ns.acc = ns.partial.data();
    }
    // Activation rows: one stride per buffer, the largest layout its positions use.
    size_t sx[2] = {0, 0}, sh = 0;
    ns.up_shares = true;
    for (int a = 0; a < n_active; ++a) {
      sx[0] = std::max(sx[0], kernels_of(kt_, j.gate[size_t(a)].act).bytes(L.H));
      sx[1] = std::max(sx[1], kernels_of(kt_, j.up[size_t(a)].act).bytes(L.H));
      if (ns.width > 0) sh = std::max(sh, kernels_of(kt_, j.down[size_t(a)].act).bytes(ns.width));
      ns.up_shares = ns.up_shares && j.gate[size_t(a)].act == j.up[size_t(a)].act;
    }
    ns.x_stride[0] = sx[0];
    ns.x_stride[1] = ns.up_shares ? sx[0] : sx[1];
    ns.h_stride = sh;
    uint8_t* bx0 = ns.ax[0].grow(rows_pad * sx[0]);
    uint8_t* bx1 = ns.up_shares ? bx0 : ns.ax[1].grow(rows_pad * sx[1]);
    uint8_t* bh = ns.ah.grow(rows_pad * sh);
    grow(ns.act_gate, size_t(n_pos));
    grow(ns.act_up, size_t(n_pos));
    grow(ns.act_down, size_t(n_pos));
    for (int p = 0; p < n_pos; ++p) {
      ns.act_gate[size_t(p)] = bx0 + size_t(p) * ns.x_stride[0];
      ns.act_up[size_t(p)] = bx1 + size_t(p) * ns.x_stride[1];
      ns.act_down[size_t(p)] = bh + size_t(p) * sh;
    }
    const int workers = ns.n_workers;
    const int fixed = prefill_rows();
    ns.rb_up = rows_per_task(int64_t(n_active) * ns.width, workers, j.any_big, fixed);
    ns.blocks_per_expert = (ns.width + ns.rb_up - 1) / ns.rb_up;
    ns.n_up = n_active * ns.blocks_per_expert;
    if (j.split_down) {
      ns.rb_down = rows_per_task(int64_t(n_active) * j.H, workers, j.any_big, fixed);
      ns.down_blocks = (j.H + ns.rb_down - 1) / ns.rb_down;
      ns.n_down = ns.width > 0 ? n_active * ns.down_blocks : 0;
      if (ns.width > 0) grow(ns.y_buf, size_t(n_pos) * size_t(j.H));  // an empty slice adds nothing
      ns.y = ns.y_buf.data();
    } else {
      ns.rb_down = rows_per_task(j.H, workers, j.any_big, fixed);
      ns.n_down = (j.H + ns.rb_down - 1) / ns.rb_down;
    }
    const int max_k = std::max(j.H, ns.width);
    // Per K, not for max_k alone: scratch_bytes is not monotone in K (AMX: a second bf16 panel
    // only for K <= 3072), and calls run with K = H (gate/up) and K = width (down).
    ns.kernel_scratch = act::round_up(std::max(kt_.scratch_bytes(j.H), kt_.scratch_bytes(ns.width)), 64);
    const size_t row_f32 = act::f32_bytes(max_k);
    ns.outs = act::round_up(size_t(j.max_count) * size_t(std::max(ns.rb_up, ns.rb_down)) * 4, 64);
    // up's outputs, and for experts whose h goes straight to bf16 (fused_h) gate's too
    ns.worker_scratch = ns.kernel_scratch + row_f32 + (j.split_down ? 2 : 1) * ns.outs;
    for (auto& s : ns.scratch) s.grow(ns.worker_scratch);
    // Decode-sized jobs flow: a gate/up task starts once its expert's activations are prepared,
    // the worker finishing an expert's last gate/up task prepares its h rows, and down tasks take
    // the experts in order as their h is ready. Nobody waits at a phase barrier for the slowest
    // worker (wake-up skew, the last task's tail); prefill keeps the barriers (its prep_h of an
    // expert's many tokens is work for every worker).
    ns.flow = !j.any_big && flow_enabled();
    if (ns.flow) {
      if (ns.flow_cap < size_t(n_active)) {
        ns.flow_cap = size_t(n_active);
        ns.px_done.reset(new std::atomic<int>[ns.flow_cap]);
        ns.up_done.reset(new std::atomic<int>[ns.flow_cap]);
        ns.h_ready.reset(new std::atomic<int>[ns.flow_cap]);
      }
      for (size_t a = 0; a < size_t(n_active); ++a) {
        ns.px_done[a].store(0, std::memory_order_relaxed);
        ns.up_done[a].store(0, std::memory_order_relaxed);
        ns.h_ready[a].store(0, std::memory_order_relaxed);
      }
    }
    ns.next_px.v.store(0, std::memory_order_relaxed);
    ns.arrived_px.v.store(0, std::memory_order_relaxed);
    ns.next_up.v.store(0, std::memory_order_relaxed);
    ns.arrived_up.v.store(0, std::memory_order_relaxed);
    ns.next_ph.v.store(0, std::memory_order_relaxed);
    ns.arrived_ph.v.store(0, std::memory_order_relaxed);
    ns.next_down.v.store(0, std::memory_order_relaxed);
    ns.arrived_down.v.store(0, std::memory_order_relaxed);
    ns.next_sum.v.store(0, std::memory_order_relaxed);
  }
  j.workers_left.v.store(j.total_workers, std::memory_order_relaxed);
  j.arrived_all.v.store(0, std::memory_order_relaxed);
  j.next_reduce.v.store(0, std::memory_order_relaxed);
}

void MoeEngine::run_node(int node, int worker) {
  NodeState& ns = nodes_[size_t(node)];
  Job& j = *job_;
  uint8_t* scratch = ns.scratch[size_t(worker)].b.data();
  const int n_pos = ns.width > 0 ? j.n_pos : 0;
  auto& stamp = ns.phase_ns[size_t(worker)];
  int took = 0;  // tasks this worker ran (last_tasks)
  const auto mark = [&](int phase) {
    stamp[size_t(phase)] =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - launched_at_).count();
  };
  if (ns.flow) {  // see stage: per-expert readiness instead of the barriers below
    for (int t; (t = ns.next_px.v.fetch_add(1, std::memory_order_relaxed)) < n_pos;) {
      prep_x_task(node, t, scratch), ++took;
      ns.px_done[size_t(j.pos_active[size_t(t)])].fetch_add(1, std::memory_order_release);
    }
    mark(0);
    for (int t; (t = ns.next_up.v.fetch_add(1, std::memory_order_relaxed)) < ns.n_up;) {
      const int a = t / ns.blocks_per_expert;
      // Its positions' tasks are all claimed by running workers: the count gets there.
      spin_until(ns.px_done[size_t(a)], j.active_off[size_t(a) + 1] - j.active_off[size_t(a)]);
      gate_up_task(node, t, -1, scratch), ++took;
      // The worker ending the expert's last gate/up task: its h is whole.
      if (ns.up_done[size_t(a)].fetch_add(1, std::memory_order_acq_rel) == ns.blocks_per_expert - 1) {
        for (int p = j.active_off[size_t(a)]; p < j.active_off[size_t(a) + 1]; ++p) prep_h_task(node, p);
        ns.h_ready[size_t(a)].store(1, std::memory_order_release);
      }
    }
    mark(1);
    mark(2);
  } else {
  // Each phase reads what any worker of the node wrote in the one before: a barrier between.
  if (j.split_down) {
    for (int t; n_pos > 0 && (t = ns.next_px.v.fetch_add(1, std::memory_order_relaxed)) < j.T;)
      prep_token_task(node, t, scratch), ++took;
  } else {
    for (int t; (t = ns.next_px.v.fetch_add(1, std::memory_order_relaxed)) < n_pos;)
      prep_x_task(node, t, scratch), ++took;
  }
  mark(0);
  ns.arrived_px.v.fetch_add(1, std::memory_order_acq_rel);
  spin_until(ns.arrived_px.v, ns.n_workers);
  run_tasks(ns.next_up, ns.n_up, j.any_big && j.split_down,
            [&](int t, int next) { gate_up_task(node, t, next, scratch), ++took; });
  mark(1);
  ns.arrived_up.v.fetch_add(1, std::memory_order_acq_rel);
  spin_until(ns.arrived_up.v, ns.n_workers);
  for (int t; (t = ns.next_ph.v.fetch_add(1, std::memory_order_relaxed)) < n_pos;)
    if (!j.fused_h(size_t(j.pos_active[size_t(t)]))) prep_h_task(node, t), ++took;
  mark(2);
  ns.arrived_ph.v.fetch_add(1, std::memory_order_acq_rel);
  spin_until(ns.arrived_ph.v, ns.n_workers);
  }
  if (j.split_down) {
    run_tasks(ns.next_down, ns.n_down, j.any_big,
              [&](int t, int next) { down_expert_task(node, t, next, scratch), ++took; });
    ns.arrived_down.v.fetch_add(1, std::memory_order_acq_rel);
    spin_until(ns.arrived_down.v, ns.n_workers);
    const int sums = j.T * ((j.H + kSumCols - 1) / kSumCols);  // (token, columns): decode's one token too
    for (int t; (t = ns.next_sum.v.fetch_add(1, std::memory_order_relaxed)) < sums;) sum_token(node, t), ++took;
  } else {
    for (int t; (t = ns.next_down.v.fetch_add(1, std::memory_order_relaxed)) < ns.n_down;)
      down_task(node, t, scratch), ++took;
  }
  mark(3);
  if (pools_.size() > 1) {
    j.arrived_all.v.fetch_add(1, std::memory_order_acq_rel);
    spin_until(j.arrived_all.v, j.total_workers);
    for (int t; (t = j.next_reduce.v.fetch_add(1, std::memory_order_relaxed)) < j.T;) reduce_rows(t), ++took;
  }
  mark(4);
  ns.tasks[size_t(worker)] = took;
  if (j.workers_left.v.fetch_sub(1, std::memory_order_acq_rel) == 1) finish_job();
}

std::vector<double> MoeEngine::phase_ms(bool latest) const {
  std::vector<double> ms(5, latest ? 0.0 : std::numeric_limits<double>::infinity());
  for (size_t n = 0; n < pools_.size(); ++n)
    for (int i = 0; i < nodes_[n].n_workers; ++i) {
      const auto& stamp = nodes_[n].phase_ns[size_t(i)];
      for (size_t p = 0; p < 5; ++p)
        ms[p] = latest ? std::max(ms[p], double(stamp[p]) * 1e-6) : std::min(ms[p], double(stamp[p]) * 1e-6);
    }
  return ms;
}

std::vector<std::vector<int>> MoeEngine::last_tasks() const {
  std::vector<std::vector<int>> t;
  for (size_t n = 0; n < pools_.size(); ++n)
    t.emplace_back(nodes_[n].tasks.begin(), nodes_[n].tasks.begin() + nodes_[n].n_workers);
  return t;
}

std::vector<double> MoeEngine::last_phases() const { return phase_ms(true); }

std::vector<double> MoeEngine::last_phases_first() const { return phase_ms(false); }

int64_t MoeEngine::last_launch_ns() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(launched_at_.time_since_epoch()).count();
}

void MoeEngine::finish_job() {
  done_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                     std::chrono::steady_clock::now().time_since_epoch()).count(),
                 std::memory_order_release);
  std::lock_guard<std::mutex> lk(mu_);
  completed_.store(job_->ticket, std::memory_order_release);
  cv_.notify_all();
}

}  // namespace tandem
