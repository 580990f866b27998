// One engine call that a CUDA stream runs as two host functions (cudaLaunchHostFunc /
// cuLaunchHostFunc): submit when the stream reaches it, wait later in stream order. This keeps a
// whole decode step -- GPU kernels, copies to pinned buffers, CPU expert calls -- in one stream,
// so it can be captured in one CUDA graph. The buffers are fixed when the call is made (one call
// per layer and token count); the stream's copies fill them before submit runs.
// No CUDA headers: the functions have the plain `void(void*)` signature both APIs take.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

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

// Submit, wait for the job as a stream's doorbell does (spin for 1 ms, then poll every 20 us;
// never on the engine's condition variable, whose wake-up of tens of us a stream does not pay),
// then host_wait: the doorbell's sequence, on the caller's thread. The caller joins the job as
// one more worker (MoeEngine::submit's join) before it waits; TANDEM_JOIN=0 leaves it waiting.
void host_run(void* ctx);

// The one opaque thing that crosses into Python (in a capsule): the two functions and their context.
struct HostFns {
  void (*submit)(void*);
  void (*wait)(void*);
  void* ctx;
};

// A dispatcher thread that runs HostCalls when a GPU stream rings for them, so the stream never
// blocks on a host function. Two 32-bit words in pinned, device-mapped memory (64 bytes apart):
//   the stream:  done = 0; copies into call v's buffers; ring = v      (cuStreamWriteValue32)
//                ... other GPU work (the shared experts) ...
//                wait until done == v (cuStreamWaitValue32); copy v's out back
//   this thread: sees ring == v, sets ring = 0, submits call v, spins until the engine finished
//                it, sets done = v (release: out is written before done).
// The stream clears `done` before ringing, so a result left unread by an aborted step can never
// satisfy a later wait. Calls are numbered 1.. by add(). While idle the thread spins for spin_us,
// then naps 20 us at a time (the first ring after a pause waits up to one nap), after a second
// 1 ms at a time.
class Doorbell {
 public:
  Doorbell(uint32_t* ring, uint32_t* done, int spin_us);
  ~Doorbell();
  Doorbell(const Doorbell&) = delete;
  Doorbell& operator=(const Doorbell&) = delete;

  uint32_t add(HostCall* call);  // the call's number v >= 1; the call must outlive this Doorbell
  uint64_t rings() const { return rings_.load(std::memory_order_acquire); }        // calls run
  uint64_t unknown() const { return unknown_.load(std::memory_order_acquire); }    // bad numbers rung

 private:
  void loop();

  uint32_t* ring_;
  uint32_t* done_;
  int spin_us_;
  std::mutex mu_;  // guards calls_ (add runs on Python's thread while the loop reads)
  std::vector<HostCall*> calls_;
  std::atomic<uint64_t> rings_{0}, unknown_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace tandem
