#include "host_call.h"

#include "env.h"

#include <chrono>
#include <exception>
#include <stdexcept>

namespace tandem {
namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Until c's job is done (see host_run).
void await_job(const HostCall& c) {
  using clock = std::chrono::steady_clock;
  // Spin for a decode step's job; a prefill chunk's may take long, so then poll gently (the
  // waiting thread is not one of the engine's workers, which may hold every core).
  const auto poll_from = clock::now() + std::chrono::milliseconds(1);
  for (int n = 1; c.ticket != 0 && c.engine->completed() < c.ticket; ++n) {
    if (n % 256 != 0 || clock::now() < poll_from) cpu_relax();
    else std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

// Submit c's job; join: this thread works on it too (see MoeEngine::submit).
void submit_call(HostCall* c, bool join) {
  ++c->calls;
  c->t_submit = now_ns();
  try {
    // borrow_x: the call's x buffer is written again only by its stream, after waiting for this job
    c->ticket = c->engine->submit(c->layer, c->x, c->ids, c->w, c->out, join, /*borrow_x=*/true);
  } catch (const std::exception& e) {
    c->ticket = 0;  // the output keeps its old contents; Python reads `error` and reports it
    c->error = e.what();
  }
}
}  // namespace

void host_submit(void* ctx) { submit_call(static_cast<HostCall*>(ctx), false); }

void host_wait(void* ctx) {
  auto* c = static_cast<HostCall*>(ctx);
  c->t_wait_begin = now_ns();
  if (c->ticket != 0) {
    try {
      c->engine->wait(c->ticket);
      c->t_launch = c->engine->last_launch_ns();  // this job's: the next one starts after this wait
      c->t_done = c->engine->last_done_ns();
    } catch (const std::exception& e) {
      c->error = e.what();
    }
  }
  c->t_wait_end = now_ns();
}

void host_run(void* ctx) {
  // This thread would only spin on the job: it joins the workers instead (one more core streaming
  // the experts' rows). TANDEM_JOIN=0: it only submits and waits (an A/B switch).
  static const bool join = env_switch_on("TANDEM_JOIN");
  auto* c = static_cast<HostCall*>(ctx);
  submit_call(c, join);
  await_job(*c);
  host_wait(c);  // returns at once: records the job's times (or its error)
}

Doorbell::Doorbell(uint32_t* ring, uint32_t* done, int spin_us) : ring_(ring), done_(done), spin_us_(spin_us) {
  if (ring == nullptr || done == nullptr) throw std::invalid_argument("Doorbell: ring and done must be memory");
  thread_ = std::thread([this] { loop(); });
}

Doorbell::~Doorbell() {
  stop_.store(true);
  thread_.join();
}

uint32_t Doorbell::add(HostCall* call) {
  std::lock_guard<std::mutex> g(mu_);
  calls_.push_back(call);
  return uint32_t(calls_.size());
}

void Doorbell::loop() {
  using clock = std::chrono::steady_clock;
  std::atomic_ref<uint32_t> ring(*ring_), done(*done_);
  auto last = clock::now();
  for (int spins = 0; !stop_.load(std::memory_order_relaxed);) {
    const uint32_t v = ring.load(std::memory_order_acquire);  // the stream's copies landed before it
    if (v == 0) {
      if (++spins % 256 != 0) {
        cpu_relax();
        continue;
      }
      spins = 0;
      const auto idle = clock::now() - last;
      if (idle > std::chrono::seconds(1)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      else if (idle > std::chrono::microseconds(spin_us_)) std::this_thread::sleep_for(std::chrono::microseconds(20));
      continue;
    }
    ring.store(0, std::memory_order_relaxed);
    HostCall* c = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (v <= calls_.size()) c = calls_[v - 1];
    }
    if (c == nullptr) {
      unknown_.fetch_add(1, std::memory_order_release);
    } else {
      host_run(c);
    }
    rings_.fetch_add(1, std::memory_order_release);
    done.store(v, std::memory_order_release);  // even after a failure: the stream must not hang
    last = clock::now();
  }
}

}  // namespace tandem
