#include "weights.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace tandem {

AlignedBytes::AlignedBytes(size_t n) : size_(n) {
  if (n == 0) return;
  void* p = nullptr;
  if (posix_memalign(&p, 64, (n + 63) / 64 * 64) != 0) throw std::bad_alloc();
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
  if (f.online && t.dtype != DType::F32 && t.dtype != DType::BF16)
    throw DTypeError(what + ": format " + fmt + " is quantized at load from float32 or bfloat16 weights; got " +
                     dtype_name(t.dtype));
  if (!f.online && t.dtype != DType::U8)
    throw DTypeError(what + ": format " + fmt + " takes the file's raw blocks as a uint8 tensor " +
                     "[E, rows, row_bytes]; got " + dtype_name(t.dtype));
  if (t.ndim != 3) throw std::invalid_argument(what + " must be 3-D [E, rows, cols]; got shape " + t.shape_str());
  for (int i = 0; i < 3; ++i)
    if (t.shape[i] <= 0 || t.shape[i] > INT_MAX / 2)
      throw std::invalid_argument(what + " has an empty or too large dimension: shape " + t.shape_str());
  Dims d{int(t.shape[0]), int(t.shape[1]), int(t.shape[2])};
  if (!f.online) {
    if (t.shape[2] % f.block_bytes != 0)
      throw std::invalid_argument(what + ": a row of " + std::to_string(t.shape[2]) +
                                  " bytes is not a whole number of " + fmt + " blocks (" +
                                  std::to_string(f.block_bytes) + " bytes each)");
    d.cols = int(t.shape[2] / f.block_bytes) * f.block_elems;
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
};

// Writes columns [c0, c1) of source row (e, r) into dst in the format's row layout.
// Online formats quantize the whole row first, so a slice holds exactly the bytes the whole row
// would (INT8's row scale spans all columns): NUMA slicing never changes the numbers.
void fill_row(const WeightSource& src, int K, int e, int r, int rows, int c0, int c1, uint8_t* dst, RowScratch& s) {
  const FormatInfo f = format_info(src.fmt);
  const uint8_t* full = nullptr;
  if (f.online) {
    const size_t at = (size_t(e) * size_t(rows) + size_t(r)) * size_t(K);
    const float* x = static_cast<const float*>(src.t.data) + at;
    if (src.t.dtype == DType::BF16) {
      s.f.resize(size_t(K));
      const auto* b = static_cast<const uint16_t*>(src.t.data) + at;
      for (int i = 0; i < K; ++i) s.f[size_t(i)] = bf16_to_f32(b[i]);
      x = s.f.data();
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

Matrix make_matrix(Format fmt, int E, int rows, int cols) {
  Matrix m;
  m.fmt = fmt;
  m.experts = E;
  m.rows = rows;
  m.cols = cols;
  m.row_bytes = format_info(fmt).row_bytes(cols);
  m.bytes = AlignedBytes(size_t(E) * size_t(rows) * m.row_bytes);  // pages untouched until filled
  return m;
}

constexpr int kRowsPerItem = 32;

}  // namespace

std::unique_ptr<Layer> build_layer(const WeightSource& gate, const WeightSource& up, const WeightSource& down,
                                   const std::vector<ThreadPool*>& pools, const std::vector<int>& share) {
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
    s.gate = make_matrix(gate.fmt, L->E, w, L->H);
    s.up = make_matrix(up.fmt, L->E, w, L->H);
    s.down = make_matrix(down.fmt, L->E, L->H, w);
  }

  // Items: (matrix, expert, chunk of rows), numbered gate first, then up, then down.
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
    if (m < 2) {
      Matrix& dst = m == 0 ? s.gate : s.up;
      for (int r = r0; r < std::min(r0 + kRowsPerItem, dst.rows); ++r)
        fill_row(m == 0 ? gate : up, lay.H, e, s.i0 + r, lay.I, 0, lay.H, dst.row_mut(e, r), rs);
    } else {
      for (int r = r0; r < std::min(r0 + kRowsPerItem, lay.H); ++r)
        fill_row(down, lay.I, e, r, lay.H, s.i0, s.i1, s.down.row_mut(e, r), rs);
    }
  });
  return L;
}

}  // namespace tandem
