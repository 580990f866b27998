// One engine call that a CUDA stream runs as two host functions (cudaLaunchHostFunc /
// cuLaunchHostFunc): submit when the stream reaches it, wait later in stream order. This keeps a
// whole decode step -- GPU kernels, copies to pinned buffers, CPU expert calls -- in one stream,
// so it can be captured in one CUDA graph. The buffers are fixed when the call is made (one call
// per layer and token count); the stream's copies fill them before submit runs.
// No CUDA headers: the functions have the plain `void(void*)` signature both APIs take.
#pragma once

#include <cstdint>
#include <string>

#include "moe.h"

namespace tandem {

struct HostCall {
  MoeEngine* engine = nullptr;
  int layer = 0;
  TensorView x, ids, w, out;
  uint64_t ticket = 0;  // of the submitted job; 0 when the last submit failed
  uint64_t calls = 0;   // submits run (for tests: proves the stream ran them)
  std::string error;    // the last failure: a host function cannot throw into CUDA
  // steady_clock ns of the last submit, and of entering / leaving the last wait: shows whether the
  // CPU work overlapped the GPU work queued between them (tests, profiles).
  int64_t t_submit = 0, t_wait_begin = 0, t_wait_end = 0;
  // The engine's side of the same job: its launch (after staging) and its end (last worker done).
  int64_t t_launch = 0, t_done = 0;
};

// What the stream calls; `ctx` is the HostCall.
void host_submit(void* ctx);
void host_wait(void* ctx);

// The one opaque thing that crosses into Python (in a capsule): the two functions and their context.
struct HostFns {
  void (*submit)(void*);
  void (*wait)(void*);
  void* ctx;
};

}  // namespace tandem
