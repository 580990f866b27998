// The MoE engine's task bodies: what a worker does with one task of each phase (run_node in moe.cpp
// claims them); the job they read and write is in moe_job.h.
#include "moe_job.h"

#include "kernels/act.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace tandem {

namespace {

// o += w * y: the one place down's outputs are weighted and summed, whichever task shape ran.
void add_scaled(float* o, float w, const float* y, int n) {
  for (int r = 0; r < n; ++r) o[r] += w * y[r];
}

void to_bf16(const float* x, uint16_t* out, int n) {
  for (int r = 0; r < n; ++r) out[r] = f32_to_bf16(x[r]);
}

// What a call on rows r0.. (nr of them) of expert e of `m`, over cnt activation rows from `act`
// (stride apart), reads first: see NextCall.
NextCall first_reads(const Matrix& m, int e, int r0, int nr, const uint8_t* act, size_t stride, int cnt) {
  const int groups = (std::min(nr, kBigRowBlock) + m.row_group - 1) / m.row_group;
  return NextCall{m.at(e, r0), size_t(groups) * m.group_bytes, act, size_t(std::min(cnt, 32)) * stride};
}

}  // namespace

// Token t's row of x as float32 (bfloat16 input converted into the worker's scratch).
const float* MoeEngine::x_row(int node, int t, uint8_t* scratch) const {
  const Job& j = *job_;
  if (j.x_dtype == DType::F32) return reinterpret_cast<const float*>(j.xp) + size_t(t) * size_t(j.H);
  auto* f = reinterpret_cast<float*>(scratch + nodes_[size_t(node)].kernel_scratch);
  const auto* b = reinterpret_cast<const uint16_t*>(j.xp) + size_t(t) * size_t(j.H);
  for (int i = 0; i < j.H; ++i) f[i] = bf16_to_f32(b[i]);
  return f;
}

// Position p's token -> gate's (and, if its layout differs, up's) activation row.
void MoeEngine::prep_x_task(int node, int p, uint8_t* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const float* x = x_row(node, j.pos_tok[size_t(p)], scratch);
  const int a = j.pos_active[size_t(p)];
  kernels_of(kt_, j.gate[size_t(a)].act).prep(x, j.H, const_cast<uint8_t*>(ns.act_gate[size_t(p)]));
  if (!ns.up_shares)
    kernels_of(kt_, j.up[size_t(a)].act).prep(x, j.H, const_cast<uint8_t*>(ns.act_up[size_t(p)]));
}

// Jobs on barriers: token t -> the activation rows of all its positions, each layout prepared once and
// copied to the token's other positions that use it (a token has k positions; preparing is the
// cost, copying a row is not).
void MoeEngine::prep_token_task(int node, int t, uint8_t* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const int i0 = j.tok_off[size_t(t)], i1 = j.tok_off[size_t(t) + 1];
  if (i0 == i1) return;  // no expert of this engine (a dual step's tokens of device experts only)
  const float* x = x_row(node, t, scratch);
  const auto rows = [&](const std::vector<Route>& route, std::vector<const uint8_t*>& act) {
    for (int i = i0; i < i1; ++i) {
      const int p = j.tok_pos[size_t(i)];
      const ActKind kind = route[size_t(j.pos_active[size_t(p)])].act;
      auto* dst = const_cast<uint8_t*>(act[size_t(p)]);
      int q = i0;  // an earlier position of t with this layout
      while (q < i && route[size_t(j.pos_active[size_t(j.tok_pos[size_t(q)])])].act != kind) ++q;
      const ActKernels& ak = kernels_of(kt_, kind);
      if (q < i) std::memcpy(dst, act[size_t(j.tok_pos[size_t(q)])], ak.bytes(j.H));
      else ak.prep(x, j.H, dst);
    }
  };
  rows(j.gate, ns.act_gate);
  if (!ns.up_shares) rows(j.up, ns.act_up);
}

void MoeEngine::prep_h_task(int node, int p) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const ActKind kd = j.down[size_t(j.pos_active[size_t(p)])].act;
  kernels_of(kt_, kd).prep(ns.h + size_t(p) * size_t(ns.width), ns.width, const_cast<uint8_t*>(ns.act_down[size_t(p)]));
}

// Gate/up task `task` (the worker's next one: `next`, or -1) -> h rows.
void MoeEngine::gate_up_task(int node, int task, int next, uint8_t* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const NodeSlice& sl = j.layer->nodes[size_t(node)];
  const int rb = ns.rb_up;
  const int a = task / ns.blocks_per_expert, r0 = (task % ns.blocks_per_expert) * rb;
  const int nr = std::min(rb, ns.width - r0);
  const int e = j.active[size_t(a)], off = j.active_off[size_t(a)], cnt = j.active_off[size_t(a) + 1] - off;
  auto* up = reinterpret_cast<float*>(scratch + ns.kernel_scratch + act::f32_bytes(std::max(j.H, ns.width)));
  const bool fused = j.fused_h(size_t(a));
  // h rows: this task's columns of ns.h, or (fused) a scratch block after up's, nr wide
  float* h = fused ? reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(up) + ns.outs)
                   : ns.h + size_t(off) * size_t(ns.width) + size_t(r0);
  const size_t hs = fused ? size_t(nr) : size_t(ns.width);
  MatArgs g{sl.gate.at(e, r0), sl.gate.group_bytes, nr, j.H, ns.act_gate.data() + off, ns.x_stride[0], cnt,
            h, hs, scratch, NextCall{}};
  g.next = first_reads(sl.up, e, r0, nr, ns.up_shares ? nullptr : ns.act_up[size_t(off)], ns.x_stride[1], cnt);
  j.gate[size_t(a)].fn(g);
  MatArgs u{sl.up.at(e, r0), sl.up.group_bytes, nr, j.H, ns.act_up.data() + off, ns.x_stride[1], cnt,
            up, size_t(nr), scratch, NextCall{}};
  if (next >= 0) {
    const int na = next / ns.blocks_per_expert, nr0 = (next % ns.blocks_per_expert) * rb;
    const int noff = j.active_off[size_t(na)];
    u.next = first_reads(sl.gate, j.active[size_t(na)], nr0, std::min(rb, ns.width - nr0), ns.act_gate[size_t(noff)],
                         ns.x_stride[0], j.active_off[size_t(na) + 1] - noff);
  }
  j.up[size_t(a)].fn(u);
  for (int i = 0; i < cnt; ++i) {
    kt_.swiglu(h + size_t(i) * hs, up + size_t(i) * size_t(nr), nr);
    if (fused)
      write_h_slice(j.down[size_t(a)].act, h + size_t(i) * hs, r0, nr, ns.width,
                    const_cast<uint8_t*>(ns.act_down[size_t(off + i)]), scratch);
  }
}

void MoeEngine::down_task(int node, int task, uint8_t* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const NodeSlice& sl = j.layer->nodes[size_t(node)];
  const int rb = ns.rb_down;
  const int h0 = task * rb, nr = std::min(rb, j.H - h0);
  auto* y = reinterpret_cast<float*>(scratch + ns.kernel_scratch + act::f32_bytes(std::max(j.H, ns.width)));
  // This task owns columns h0..h0+nr of acc for every token: no other task writes them.
  for (int t = 0; t < j.T; ++t)
    std::memset(ns.acc + size_t(t) * size_t(j.H) + size_t(h0), 0, size_t(nr) * sizeof(float));
  if (ns.width > 0) {
    for (size_t a = 0; a < j.active.size(); ++a) {
      if (ns.flow) spin_until(ns.h_ready[a], 1);  // the experts come ready in this order, about
      const int e = j.active[a], off = j.active_off[a], cnt = j.active_off[a + 1] - off;
      const MatArgs d{sl.down.at(e, h0), sl.down.group_bytes, nr, ns.width, ns.act_down.data() + off, ns.h_stride,
                      cnt, y, size_t(nr), scratch, NextCall{}};
      j.down[a].fn(d);
      for (int i = 0; i < cnt; ++i)
        add_scaled(ns.acc + size_t(j.pos_tok[size_t(off + i)]) * size_t(j.H) + size_t(h0), j.pos_w[size_t(off + i)],
                   y + size_t(i) * size_t(nr), nr);
    }
  }
  if (pools_.size() == 1 && !j.direct) {  // one node, bfloat16 out: convert the block we own
    for (int t = 0; t < j.T; ++t) {
      const size_t at = size_t(t) * size_t(j.H) + size_t(h0);
      to_bf16(ns.acc + at, static_cast<uint16_t*>(j.out) + at, nr);
    }
  }
}

// Columns r0 .. r0 + nr of one h row (r0 a multiple of 64; the row is `width` wide) -> their part of
// the row in down's `kind` layout (BF16 or Q8_64), the same bytes as preparing the whole row; the
// slice ending the row writes its padding. tmp: kernel scratch (q8_64_bytes(nr) bytes).
void MoeEngine::write_h_slice(ActKind kind, const float* h, int r0, int nr, int width, uint8_t* row,
                              uint8_t* tmp) const {
  const ActKernels& ak = kernels_of(kt_, kind);
  if (kind == ActKind::BF16) {
    ak.prep(h, nr, row + 2 * size_t(r0));
    return;
  }
  ak.prep(h, nr, tmp);  // Q8_64: codes, then one scale per 64
  std::memcpy(row + r0, tmp, size_t(act::q8_k(nr)));
  std::memcpy(row + act::q8_64_d(width) + 4 * size_t(r0 / 64), tmp + act::q8_64_d(nr), 4 * size_t(act::q8_k(nr) / 64));
}

// One expert's rows h0.. of down for all its positions, into their rows of y (no other task
// writes them).
void MoeEngine::down_expert_task(int node, int task, int next, uint8_t* scratch) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const NodeSlice& sl = j.layer->nodes[size_t(node)];
  const auto rows = [&](int t) {  // (active index, first row of H) of task t
    return std::pair<int, int>(t / ns.down_blocks, (t % ns.down_blocks) * ns.rb_down);
  };
  const auto [a, h0] = rows(task);
  if (ns.flow) spin_until(ns.h_ready[size_t(a)], 1);  // tasks go expert by expert, as the experts come ready
  const int e = j.active[size_t(a)], off = j.active_off[size_t(a)], cnt = j.active_off[size_t(a) + 1] - off;
  MatArgs d{sl.down.at(e, h0), sl.down.group_bytes, std::min(ns.rb_down, j.H - h0), ns.width,
            ns.act_down.data() + off, ns.h_stride, cnt, ns.y + size_t(off) * size_t(j.H) + size_t(h0), size_t(j.H),
            scratch, NextCall{}};
  if (next >= 0) {
    const auto [na, nh0] = rows(next);
    const int noff = j.active_off[size_t(na)];
    d.next = first_reads(sl.down, j.active[size_t(na)], nh0, std::min(ns.rb_down, j.H - nh0), ns.act_down[size_t(noff)],
                         ns.h_stride, j.active_off[size_t(na) + 1] - noff);
  }
  j.down[size_t(a)].fn(d);
}

// acc[t] = sum of w * y over token t's positions in ascending order (the experts' order, the
// same sums as down_task's), for the columns of sum task `task` (token t, kSumCols columns).
void MoeEngine::sum_token(int node, int task) {
  const Job& j = *job_;
  NodeState& ns = nodes_[size_t(node)];
  const int blocks = (j.H + kSumCols - 1) / kSumCols, t = task / blocks, c0 = (task % blocks) * kSumCols;
  const int n = std::min(kSumCols, j.H - c0);
  const size_t at = size_t(t) * size_t(j.H) + size_t(c0);
  float* o = ns.acc + at;
  std::memset(o, 0, size_t(n) * sizeof(float));
  if (ns.width > 0)
    for (int i = j.tok_off[size_t(t)]; i < j.tok_off[size_t(t) + 1]; ++i) {
      const int p = j.tok_pos[size_t(i)];
      add_scaled(o, j.pos_w[size_t(p)], ns.y + size_t(p) * size_t(j.H) + size_t(c0), n);
    }
  if (pools_.size() == 1 && !j.direct) to_bf16(o, static_cast<uint16_t*>(j.out) + at, n);
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

}  // namespace tandem
