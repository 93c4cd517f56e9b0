// Exit guard: our background threads are out of the token and OpenSSL
// before exit() tears those down.
//
// exit() runs atexit handlers and static destructors in the reverse order
// of their registration. OpenSSL (OPENSSL_cleanup) and the PKCS#11 module
// (SoftHSM's singletons) register theirs when first used; a re-armer or
// maintenance thread still inside a token call then meets freed state (seen:
// SEGV in pthread_rwlock_wrlock as a fuzzer exited). The guard's handler is
// registered by the first background activity, which comes after the
// module and OpenSSL are initialised, so it runs before their teardown: it
// closes the gate to new activities and waits for running ones to end.
//
// The wait is bounded (kExitWait): a token call that never returns must
// not hang the process's exit. Handshake threads are the host's to stop.
//
// Thread-safety: all functions are thread-safe and fork-safe (a child
// starts with no activity: the parent's threads are not there).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace hsmstek::exit_guard {

inline constexpr std::chrono::seconds kExitWait{5};

// Activity brackets one unit of background work that may call the token
// or OpenSSL. ok() is false once the process is exiting: skip the work and
// end the thread's loop.
class Activity {
 public:
  Activity();
  ~Activity();
  Activity(const Activity &) = delete;
  Activity &operator=(const Activity &) = delete;

  bool ok() const { return entered_; }

 private:
  bool entered_;
  uint64_t forks_ = 0;  // the fork it was entered in
};

// Exiting is true once the exit handler ran (the gate is closed for good).
bool Exiting();

// ActiveCount is the number of activities running now (for tests).
size_t ActiveCount();

}  // namespace hsmstek::exit_guard
