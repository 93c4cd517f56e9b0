// Exit guard: our background threads are out of the token and OpenSSL
// before exit() tears those down.
//
// exit() runs atexit handlers and static destructors in the reverse order
// of their registration. OpenSSL (OPENSSL_cleanup) and the PKCS#11 module
// (SoftHSM's singletons) register theirs when first used; a re-armer or
// maintenance thread still inside a token call then meets freed state (seen:
// SEGV in pthread_rwlock_wrlock as a fuzzer exited). The guard's handler is
// registered again after every module's C_Initialize (RegisterAfterInit),
// so it runs before the teardown of every library we call: it closes the
// gate to new activities, makes new token sessions fail (Exiting), and
// waits for running activities to end.
//
// The wait is bounded (kExitWait): a token call that never returns must
// not hang the process's exit. Handshake threads are the host's to stop.
//
// Thread-safety: all functions are thread-safe. Init must run outside any
// lock a fork handler takes (the first call registers pthread_atfork); the
// constructors of the objects that own background threads call it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace hsmstek::exit_guard {

inline constexpr std::chrono::seconds kExitWait{5};

// Init prepares the guard (idempotent; never throws).
void Init() noexcept;

// RegisterAfterInit (re-)registers the exit handler; call it after a
// library we call registered its own teardown (a module's C_Initialize).
void RegisterAfterInit() noexcept;

// Activity brackets one unit of background work that may call the token
// or OpenSSL. ok() is false once the process is exiting: skip the work and
// park the thread until its owner stops it (ending it there would run its
// thread-exit handlers after OpenSSL's cleanup).
class Activity {
 public:
  Activity() noexcept;
  ~Activity();
  Activity(const Activity &) = delete;
  Activity &operator=(const Activity &) = delete;

  bool ok() const { return entered_; }

 private:
  bool entered_;
  uint64_t forks_ = 0;  // the fork it was entered in
};

// Exiting is true once the exit handler ran (for good). Lock-free: the
// token layer checks it before opening a session.
bool Exiting() noexcept;

// ActiveCount is the number of activities running now (for tests).
size_t ActiveCount();

}  // namespace hsmstek::exit_guard
