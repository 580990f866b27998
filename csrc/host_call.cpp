#include "host_call.h"

#include <chrono>
#include <exception>

namespace tandem {
namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

void host_submit(void* ctx) {
  auto* c = static_cast<HostCall*>(ctx);
  ++c->calls;
  c->t_submit = now_ns();
  try {
    c->ticket = c->engine->submit(c->layer, c->x, c->ids, c->w, c->out);
  } catch (const std::exception& e) {
    c->ticket = 0;  // the output keeps its old contents; Python reads `error` and reports it
    c->error = e.what();
  }
}

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

}  // namespace tandem
