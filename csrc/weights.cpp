#include "weights.h"

#include "env.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <climits>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace tandem {

namespace {

// Large buffers (weights, activation staging) are streamed: 2 MB pages spare the TLB walks and
// keep the hardware prefetchers going where 4 KB pages would interrupt them every 4 KB. Where
// transparent huge pages are "madvise" (a common default) they must be asked for.
// TANDEM_HUGEPAGES=0 turns this off (for measuring what it brings).
constexpr size_t kHugePage = size_t(2) << 20;

bool want_huge_pages() {
  static const bool on = env_switch_on("TANDEM_HUGEPAGES");
  return on;
}

}  // namespace

AlignedBytes::AlignedBytes(size_t n) : size_(n) {
  if (n == 0) return;
  const bool huge = n >= kHugePage && want_huge_pages();
  const size_t align = huge ? kHugePage : 64;
  const size_t padded = (n + align - 1) / align * align;
  void* p = nullptr;
  if (posix_memalign(&p, align, padded) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(p, padded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KB pages
#endif
  ptr_.reset(static_cast<uint8_t*>(p));
}

size_t Layer::bytes() const {
  size_t n = 0;
  for (const NodeSlice& s : nodes) n += s.gate.bytes.size() + s.up.bytes.size() + s.down.bytes.size();
  return n;
}

namespace {

struct Dims {
  int E, rows, cols;
};

// The logical [E, rows, cols] of a source; checks its dtype and that K fills whole blocks.
Dims source_dims(const WeightSource& s, const std::string& what) {
  const FormatInfo f = format_info(s.fmt);
  const TensorView& t = s.t;
  const std::string fmt = f.name;
  const bool rows_given = !f.online || s.raw;  // rows already in the format's row layout
  if (!rows_given && t.dtype != DType::F32 && t.dtype != DType::BF16)
    throw DTypeError(what + ": format " + fmt + " is quantized at load from float32 or bfloat16 weights; got " +
                     dtype_name(t.dtype));
  if (rows_given && t.dtype != DType::U8)
    throw DTypeError(what + ": format " + fmt + " takes " + (f.online ? "prequantized rows" : "the file's raw blocks") +
                     " as a uint8 tensor [E, rows, row_bytes]; got " + dtype_name(t.dtype));
  if (t.ndim != 3) throw std::invalid_argument(what + " must be 3-D [E, rows, cols]; got shape " + t.shape_str());
  for (int i = 0; i < 3; ++i)
    if (t.shape[i] <= 0 || t.shape[i] > INT_MAX / 2)
      throw std::invalid_argument(what + " has an empty or too large dimension: shape " + t.shape_str());
  Dims d{int(t.shape[0]), int(t.shape[1]), int(t.shape[2])};
  if (rows_given) {
    const int64_t body = t.shape[2] - f.row_header;
    if (body <= 0 || body % f.block_bytes != 0)
      throw std::invalid_argument(what + ": a row of " + std::to_string(t.shape[2]) + " bytes is not " +
                                  (f.row_header ? std::to_string(f.row_header) + " header bytes and " : "") +
                                  "a whole number of " + fmt + " blocks (" + std::to_string(f.block_bytes) +
                                  " bytes each)");
    d.cols = int(body / f.block_bytes) * f.block_elems;
  } else if (d.cols % f.block_elems != 0) {
    throw std::invalid_argument(what + ": K = " + std::to_string(d.cols) + " is not a multiple of " + fmt +
                                "'s block of " + std::to_string(f.block_elems) + " weights");
  }
  return d;
}

std::string dims_str(const Dims& d) {
  return "[" + std::to_string(d.E) + ", " + std::to_string(d.rows) + ", " + std::to_string(d.cols) + "]";
}

// Per-worker buffers for rows that must be converted or quantized before slicing.
struct RowScratch {
  std::vector<float> f;
  std::vector<uint8_t> q;
  std::vector<uint8_t> rows;  // one group's rows in the row layout, before packing
  std::vector<const uint8_t*> ptrs;
};

// Writes columns [c0, c1) of source row (e, r) into dst in the format's row layout.
// Online formats quantize the whole row first, so a slice holds exactly the bytes the whole row
// would (INT8's row scale spans all columns): NUMA slicing never changes the numbers.
void fill_row(const WeightSource& src, int K, int e, int r, int rows, int c0, int c1, uint8_t* dst, RowScratch& s) {
  const FormatInfo f = format_info(src.fmt);
  const uint8_t* full = nullptr;
  if (f.online && !src.raw) {
    const size_t at = (size_t(e) * size_t(rows) + size_t(r)) * size_t(K);
    const float* x = static_cast<const float*>(src.t.data) + at;
    if (src.t.dtype == DType::BF16) {
      s.f.resize(size_t(K));
      const auto* b = static_cast<const uint16_t*>(src.t.data) + at;
      for (int i = 0; i < K; ++i) s.f[size_t(i)] = bf16_to_f32(b[i]);
      x = s.f.data();
    }
    if (src.fmt == Format::INT8 || src.fmt == Format::INT4) {
      // A NaN would vanish in the scale's max (and an inf take every other weight to 0): refuse
      // to quantize rather than compute something the checkpoint does not say.
      for (int i = 0; i < K; ++i)
        if (!std::isfinite(x[i]))
          throw std::invalid_argument(std::string("weight ") + (std::isnan(x[i]) ? "NaN" : "inf") + " at expert " +
                                      std::to_string(e) + ", row " + std::to_string(r) + ", column " +
                                      std::to_string(i) + ": " + f.name +
                                      " cannot quantize it; check the checkpoint (BF16 keeps such values)");
    }
    const bool whole = c0 == 0 && c1 == K;
    if (!whole) s.q.resize(f.row_bytes(K));
    uint8_t* out = whole ? dst : s.q.data();
    visit_format(src.fmt, [&](auto fmt) {
      using F = decltype(fmt);
      if constexpr (F::online) quantize_row<F>(x, K, out);
    });
    if (whole) return;
    full = s.q.data();
  } else {
    full = static_cast<const uint8_t*>(src.t.data) + (size_t(e) * size_t(rows) + size_t(r)) * size_t(src.t.shape[2]);
  }
  std::memcpy(dst, full, size_t(f.row_header));
  std::memcpy(dst + f.row_header, full + f.row_header + size_t(c0 / f.block_elems) * f.block_bytes,
              size_t((c1 - c0) / f.block_elems) * f.block_bytes);
}

Matrix make_matrix(Format fmt, const KernelTable& kt, int E, int rows, int cols) {
  const FormatKernels& k = kernels_of(kt, fmt);
  Matrix m;
  m.fmt = fmt;
  m.experts = E;
  m.rows = rows;
  m.cols = cols;
  m.row_group = k.row_group;
  m.groups = (rows + k.row_group - 1) / k.row_group;
  m.group_bytes = cols > 0 ? k.group_bytes(cols) : 0;
  m.bytes = AlignedBytes(size_t(E) * size_t(m.groups) * m.group_bytes);  // pages untouched until filled
  return m;
}

// Rows of one load-time work item (a multiple of every row group).
constexpr int kRowsPerItem = 32;

}  // namespace

std::unique_ptr<Layer> build_layer(const WeightSource& gate, const WeightSource& up, const WeightSource& down,
                                   const KernelTable& kernels, const std::vector<ThreadPool*>& pools,
                                   const std::vector<int>& share) {
  const Dims g = source_dims(gate, "gate"), u = source_dims(up, "up"), d = source_dims(down, "down");
  if (u.E != g.E || u.rows != g.rows || u.cols != g.cols)
    throw std::invalid_argument("up is " + dims_str(u) + " but gate is " + dims_str(g) + "; both must be [E, I, H]");
  if (d.E != g.E || d.rows != g.cols || d.cols != g.rows)
    throw std::invalid_argument("down is " + dims_str(d) + " but gate is " + dims_str(g) +
                                "; down must be [E, H, I] = " + dims_str({g.E, g.cols, g.rows}));

  auto L = std::make_unique<Layer>();
  L->E = g.E;
  L->I = g.rows;
  L->H = g.cols;
  L->fmt[0] = gate.fmt;
  L->fmt[1] = up.fmt;
  L->fmt[2] = down.fmt;

  // Slice boundaries fall on down's blocks, in proportion to each node's threads.
  const int align = format_info(down.fmt).block_elems;
  const int64_t units = L->I / align;
  int64_t total = 0, cum = 0;
  for (int s : share) total += s;
  const int n_nodes = int(pools.size());
  L->nodes.resize(size_t(n_nodes));
  for (int n = 0; n < n_nodes; ++n) {
    NodeSlice& s = L->nodes[size_t(n)];
    s.i0 = int(units * cum / total) * align;
    cum += share[size_t(n)];
    s.i1 = int(units * cum / total) * align;
    const int w = s.i1 - s.i0;
    s.gate = make_matrix(gate.fmt, kernels, L->E, w, L->H);
    s.up = make_matrix(up.fmt, kernels, L->E, w, L->H);
    s.down = make_matrix(down.fmt, kernels, L->E, w > 0 ? L->H : 0, w);
  }

  // Items: (matrix, expert, chunk of kRowsPerItem rows), numbered gate first, then up, then down.
  const size_t nn = pools.size();
  std::vector<int> chunks_gu(nn), chunks_d(nn), items(nn);
  for (size_t n = 0; n < nn; ++n) {
    const NodeSlice& s = L->nodes[n];
    chunks_gu[n] = (s.i1 - s.i0 + kRowsPerItem - 1) / kRowsPerItem;
    chunks_d[n] = s.i1 > s.i0 ? (L->H + kRowsPerItem - 1) / kRowsPerItem : 0;
    items[n] = L->E * (2 * chunks_gu[n] + chunks_d[n]);
  }
  Layer& lay = *L;
  std::vector<std::vector<RowScratch>> scratch(nn);
  for (size_t n = 0; n < nn; ++n) scratch[n].resize(size_t(pools[n]->size()));
  parallel_for(pools, items, [&](int n, int it, int worker) {
    NodeSlice& s = lay.nodes[size_t(n)];
    RowScratch& rs = scratch[size_t(n)][size_t(worker)];
    const int per_matrix = lay.E * chunks_gu[size_t(n)];
    const int m = it < per_matrix ? 0 : it < 2 * per_matrix ? 1 : 2;
    it -= m * per_matrix;
    const int per_expert = m < 2 ? chunks_gu[size_t(n)] : chunks_d[size_t(n)];
    const int e = it / per_expert, r0 = (it % per_expert) * kRowsPerItem;
    Matrix& dst = m == 0 ? s.gate : m == 1 ? s.up : s.down;
    const WeightSource& src = m == 0 ? gate : m == 1 ? up : down;
    const FormatKernels& k = kernels_of(kernels, dst.fmt);
    const size_t rb = format_info(dst.fmt).row_bytes(dst.cols);
    const int R = dst.row_group;
    rs.rows.resize(size_t(R) * rb);
    rs.ptrs.resize(size_t(R));
    for (int r = r0; r < std::min(r0 + kRowsPerItem, dst.rows); r += R) {
      const int n_rows = std::min(R, dst.rows - r);
      for (int i = 0; i < n_rows; ++i) {
        uint8_t* row = rs.rows.data() + size_t(i) * rb;
        if (m < 2) fill_row(src, lay.H, e, s.i0 + r + i, lay.I, 0, lay.H, row, rs);
        else fill_row(src, lay.I, e, r + i, lay.H, s.i0, s.i1, row, rs);
        rs.ptrs[size_t(i)] = row;
      }
      k.pack(rs.ptrs.data(), n_rows, dst.cols, dst.group_mut(e, r / R));
    }
  });
  return L;
}

}  // namespace tandem
