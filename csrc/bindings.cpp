// tandem._C: thin, typed bindings. Tensors come in as DLPack/ndarray objects and are turned into
// borrowed TensorViews; the engine is an owned object; no raw pointers reach Python.
// The GIL is released while the engine loads weights, stages a batch, or waits.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdlib>
#include <string>

#include "dispatch.h"
#include "moe.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tandem {
namespace {

DType dtype_of(const nb::dlpack::dtype& d) {
  using code = nb::dlpack::dtype_code;
  if (d.lanes != 1) return DType::Other;
  if (d.code == uint8_t(code::Float) && d.bits == 32) return DType::F32;
  if (d.code == uint8_t(code::Bfloat) && d.bits == 16) return DType::BF16;
  if (d.code == uint8_t(code::UInt) && d.bits == 8) return DType::U8;
  if (d.code == uint8_t(code::Int) && d.bits == 32) return DType::I32;
  return DType::Other;
}

TensorView view(const nb::ndarray<>& a, const char* what) {
  if (a.device_type() != nb::device::cpu::value)
    throw std::invalid_argument(std::string(what) + " must be a CPU tensor");
  if (a.ndim() > 4) throw std::invalid_argument(std::string(what) + " has too many dimensions");
  TensorView v;
  v.data = a.data();
  v.dtype = dtype_of(a.dtype());
  v.ndim = int(a.ndim());
  int64_t expect = 1;  // C-contiguous strides, in elements; size-1 dims may have any stride
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = int64_t(a.shape(size_t(i)));
    if (v.shape[i] != 1 && a.stride(size_t(i)) != expect)
      throw std::invalid_argument(std::string(what) + " must be contiguous (call .contiguous())");
    expect *= v.shape[i];
  }
  return v;
}

nb::dict block_sizes() {
  nb::dict d;
  for (int i = 0; i < kFormatCount; ++i) {
    const FormatInfo f = format_info(format_at(i));
    d[f.name] = nb::make_tuple(f.block_elems, f.block_bytes);
  }
  return d;
}

nb::dict formats() {
  nb::dict d;
  for (int i = 0; i < kFormatCount; ++i) {
    const FormatInfo f = format_info(format_at(i));
    nb::dict e;
    e["block_elems"] = f.block_elems;
    e["block_bytes"] = f.block_bytes;
    e["row_header"] = f.row_header;
    e["online"] = f.online;
    d[f.name] = e;
  }
  return d;
}

nb::dict isa_info() {
  const IsaReport r = isa_report();
  nb::dict d;
  d["cpu"] = r.cpu;
  d["built"] = r.built;
  return d;
}

nb::dict layer_info(const MoeEngine& eng, int i) {
  const Layer& L = eng.layer(i);
  nb::dict d;
  d["experts"] = L.E;
  d["hidden"] = L.H;
  d["intermediate"] = L.I;
  d["formats"] = nb::make_tuple(format_info(L.fmt[0]).name, format_info(L.fmt[1]).name, format_info(L.fmt[2]).name);
  d["bytes"] = L.bytes();
  nb::list slices;
  for (const NodeSlice& s : L.nodes) slices.append(nb::make_tuple(s.i0, s.i1));
  d["slices"] = slices;
  return d;
}

}  // namespace
}  // namespace tandem

NB_MODULE(_C, m) {
  using namespace tandem;
  m.doc() = "tandem's CPU expert engine (see csrc/moe.h). Use it through tandem.ops.cpu.";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const DTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def("block_sizes", &block_sizes, "Format name -> (weights per block, bytes per block).");
  m.def("formats", &formats, "Format name -> its row layout and whether it is quantized at load.");
  m.def("isa_info", &isa_info, "ISA levels this CPU supports and this build has kernels for.");

  nb::class_<MoeEngine>(m, "Engine")
      .def(
          "__init__",
          [](MoeEngine* self, const std::vector<std::vector<int>>& node_cpus, const std::vector<int>& threads_per_node,
             int spin_us) {
            const KernelTable& kt = select_kernels(std::getenv("TANDEM_ISA"));
            new (self) MoeEngine(node_cpus, threads_per_node, spin_us, kt);
          },
          "node_cpus"_a, "threads_per_node"_a, "spin_us"_a = 1000)
      .def(
          "add_layer",
          [](MoeEngine& e, const std::string& gate_fmt, const nb::ndarray<>& gate, const std::string& up_fmt,
             const nb::ndarray<>& up, const std::string& down_fmt, const nb::ndarray<>& down) {
            const WeightSource g{parse_format(gate_fmt), view(gate, "gate")};
            const WeightSource u{parse_format(up_fmt), view(up, "up")};
            const WeightSource d{parse_format(down_fmt), view(down, "down")};
            nb::gil_scoped_release release;
            return e.add_layer(g, u, d);
          },
          "gate_fmt"_a, "gate"_a, "up_fmt"_a, "up"_a, "down_fmt"_a, "down"_a)
      .def(
          "submit",
          [](MoeEngine& e, int layer, const nb::ndarray<>& x, const nb::ndarray<>& ids, const nb::ndarray<>& w,
             const nb::ndarray<>& out) {
            const TensorView xv = view(x, "x"), iv = view(ids, "ids"), wv = view(w, "w"), ov = view(out, "out");
            nb::gil_scoped_release release;
            return e.submit(layer, xv, iv, wv, ov);
          },
          "layer"_a, "x"_a, "ids"_a, "w"_a, "out"_a)
      .def(
          "wait",
          [](MoeEngine& e, uint64_t ticket) {
            nb::gil_scoped_release release;
            e.wait(ticket);
          },
          "ticket"_a)
      .def("completed", &MoeEngine::completed, "The ticket of the last finished job.")
      .def("layer_info", &layer_info, "layer"_a)
      .def_prop_ro("n_layers", &MoeEngine::n_layers)
      .def_prop_ro("isa", [](const MoeEngine& e) { return std::string(e.kernels().isa); })
      .def_prop_ro("threads_per_node", &MoeEngine::threads_per_node)
      .def_prop_ro("pinned", &MoeEngine::pinned);
}
