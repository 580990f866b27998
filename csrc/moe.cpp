#include "moe.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace tandem {

namespace {

// Staging only grows: after the largest batch has been seen once, submit allocates nothing.
template <class V>
void grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

struct MoeEngine::NodeTask final : PoolTask {
  MoeEngine* engine = nullptr;
  int node = 0;
  void run(int worker) override { engine->run_node(node, worker); }
};

// One node's share of the running job.
struct MoeEngine::NodeState {
  PaddedCounter next_up, arrived, next_down;
  int n_workers = 0;
  int width = 0;              // this node's slice of I
  int blocks_per_expert = 0;  // gate/up tasks per active expert
  int n_up = 0, n_down = 0;
  float* h = nullptr;    // [n_pos, width]: silu(gate x) * up x, one row per (token, expert) pair
  float* acc = nullptr;  // [T, H]: this node's partial output (the caller's out when direct)
  size_t kernel_scratch = 0;
  std::vector<float> h_buf, partial;
  std::vector<const float*> h_ptr;         // [n_pos] rows of h, the down kernel's activations
  std::vector<std::vector<float>> scratch;  // per worker: kernel scratch, then [max_count, rows_per_task]
};

// The running job and its staging buffers (reused from job to job).
struct MoeEngine::Job {
  const Layer* layer = nullptr;
  int T = 0, k = 0, H = 0;
  uint64_t ticket = 0;
  void* out = nullptr;
  DType out_dtype = DType::F32;
  bool direct = false;  // one node and a float32 out: accumulate straight into out

  std::vector<float> x;           // [T, H] fp32 copy of the input
  std::vector<int> count, start;  // [E] tokens per expert, fill cursor
  std::vector<int> active;        // experts with tokens, ascending
  std::vector<int> active_off;    // [n_active + 1] their ranges in pos_*
  std::vector<int> pos_tok;       // (token, expert) pairs grouped by expert, tokens ascending
  std::vector<float> pos_w;
  std::vector<const float*> pos_x;
  int max_count = 0;

  int total_workers = 0;
  PaddedCounter workers_left, arrived_all, next_reduce;
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
    nodes_[i].scratch.resize(size_t(threads_per_node[i]));
    node_tasks_[i].engine = this;
    node_tasks_[i].node = int(i);
    job_->total_workers += threads_per_node[i];
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
  layers_.push_back(build_layer(gate, up, down, pools, threads_per_node()));
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
                           const TensorView& out) {
  std::lock_guard<std::mutex> g(submit_mu_);
  const Layer& L = layer(layer_id);
  check_inputs(L, x, ids, w, out);
  wait_idle();
  stage(L, x, ids, w, out);
  uint64_t ticket;
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
  for (size_t n = 0; n < pools_.size(); ++n) pools_[n]->launch(&node_tasks_[n]);
  return ticket;
}

void MoeEngine::wait(uint64_t ticket) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (ticket == 0 || ticket > launched_)
      throw std::invalid_argument("wait: unknown ticket " + std::to_string(ticket));
  }
  // Spin briefly first: a decode step's result often lands within microseconds.
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  while (completed_.load(std::memory_order_acquire) < ticket && std::chrono::steady_clock::now() < until) {
  }
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return completed_.load(std::memory_order_acquire) >= ticket; });
}

void MoeEngine::stage(const Layer& L, const TensorView& x, const TensorView& ids, const TensorView& w,
                      const TensorView& out) {
  Job& j = *job_;
  j.layer = &L;
  j.T = int(x.shape[0]);
  j.k = int(ids.shape[1]);
  j.H = L.H;
  j.out = out.data;
  j.out_dtype = out.dtype;
  j.direct = pools_.size() == 1 && out.dtype == DType::F32;
  const size_t TH = size_t(j.T) * size_t(j.H), TK = size_t(j.T) * size_t(j.k);

  grow(j.x, TH);
  if (x.dtype == DType::F32) {
    if (TH) std::memcpy(j.x.data(), x.data, TH * sizeof(float));
  } else {
    const auto* b = static_cast<const uint16_t*>(x.data);
    for (size_t i = 0; i < TH; ++i) j.x[i] = bf16_to_f32(b[i]);
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
  int n_pos = 0;
  j.max_count = 0;
  for (int e = 0; e < L.E; ++e) {
    const int c = j.count[size_t(e)];
    if (c == 0) continue;  // experts without tokens cost nothing
    j.active.push_back(e);
    j.active_off.push_back(n_pos);
    j.start[size_t(e)] = n_pos;
    n_pos += c;
    j.max_count = std::max(j.max_count, c);
  }
  j.active_off.push_back(n_pos);
  grow(j.pos_tok, size_t(n_pos));
  grow(j.pos_w, size_t(n_pos));
  grow(j.pos_x, size_t(n_pos));
  for (size_t i = 0; i < TK; ++i) {
    if (id[i] < 0) continue;
    const int p = j.start[size_t(id[i])]++;
    const size_t t = i / size_t(j.k);
    j.pos_tok[size_t(p)] = int(t);
    j.pos_w[size_t(p)] = wt[i];
    j.pos_x[size_t(p)] = j.x.data() + t * size_t(j.H);
  }

  const int rb = kt_.rows_per_task;
  const int n_active = int(j.active.size());
  for (size_t n = 0; n < pools_.size(); ++n) {
    NodeState& ns = nodes_[n];
    const NodeSlice& sl = L.nodes[n];
    ns.width = sl.i1 - sl.i0;
    grow(ns.h_buf, size_t(n_pos) * size_t(ns.width));
    grow(ns.h_ptr, size_t(n_pos));
    ns.h = ns.h_buf.data();
    for (int p = 0; p < n_pos; ++p) ns.h_ptr[size_t(p)] = ns.h + size_t(p) * size_t(ns.width);
    if (j.direct) {
      ns.acc = static_cast<float*>(out.data);
    } else {
      grow(ns.partial, TH);
      ns.acc = ns.partial.data();
    }
    ns.blocks_per_expert = (ns.width + rb - 1) / rb;
    ns.n_up = n_active * ns.blocks_per_expert;
    ns.n_down = (j.H + rb - 1) / rb;
    ns.kernel_scratch = kt_.scratch_floats(std::max(j.H, ns.width));
    for (auto& s : ns.scratch) grow(s, ns.kernel_scratch + size_t(j.max_count) * size_t(rb));
    ns.next_up.v.store(0, std::memory_order_relaxed);
    ns.arrived.v.store(0, std::memory_order_relaxed);
    ns.next_down.v.store(0, std::memory_order_relaxed);
  }
  j.workers_left.v.store(j.total_workers, std::memory_order_relaxed);
  j.arrived_all.v.store(0, std::memory_order_relaxed);
  j.next_reduce.v.store(0, std::memory_order_relaxed);
}

void MoeEngine::run_node(int node, int worker) {
  NodeState& ns = nodes_[size_t(node)];
  Job& j = *job_;
  float* scratch = ns.scratch[size_t(worker)].data();
  for (int t; (t = ns.next_up.v.fetch_add(1, std::memory_order_relaxed)) < ns.n_up;) gate_up_task(node, t, scratch);
  ns.arrived.v.fetch_add(1, std::memory_order_acq_rel);
  spin_until(ns.arrived.v, ns.n_workers);  // down reads h rows written by any worker of the node
  for (int t; (t = ns.next_down.v.fetch_add(1, std::memory_order_relaxed)) < ns.n_down;) down_task(node, t, scratch);
  if (pools_.size() > 1) {
    j.arrived_all.v.fetch_add(1, std::memory_order_acq_rel);
    spin_until(j.arrived_all.v, j.total_workers);
    for (int t; (t = j.next_reduce.v.fetch_add(1, std::memory_order_relaxed)) < j.T;) reduce_rows(t);
  }
  if (j.workers_left.v.fetch_sub(1, std::memory_order_acq_rel) == 1) finish_job();
}

void MoeEngine::gate_up_task(int node, int task, float* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const NodeSlice& sl = j.layer->nodes[size_t(node)];
  const int rb = kt_.rows_per_task;
  const int a = task / ns.blocks_per_expert, r0 = (task % ns.blocks_per_expert) * rb;
  const int nr = std::min(rb, ns.width - r0);
  const int e = j.active[size_t(a)], off = j.active_off[size_t(a)], cnt = j.active_off[size_t(a) + 1] - off;
  float* up = scratch + ns.kernel_scratch;  // [cnt, nr]
  float* h = ns.h + size_t(off) * size_t(ns.width) + size_t(r0);
  const float* const* x = j.pos_x.data() + off;
  const MatArgs g{sl.gate.row(e, r0), sl.gate.row_bytes, nr, j.H, x, cnt, h, size_t(ns.width), scratch};
  kt_.matmul[int(sl.gate.fmt)](g);
  const MatArgs u{sl.up.row(e, r0), sl.up.row_bytes, nr, j.H, x, cnt, up, size_t(nr), scratch};
  kt_.matmul[int(sl.up.fmt)](u);
  for (int i = 0; i < cnt; ++i) {
    float* hr = h + size_t(i) * size_t(ns.width);
    const float* ur = up + size_t(i) * size_t(nr);
    for (int r = 0; r < nr; ++r) hr[r] = silu(hr[r]) * ur[r];
  }
}

void MoeEngine::down_task(int node, int task, float* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const NodeSlice& sl = j.layer->nodes[size_t(node)];
  const int rb = kt_.rows_per_task;
  const int h0 = task * rb, nr = std::min(rb, j.H - h0);
  float* y = scratch + ns.kernel_scratch;  // [cnt, nr]
  // This task owns columns h0..h0+nr of acc for every token: no other task writes them.
  for (int t = 0; t < j.T; ++t)
    std::memset(ns.acc + size_t(t) * size_t(j.H) + size_t(h0), 0, size_t(nr) * sizeof(float));
  if (ns.width > 0) {
    for (size_t a = 0; a < j.active.size(); ++a) {
      const int e = j.active[a], off = j.active_off[a], cnt = j.active_off[a + 1] - off;
      const float* const* h = ns.h_ptr.data() + off;
      const MatArgs d{sl.down.row(e, h0), sl.down.row_bytes, nr, ns.width, h, cnt, y, size_t(nr), scratch};
      kt_.matmul[int(sl.down.fmt)](d);
      for (int i = 0; i < cnt; ++i) {
        const float wt = j.pos_w[size_t(off + i)];
        float* o = ns.acc + size_t(j.pos_tok[size_t(off + i)]) * size_t(j.H) + size_t(h0);
        const float* yr = y + size_t(i) * size_t(nr);
        for (int r = 0; r < nr; ++r) o[r] += wt * yr[r];
      }
    }
  }
  if (pools_.size() == 1 && !j.direct) {  // one node, bfloat16 out: convert the block we own
    auto* out = static_cast<uint16_t*>(j.out);
    for (int t = 0; t < j.T; ++t) {
      const size_t at = size_t(t) * size_t(j.H) + size_t(h0);
      for (int r = 0; r < nr; ++r) out[at + size_t(r)] = f32_to_bf16(ns.acc[at + size_t(r)]);
    }
  }
}

// out[t] = sum of the nodes' partials, in node order (deterministic).
void MoeEngine::reduce_rows(int t) {
  const Job& j = *job_;
  const size_t at = size_t(t) * size_t(j.H);
  float* sum = nodes_[0].acc + at;
  for (size_t n = 1; n < pools_.size(); ++n) {
    const float* p = nodes_[n].acc + at;
    for (int h = 0; h < j.H; ++h) sum[h] += p[h];
  }
  if (j.out_dtype == DType::F32) {
    std::memcpy(static_cast<float*>(j.out) + at, sum, size_t(j.H) * sizeof(float));
  } else {
    auto* out = static_cast<uint16_t*>(j.out) + at;
    for (int h = 0; h < j.H; ++h) out[h] = f32_to_bf16(sum[h]);
  }
}

void MoeEngine::finish_job() {
  std::lock_guard<std::mutex> lk(mu_);
  completed_.store(job_->ticket, std::memory_order_release);
  cv_.notify_all();
}

}  // namespace tandem
