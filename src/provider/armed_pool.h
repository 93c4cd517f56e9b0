// ArmedPool: token sessions whose next operation is already initialised
// ("armed"), kept ready by background threads so that the handshake thread
// pays one round trip per token step instead of two (docs/DESIGN.md,
// "Pre-armed operations").
//
// Three kinds, all on the current epoch's keys only (SetCurrent):
// - encrypt: C_EncryptInit(CKM_AES_CBC_PAD) with an IV drawn in advance; the
//   ticket callback hands that IV to libssl and the cipher runs C_Encrypt;
// - sign: C_SignInit(CKM_SHA256_HMAC); the MAC runs C_Sign (seal and open);
// - decrypt: C_DecryptInit(CKM_AES_ECB), a multi-part operation that stays
//   active: each open runs one C_DecryptUpdate over the (public) ciphertext
//   blocks and the CBC chaining is done in memory, so the session goes back
//   armed and needs no re-arming.
// An armed operation is used at most once (encrypt and sign), so an IV is
// never reused. Operations for another key or token generation are never
// handed out and are cancelled (their session closed) by the re-armer; in
// a forked child the parent's are forgotten unused. The number of sessions
// is bounded by the depths plus the re-armer threads.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "pkcs11/ck.h"
#include "pkcs11/token.h"

namespace hsmstek::provider {

enum class ArmedKind : uint8_t { kEncrypt = 0, kSign = 1, kDecryptEcb = 2 };
inline constexpr size_t kArmedKinds = 3;

// One session with an initialised operation. Destroying it cancels the
// operation (the session is closed) unless MarkClean() said the operation
// ended (a successful single-part call), in which case the session returns
// to the token's pool. Movable, not copyable.
class ArmedOp {
 public:
  ArmedOp() = default;
  ArmedOp(p11::Session session, ArmedKind kind, CK_OBJECT_HANDLE key,
          uint64_t generation, const std::array<uint8_t, 16> &iv)
      : session_(std::move(session)),
        kind_(kind),
        key_(key),
        generation_(generation),
        iv_(iv) {}
  ~ArmedOp() { Cancel(); }
  ArmedOp(ArmedOp &&other) noexcept = default;
  ArmedOp &operator=(ArmedOp &&other) noexcept {
    if (this != &other) {
      Cancel();
      session_ = std::move(other.session_);
      kind_ = other.kind_;
      key_ = other.key_;
      generation_ = other.generation_;
      iv_ = other.iv_;
      clean_ = other.clean_;
    }
    return *this;
  }
  ArmedOp(const ArmedOp &) = delete;
  ArmedOp &operator=(const ArmedOp &) = delete;

  explicit operator bool() const { return session_.token() != nullptr; }
  p11::Session &session() { return session_; }
  ArmedKind kind() const { return kind_; }
  CK_OBJECT_HANDLE key() const { return key_; }
  uint64_t generation() const { return generation_; }
  // The IV the encrypt operation was initialised with (public: it travels
  // in the ticket).
  const std::array<uint8_t, 16> &iv() const { return iv_; }
  // The operation ended in the token (C_Encrypt / C_Sign returned OK).
  void MarkClean() { clean_ = true; }

 private:
  void Cancel() {
    if (session_.token() != nullptr && !clean_) session_.Discard();
  }

  p11::Session session_;
  ArmedKind kind_ = ArmedKind::kEncrypt;
  CK_OBJECT_HANDLE key_ = CK_INVALID_HANDLE;
  uint64_t generation_ = 0;
  std::array<uint8_t, 16> iv_{};
  bool clean_ = false;
};

struct ArmedPoolOptions {
  // Armed operations kept ready per kind. A TLS 1.3 full handshake takes
  // two encrypt and two sign, a renewing resumption one decrypt, one
  // encrypt and two sign.
  std::array<size_t, kArmedKinds> depth{6, 8, 2};
  // Background threads re-arming in parallel: with a network token every
  // *Init is a round trip, and one thread re-arms at most 1/latency per
  // second.
  size_t threads = 2;
};

struct ArmedCounters {
  std::array<uint64_t, kArmedKinds> hits{}, misses{}, armed{}, failed{};
  uint64_t cancelled = 0;  // drained: stale key, generation or shutdown
};

class ArmedPool {
 public:
  explicit ArmedPool(std::shared_ptr<p11::Token> token,
                     ArmedPoolOptions options = {});
  ~ArmedPool();
  ArmedPool(const ArmedPool &) = delete;
  ArmedPool &operator=(const ArmedPool &) = delete;

  // SetCurrent names the current epoch's keys (token generation
  // `generation`); operations on other keys are drained. Starts the
  // re-armer threads on first use (and again in a forked child). Cheap when
  // nothing changed: called for every ticket.
  void SetCurrent(CK_OBJECT_HANDLE aes, CK_OBJECT_HANDLE hmac,
                  uint64_t generation);

  // Take returns an armed operation of `kind` on `key` of `generation`, or
  // nullopt (the caller initialises on demand). Never calls the token.
  std::optional<ArmedOp> Take(ArmedKind kind, CK_OBJECT_HANDLE key,
                              uint64_t generation);

  // Return gives back a decrypt operation that is still armed (after a
  // successful C_DecryptUpdate). Never calls the token: a stale one is
  // cancelled later by the re-armer. Lost says a taken decrypt operation
  // failed and was cancelled instead. Each decrypt Take is followed by
  // exactly one of them: decrypt operations out count towards the depth,
  // so the re-armer does not arm one that would be surplus on return.
  void Return(ArmedOp op);
  void Lost(ArmedKind kind);

  ArmedCounters Snapshot() const;

  // WaitUntilArmed blocks until every kind holds its full depth of armed
  // operations for the current keys, or `timeout` passed (false). For
  // tests and benchmarks that count round trips in a steady state.
  bool WaitUntilArmed(std::chrono::milliseconds timeout);

 private:
  struct Task {
    ArmedKind kind;
    CK_OBJECT_HANDLE key;
    uint64_t generation;
  };
  void ResetAfterForkLocked();
  void StartThreadsLocked();
  void RearmLoop();
  std::optional<Task> NextTaskLocked(std::vector<ArmedOp> *stale);
  void Arm(const Task &task);
  bool IsCurrentLocked(ArmedKind kind, CK_OBJECT_HANDLE key,
                       uint64_t generation) const;

  const std::shared_ptr<p11::Token> token_;
  const ArmedPoolOptions options_;

  // Guarded by the process-wide pool mutex (armed_pool.cc), which fork
  // handlers hold across fork() so a child never inherits it locked.
  bool has_target_ = false;
  CK_OBJECT_HANDLE aes_ = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE hmac_ = CK_INVALID_HANDLE;
  uint64_t generation_ = 0;
  std::array<std::deque<ArmedOp>, kArmedKinds> ready_;
  std::vector<ArmedOp> excess_;  // returned beyond the depth: to cancel
  std::array<size_t, kArmedKinds> pending_{};
  std::array<size_t, kArmedKinds> out_{};  // decrypt: taken, not back yet
  std::array<std::chrono::steady_clock::time_point, kArmedKinds> retry_at_{};
  std::array<std::chrono::milliseconds, kArmedKinds> backoff_{};
  bool stop_ = false;
  bool drain_ = false;  // the target changed: stale operations to cancel
  uint64_t fork_count_ = 0;
  // Leaked in a forked child (no thread behind them there), like the
  // condition variable, which may count waiters that do not exist.
  std::vector<std::thread *> threads_;
  std::condition_variable *cv_;
  ArmedCounters counters_;
};

}  // namespace hsmstek::provider
