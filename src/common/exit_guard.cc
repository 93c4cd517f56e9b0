#include "common/exit_guard.h"

#include <pthread.h>
#include <stdlib.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace hsmstek::exit_guard {
namespace {

// Leaked, with its lock and condition variable: used by the exit handler
// and replaced (not destroyed) in a forked child, where the old lock may be
// held by a thread that does not exist.
struct State {
  std::mutex *mu = new std::mutex;
  std::condition_variable *cv = new std::condition_variable;
  size_t active = 0;
  bool exiting = false;
  uint64_t forks = 0;  // bumped in each forked child
};

// Activities of this thread (a module's callback or a log sink may call
// exit() from inside one: the handler must not wait for itself).
thread_local size_t t_active = 0;

void ResetInChild();

State &GetState() {
  static State *state = [] {
    auto *s = new State;
    pthread_atfork(nullptr, nullptr, ResetInChild);
    return s;
  }();
  return *state;
}

void ResetInChild() {
  State &s = GetState();
  s.mu = new std::mutex;
  s.cv = new std::condition_variable;
  s.active = 0;
  ++s.forks;
  t_active = 0;
}

void OnExit() {
  State &s = GetState();
  std::unique_lock<std::mutex> lock(*s.mu);
  s.exiting = true;
  const size_t self = t_active;
  s.cv->wait_for(lock, kExitWait, [&s, self] { return s.active <= self; });
}

void RegisterExitHandlerOnce() {
  // Registered by the first activity, after the token module and OpenSSL
  // registered their teardown: handlers run last-registered first.
  static const bool registered = atexit(OnExit) == 0;
  (void)registered;
}

}  // namespace

Activity::Activity() : entered_(false) {
  RegisterExitHandlerOnce();
  State &s = GetState();
  std::lock_guard<std::mutex> lock(*s.mu);
  if (s.exiting) return;
  ++s.active;
  ++t_active;
  entered_ = true;
  forks_ = s.forks;
}

Activity::~Activity() {
  if (!entered_) return;
  State &s = GetState();
  std::lock_guard<std::mutex> lock(*s.mu);
  // Entered before a fork this thread made: the child's count never
  // included it.
  if (forks_ != s.forks) return;
  --t_active;
  --s.active;
  if (s.exiting) s.cv->notify_all();
}

bool Exiting() {
  State &s = GetState();
  std::lock_guard<std::mutex> lock(*s.mu);
  return s.exiting;
}

size_t ActiveCount() {
  State &s = GetState();
  std::lock_guard<std::mutex> lock(*s.mu);
  return s.active;
}

}  // namespace hsmstek::exit_guard
