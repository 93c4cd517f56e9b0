#include "common/exit_guard.h"

#include <pthread.h>
#include <stdlib.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>

namespace hsmstek::exit_guard {
namespace {

// Static storage (nothing to allocate, so nothing to fail); never
// destroyed, since the exit handler and late destructors use it. A forked
// child gets fresh ones in place: the parent's may be held by a thread
// that does not exist in the child.
alignas(std::mutex) unsigned char g_mu_storage[sizeof(std::mutex)];
alignas(std::condition_variable) unsigned char g_cv_storage[sizeof(
    std::condition_variable)];
std::mutex &Mu() { return *reinterpret_cast<std::mutex *>(g_mu_storage); }
std::condition_variable &Cv() {
  return *reinterpret_cast<std::condition_variable *>(g_cv_storage);
}
size_t g_active = 0;   // guarded by Mu()
uint64_t g_forks = 0;  // guarded by Mu(); bumped in each child
std::atomic<bool> g_exiting{false};
// Activities of this thread (a module's callback or a log sink may call
// exit() from inside one: the handler must not wait for itself).
thread_local size_t t_active = 0;

void ResetInChild() {
  new (g_mu_storage) std::mutex;
  new (g_cv_storage) std::condition_variable;
  g_active = 0;
  ++g_forks;
  t_active = 0;
}

void OnExit() {
  std::unique_lock<std::mutex> lock(Mu());
  g_exiting.store(true);
  const size_t self = t_active;
  Cv().wait_for(lock, kExitWait, [self] { return g_active <= self; });
}

}  // namespace

void Init() noexcept {
  static const bool initialised = [] {
    new (g_mu_storage) std::mutex;
    new (g_cv_storage) std::condition_variable;
    pthread_atfork(nullptr, nullptr, ResetInChild);
    atexit(OnExit);
    return true;
  }();
  (void)initialised;
}

void RegisterAfterInit() noexcept {
  Init();
  // Runs again at exit (idempotent): last registered, first run.
  atexit(OnExit);
}

Activity::Activity() noexcept : entered_(false) {
  Init();
  std::lock_guard<std::mutex> lock(Mu());
  if (g_exiting.load()) return;
  ++g_active;
  ++t_active;
  entered_ = true;
  forks_ = g_forks;
}

Activity::~Activity() {
  if (!entered_) return;
  std::lock_guard<std::mutex> lock(Mu());
  // Entered before a fork this thread made: the child's count never
  // included it.
  if (forks_ != g_forks) return;
  --t_active;
  --g_active;
  if (g_exiting.load()) Cv().notify_all();
}

bool Exiting() noexcept { return g_exiting.load(std::memory_order_relaxed); }

size_t ActiveCount() {
  Init();
  std::lock_guard<std::mutex> lock(Mu());
  return g_active;
}

}  // namespace hsmstek::exit_guard
