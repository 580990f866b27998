// The generic kernel table: rows as the file has them, fp32 activations, one template instance
// per format.
#include <cmath>
#include <cstring>

#include "../act.h"
#include "matmul.h"

namespace tandem {

namespace {

size_t generic_scratch_bytes(int K) { return act::f32_bytes(K); }

void prep_f32(const float* x, int K, uint8_t* dst) { std::memcpy(dst, x, size_t(K) * sizeof(float)); }

void swiglu(float* h, const float* up, int n) {
  for (int i = 0; i < n; ++i) h[i] = h[i] / (1.0f + std::exp(-h[i])) * up[i];
}

uint64_t stream_read(const uint8_t* p, size_t n, int streams) {
  uint64_t acc[4] = {0, 0, 0, 0};
  const size_t part = n / size_t(streams);
  for (size_t i = 0; i < part; i += 32)
    for (int s = 0; s < streams; ++s)
      for (int j = 0; j < 4; ++j) {
        uint64_t v;
        std::memcpy(&v, p + size_t(s) * part + i + 8 * size_t(j), 8);
        acc[j] ^= v;
      }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
}

KernelTable make_generic() {
  KernelTable t{};
  t.isa = "generic";
  t.scratch_bytes = &generic_scratch_bytes;
  t.stream_read = &stream_read;
  t.swiglu = &swiglu;
  for (int i = 0; i < kFormatCount; ++i) {
    FormatKernels& k = t.fmt[i];
    visit_format(format_at(i), [&](auto f) {
      using F = decltype(f);
      k.row_group = 1;
      k.group_bytes = &generic::row_bytes<F>;
      k.pack = &generic::pack_rows<F>;
      k.act = ActKind::F32;
      k.matmul = &generic::matmul<F>;
      k.path = "generic";
    });
  }
  t.act[int(ActKind::F32)] = ActKernels{&act::f32_bytes, &prep_f32};
  return t;
}

}  // namespace

const KernelTable& generic_kernels() {
  static const KernelTable table = make_generic();
  return table;
}

}  // namespace tandem
