// tandem._C: thin, typed bindings. Tensors come in as DLPack/ndarray objects and are turned into
// borrowed TensorViews; the engine is an owned object; no raw pointers reach Python.
// The GIL is released while the engine loads weights, stages a batch, or waits.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdlib>
#include <string>

#include "bench.h"
#include "dispatch.h"
#include "host_call.h"
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
  bool empty = false;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.shape[i] = int64_t(a.shape(size_t(i)));
    empty = empty || v.shape[i] == 0;
  }
  for (int i = v.ndim - 1; i >= 0 && !empty; --i) {  // an empty tensor's strides mean nothing
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

// What the engine's kernel table does with each format (for reports and benchmarks).
nb::dict kernel_info(const MoeEngine& eng) {
  static const char* act_names[kActKinds] = {"F32", "BF16", "Q8_32", "Q8_K", "Q8_ROW", "Q8_64"};
  nb::dict d;
  const KernelTable& kt = eng.kernels();
  for (int i = 0; i < kFormatCount; ++i) {
    const FormatKernels& k = kt.fmt[i];
    nb::dict e;
    e["row_group"] = k.row_group;
    e["act"] = act_names[int(k.act)];
    e["path"] = k.path;
    if (k.big != nullptr) {
      e["big_path"] = k.big_path;
      e["big_act"] = act_names[int(k.big_act)];
      e["big_min"] = k.big_min;
    }
    d[format_info(format_at(i)).name] = e;
  }
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
  d["row_group"] = L.nodes.empty() ? 1 : L.nodes[0].gate.row_group;
  nb::list slices;
  for (const NodeSlice& s : L.nodes) slices.append(nb::make_tuple(s.i0, s.i1));
  d["slices"] = slices;
  return d;
}

const Matrix& slab_of(const MoeEngine& e, int layer, int node, const std::string& proj) {
  const Layer& L = e.layer(layer);
  if (node < 0 || node >= int(L.nodes.size()))
    throw std::invalid_argument("node " + std::to_string(node) + " does not exist; this engine has " +
                                std::to_string(L.nodes.size()) + " node(s)");
  const NodeSlice& s = L.nodes[size_t(node)];
  if (proj == "gate") return s.gate;
  if (proj == "up") return s.up;
  if (proj == "down") return s.down;
  throw std::invalid_argument("proj must be 'gate', 'up' or 'down'; got '" + proj + "'");
}

// A HostCall bound to Python: it keeps the four buffers alive as long as a stream may call it.
struct BoundHostCall {
  HostCall call;
  HostFns fns{&host_submit, &host_wait, nullptr};
  nb::ndarray<> keep[4];

  // A job submitted and never waited for still writes `out`: finish it before the buffers go.
  ~BoundHostCall() {
    if (call.ticket != 0 && call.engine != nullptr) {
      nb::gil_scoped_release release;
      try {
        call.engine->wait(call.ticket);
      } catch (const std::exception&) {  // an unknown ticket: nothing runs for it
      }
    }
  }
};

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
  m.def(
      "stream_read_bandwidth",
      [](size_t bytes, int threads, int rounds, int streams) {
        nb::gil_scoped_release release;
        return stream_read_bandwidth(bytes, threads, rounds, streams);
      },
      "bytes"_a, "threads"_a, "rounds"_a = 5, "streams"_a = 0,
      "GB/s of `threads` pinned threads streaming disjoint slices of a `bytes` buffer (best of rounds;\n"
      "streams per thread: 0 = the best of 1, 2, 4).");
  m.def(
      "amx_peak",
      [](bool bf16, int threads, double seconds) {
        nb::gil_scoped_release release;
        return amx_peak(bf16, threads, seconds);
      },
      "bf16"_a, "threads"_a, "seconds"_a = 0.2,
      "TOP/s (int8) or TFLOP/s (bf16) of tile dot products on registers; raises without AMX.");

  nb::class_<BoundHostCall>(m, "HostCall")
      .def_prop_ro(
          "capsule",
          [](BoundHostCall& b) { return nb::capsule(&b.fns, "tandem.host_fns"); },
          "Valid while this HostCall lives. PyCapsule 'tandem.host_fns' -> struct {submit, wait, ctx}, for cuLaunchHostFunc.")
      .def_prop_ro("error", [](const BoundHostCall& b) { return b.call.error; })
      .def_prop_ro("calls", [](const BoundHostCall& b) { return b.call.calls; })
      .def_prop_ro("times_ns",
                   [](const BoundHostCall& b) {
                     return nb::make_tuple(b.call.t_submit, b.call.t_wait_begin, b.call.t_wait_end);
                   },
                   "steady_clock ns of the last submit, wait entered, wait left.")
      .def_prop_ro("engine_ns",
                   [](const BoundHostCall& b) { return nb::make_tuple(b.call.t_launch, b.call.t_done); },
                   "steady_clock ns of the last job's launch by the engine and of its end.")
      .def("clear_error", [](BoundHostCall& b) { b.call.error.clear(); })
      .def("run_submit", [](BoundHostCall& b) { nb::gil_scoped_release r; host_submit(&b.call); },
           "Run the submit host function here (tests and CPU-only callers).")
      .def("run_wait", [](BoundHostCall& b) { nb::gil_scoped_release r; host_wait(&b.call); })
      .def("run", [](BoundHostCall& b) { nb::gil_scoped_release r; host_run(&b.call); },
           "submit, then wait as a stream's doorbell does (spin, then poll), on this thread");

  nb::class_<Doorbell>(m, "Doorbell")
      .def(
          "__init__",
          [](Doorbell* self, const nb::ndarray<>& mailbox, int spin_us) {
            const TensorView v = view(mailbox, "mailbox");
            if (v.dtype != DType::I32 || v.ndim != 1 || v.shape[0] < 32)
              throw std::invalid_argument("mailbox must be int32 [>= 32] (ring at 0, done at 16); got " + v.shape_str());
            auto* words = static_cast<uint32_t*>(v.data);
            new (self) Doorbell(words, words + 16, spin_us);
          },
          "mailbox"_a, "spin_us"_a = 20000, nb::keep_alive<1, 2>())
      .def("add", [](Doorbell& d, BoundHostCall& b) { return d.add(&b.call); }, "call"_a, nb::keep_alive<1, 2>(),
           "Number the call (1..) for rings; the doorbell keeps it alive.")
      .def_prop_ro("rings", &Doorbell::rings, "Rings answered (calls run).")
      .def_prop_ro("unknown", &Doorbell::unknown, "Rings with a number no call has (answered without running).");

  nb::class_<MoeEngine>(m, "Engine")
      .def(
          "__init__",
          [](MoeEngine* self, const std::vector<std::vector<int>>& node_cpus, const std::vector<int>& threads_per_node,
             int spin_us, const std::string& isa) {
            // An explicit isa wins over TANDEM_ISA (the debugging override); both name a table.
            const KernelTable& kt = isa.empty() ? select_kernels(std::getenv("TANDEM_ISA"), "TANDEM_ISA")
                                                : select_kernels(isa.c_str(), "isa");
            new (self) MoeEngine(node_cpus, threads_per_node, spin_us, kt);
          },
          "node_cpus"_a, "threads_per_node"_a, "spin_us"_a = 1000, "isa"_a = "")
      .def(
          "add_layer",
          [](MoeEngine& e, const std::string& gate_fmt, const nb::ndarray<>& gate, const std::string& up_fmt,
             const nb::ndarray<>& up, const std::string& down_fmt, const nb::ndarray<>& down, bool prequantized) {
            const WeightSource g{parse_format(gate_fmt), view(gate, "gate"), prequantized};
            const WeightSource u{parse_format(up_fmt), view(up, "up"), prequantized};
            const WeightSource d{parse_format(down_fmt), view(down, "down"), prequantized};
            nb::gil_scoped_release release;
            return e.add_layer(g, u, d);
          },
          "gate_fmt"_a, "gate"_a, "up_fmt"_a, "up"_a, "down_fmt"_a, "down"_a, "prequantized"_a = false)
      .def(
          "submit",
          [](MoeEngine& e, int layer, const nb::ndarray<>& x, const nb::ndarray<>& ids, const nb::ndarray<>& w,
             const nb::ndarray<>& out) {
            const TensorView xv = view(x, "x"), iv = view(ids, "ids"), wv = view(w, "w"), ov = view(out, "out");
            uint64_t ticket;
            {
              nb::gil_scoped_release release;
              ticket = e.submit(layer, xv, iv, wv, ov);
            }
            // The job writes `out` after we return: the engine keeps its owner until it is done. The
            // previous owner's job has finished (submit waited for it); it is released here, with the GIL.
            e.swap_out_owner(std::make_shared<nb::ndarray<>>(out));
            return ticket;
          },
          "layer"_a, "x"_a, "ids"_a, "w"_a, "out"_a)
      .def(
          "wait",
          [](MoeEngine& e, uint64_t ticket) {
            nb::gil_scoped_release release;
            e.wait(ticket);
          },
          "ticket"_a)
      .def(
          "host_call",
          [](MoeEngine& e, int layer, const nb::ndarray<>& x, const nb::ndarray<>& ids, const nb::ndarray<>& w,
             const nb::ndarray<>& out) {
            auto* b = new BoundHostCall();
            b->call.engine = &e;
            b->call.layer = layer;
            b->call.x = view(x, "x");
            b->call.ids = view(ids, "ids");
            b->call.w = view(w, "w");
            b->call.out = view(out, "out");
            b->keep[0] = x, b->keep[1] = ids, b->keep[2] = w, b->keep[3] = out;
            b->fns.ctx = &b->call;
            return b;
          },
          "layer"_a, "x"_a, "ids"_a, "w"_a, "out"_a, nb::keep_alive<0, 1>(), nb::rv_policy::take_ownership,
          "A call of `layer` on these fixed buffers that a CUDA stream runs as host functions (see host_call.h).")
      .def("completed", &MoeEngine::completed, "The ticket of the last finished job.")
      .def("last_phases", &MoeEngine::last_phases,
           "ms after launch at which the last job's phases ended (prep x, gate/up, prep h, down, reduce).")
      .def("last_phases_first", &MoeEngine::last_phases_first,
           "ms after launch at which the first worker left each of the last job's phases.")
      .def("last_tasks", &MoeEngine::last_tasks,
           "Tasks each worker of each node took in the last job (node 0's last: a joined caller).")
      .def("layer_info", &layer_info, "layer"_a)
      .def(
          "weight_slab",
          [](MoeEngine& e, int layer, int node, const std::string& proj) {
            const Matrix& m = slab_of(e, layer, node, proj);
            size_t shape[3] = {size_t(m.experts), size_t(m.groups), m.group_bytes};
            return nb::ndarray<nb::numpy, uint8_t, nb::ndim<3>>(m.bytes.data(), 3, shape, nb::handle());
          },
          "layer"_a, "node"_a, "proj"_a, nb::rv_policy::reference_internal,
          "A view of one projection's weights on one node as the kernels hold them: uint8 [E, groups,\n"
          "group_bytes] (rows in groups of row_group, see kernels/tiled.h). Valid while the engine lives.")
      .def(
          "weight_slab_info",
          [](MoeEngine& e, int layer, int node, const std::string& proj) {
            const Matrix& m = slab_of(e, layer, node, proj);
            const NodeSlice& s = e.layer(layer).nodes[size_t(node)];
            nb::dict d;
            d["format"] = format_info(m.fmt).name;
            d["rows"] = m.rows;
            d["cols"] = m.cols;
            d["row_group"] = m.row_group;
            d["groups"] = m.groups;
            d["group_bytes"] = m.group_bytes;
            d["slice"] = nb::make_tuple(s.i0, s.i1);
            return d;
          },
          "layer"_a, "node"_a, "proj"_a, "format, rows, cols, row_group, groups, group_bytes and the node's I slice.")
      .def("kernel_info", &kernel_info, "Format -> the kernels, row group and activation layouts this engine uses.")
      .def_prop_ro("n_layers", &MoeEngine::n_layers)
      .def_prop_ro("isa", [](const MoeEngine& e) { return std::string(e.kernels().isa); })
      .def_prop_ro("threads_per_node", &MoeEngine::threads_per_node)
      .def_prop_ro("pinned", &MoeEngine::pinned)
      .def_prop_rw("prefill_rows", &MoeEngine::prefill_rows, &MoeEngine::set_prefill_rows,
                   "Rows per task for the prefill (`big`) kernels: 0 = automatic (64-256), else a multiple of 64.");
}
