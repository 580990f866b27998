// The generic kernel table: one template instance per format.
#include "matmul.h"

namespace tandem {

namespace {
size_t generic_scratch_floats(int K) { return size_t(K); }

KernelTable make_generic() {
  KernelTable t{};
  t.isa = "generic";
  t.rows_per_task = 16;
  t.scratch_floats = &generic_scratch_floats;
  for (int i = 0; i < kFormatCount; ++i)
    t.matmul[i] = visit_format(format_at(i), [](auto f) -> MatFn { return &generic::matmul<decltype(f)>; });
  return t;
}
}  // namespace

const KernelTable& generic_kernels() {
  static const KernelTable table = make_generic();
  return table;
}

}  // namespace tandem
