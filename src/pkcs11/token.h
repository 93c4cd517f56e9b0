// Token: one PKCS#11 token reached through a URI, with its login, its pool of
// sessions, a long-lived session that owns session objects, and recovery.
//
// States: kDisconnected -> (Connect ok) kConnected -> (connection fault)
// kDisconnected; a failed Connect enters kBackoff until the back-off delay
// has passed. After a fault the next Acquire reconnects once (most faults
// are a lost session); once a connect failed, reconnecting is the job of a
// background prober (prober.h), never of a handshake: Acquire fails fast
// until the prober has reconnected, at most ~1 s after the token answers.
// Every (re)connect, and every fork, starts a new generation:
// object handles and sessions of an older generation are never used again.
//
// Thread-safety: all methods are thread-safe. A Session is used by one thread
// at a time (it is leased from the pool, never shared).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/bytes.h"
#include "common/fork_registry.h"
#include "common/status.h"
#include "pkcs11/ck.h"
#include "pkcs11/error.h"
#include "pkcs11/module.h"
#include "pkcs11/prober.h"
#include "pkcs11/uri.h"

namespace hsmstek::p11 {

class Token;

struct TokenOptions {
  // Open read/write sessions (needed to create or destroy token objects).
  bool read_write = false;
  // Mechanisms the token must offer; Connect fails naming the missing ones.
  std::vector<CK_MECHANISM_TYPE> required_mechanisms;
  // Back-off between failed connects: doubles from initial up to max. The
  // max bounds how long after a token answers again it is used again
  // (750 ms: with the reconnect and reload, within a second).
  std::chrono::milliseconds backoff_initial{200};
  std::chrono::milliseconds backoff_max{750};
  // Reconnect after a fault on a background thread (prober.h) instead of
  // on the next Acquire. Off: Acquire reconnects once the back-off passed
  // (tests whose recovery is driven by handshakes alone).
  bool background_probe = true;
  // Idle sessions kept in the pool; more are closed on release.
  size_t max_idle_sessions = 16;
  // Who logs in: CKU_USER (servers, most CLI commands) or CKU_SO (installing
  // a trusted wrapping key).
  CK_USER_TYPE login_as = CKU_USER;
  // When set, supplies the PIN instead of the URI / HSMSTEK_PIN (the CLI's
  // interactive prompt, or the SO PIN). Called at each login.
  std::function<Result<SecretBuffer>()> pin_provider;
};

enum class TokenState : uint8_t { kDisconnected, kConnected, kBackoff };

// What a token's health looks like from this process (Token::Health).
struct TokenHealth {
  bool up = false;                // connected now
  std::string last_error;         // the last fault or failed connect ("")
  int64_t since_success_ms = -1;  // since the last good lease (-1: never)
  uint64_t faults = 0;            // connection faults seen
  uint64_t probes = 0;            // background reconnect attempts
};

// A pooled session leased to one user. Returned to the pool on destruction
// unless it saw a fault or was discarded. Movable, not copyable.
class Session {
 public:
  Session() = default;
  ~Session();
  Session(Session &&other) noexcept;
  Session &operator=(Session &&other) noexcept;
  Session(const Session &) = delete;
  Session &operator=(const Session &) = delete;

  CK_SESSION_HANDLE handle() const { return handle_; }
  // The functions of the module this session was opened on (fixed for the
  // session's life, even if the token later reconnects through another).
  CK_FUNCTION_LIST *fn() const { return fn_; }
  uint64_t generation() const { return generation_; }
  Token *token() const { return token_; }

  // The single checkpoint for every C_* result on this session: OK for
  // CKR_OK; otherwise logs, returns CkError(function, rv), and on a
  // connection fault tells the token to reconnect and marks this session
  // dead. Use through P11_CALL below.
  [[nodiscard]] Status Check(const char *function, CK_RV rv);

  // Closes the session instead of returning it to the pool (e.g. after an
  // operation was abandoned half-way).
  void Discard() { discard_ = true; }

 private:
  friend class Token;
  Session(Token *token, CK_FUNCTION_LIST *fn, CK_SESSION_HANDLE h, uint64_t gen)
      : token_(token), fn_(fn), handle_(h), generation_(gen) {}
  void Release();

  Token *token_ = nullptr;
  CK_FUNCTION_LIST *fn_ = nullptr;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
  uint64_t generation_ = 0;
  bool discard_ = false;
};

// Calls session.fn()->Func(args...) and checks the result through the one
// wrapper, naming the function. No hidden control flow: yields a Status.
#define P11_CALL(session, Func, ...) \
  (session).Check(#Func, (session).fn()->Func(__VA_ARGS__))

class Token final : public std::enable_shared_from_this<Token>,
                    public atfork::Participant {
 public:
  // Resolves the module named by `uri` (module-path, module-name, or all of
  // p11-kit's). Fails at once on a bad module; does not touch the token:
  // slot lookup and login happen in Connect (or lazily on first Acquire).
  static Result<std::shared_ptr<Token>> Create(const TokenUri &uri,
                                               TokenOptions options);

  // Connects now: finds exactly one matching token (errors list the tokens
  // seen), opens the long-lived session, logs in (PIN read now and wiped),
  // checks mechanisms. No-op if connected. Ignores back-off.
  [[nodiscard]] Status Connect();

  // Leases a logged-in session, connecting first if needed. While in
  // back-off returns kUnavailable without touching the token.
  [[nodiscard]] Result<Session> Acquire();

  // Runs `fn(session)` holding the long-lived session that owns session
  // objects (derived keys). Serialised by a mutex; only for short calls.
  template <typename Fn>
  Status WithObjectSession(Fn &&fn);

  // The current generation; bumps on each (re)connect and after fork.
  uint64_t generation() const { return generation_.load(); }
  TokenState state() const;
  // The label and serial of the connected token ("" before connect).
  std::string label() const;
  std::string serial() const;
  const TokenUri &uri() const { return uri_; }
  CK_FUNCTION_LIST *fn() const { return module_->functions(); }
  CK_SLOT_ID slot() const;

  // Reports a fault seen with generation `gen`. A connection fault drops
  // every session and invalidates handles (new generation on reconnect).
  void ReportFault(CK_RV rv, uint64_t gen);

  // Closes every session and forgets the login (tests, shutdown).
  void Disconnect();

  // Health as seen by this process; no token round trip.
  TokenHealth Health() const;
  // True from a connection fault or failed connect until the next
  // successful connect (lock-free: asked on every handshake by StoreSet).
  // A token never used in this process (e.g. a forked worker) is not.
  bool failing() const { return failing_.load(std::memory_order_relaxed); }
  // Milliseconds connected since the last (re)connect; 0 when not
  // connected. Lock-free (StoreSet's failback hold-down).
  int64_t connected_for_ms() const;

  // Fork participant: object_mu_ (rank kTokenObject), mu_ (kTokenState) and
  // info_mu_ (kLeaf) are held across fork; the child forgets every session and
  // handle of the parent without closing them and starts a new generation, so
  // its first use reconnects and no cached handle of the parent is used.
  void ForkPrepare(atfork::Rank rank) override;
  void ForkParent(atfork::Rank rank) override;
  void ForkChild(atfork::Rank rank) override;

  ~Token();
  Token(const Token &) = delete;
  Token &operator=(const Token &) = delete;

 private:
  Token(TokenUri uri, TokenOptions options,
        std::vector<std::shared_ptr<Module>> candidates);
  friend class Session;

  Status ConnectLocked();
  void DisconnectLocked(bool close_handles);
  // Forgets the parent's sessions and leases in a forked child.
  void ForgetParentLocked();
  void ReleaseModuleIfIdleLocked();
  bool ForkedSinceConnect() const;
  void ReturnSession(CK_FUNCTION_LIST *fn, CK_SESSION_HANDLE h, uint64_t gen,
                     bool dead);
  Result<CK_SESSION_HANDLE> OpenSessionLocked();
  // Asks the prober for a reconnect at `at` (mu_ held).
  void ScheduleProbeLocked(std::chrono::steady_clock::time_point at);
  // The prober's job: reconnects if due; returns when to try again.
  std::optional<std::chrono::steady_clock::time_point> Probe();

  const TokenUri uri_;
  const TokenOptions options_;
  const std::vector<std::shared_ptr<Module>> candidates_;

  mutable std::mutex mu_;  // guards everything below
  std::shared_ptr<Module> module_;
  // Written under mu_; atomic so that state() needs no lock (the key store
  // asks on every ticket).
  std::atomic<TokenState> state_{TokenState::kDisconnected};
  CK_SLOT_ID slot_ = 0;
  // label_, serial_ and last_error_ are written holding mu_ and info_mu_,
  // read holding either: label(), serial() and Health() take info_mu_
  // only, never waiting behind a connect (which holds mu_).
  mutable std::mutex info_mu_;  // rank kLeaf
  std::string label_;
  std::string serial_;
  CK_SESSION_HANDLE object_session_ = CK_INVALID_HANDLE;
  // The object session a caller of WithObjectSession is using (at most one:
  // object_mu_), and whether a disconnect dropped it meanwhile: then that
  // caller closes it when done (closing under a call crashes SoftHSM).
  CK_SESSION_HANDLE object_session_in_use_ = CK_INVALID_HANDLE;
  bool object_session_retired_ = false;
  std::vector<CK_SESSION_HANDLE> idle_;
  size_t leased_ = 0;
  // The module this token counts as in use (Module::TokenConnected): from
  // connect until disconnected with no session leased, so the module is
  // never re-initialised under a call still in flight.
  std::shared_ptr<Module> held_module_;
  uint64_t connected_fork_count_ = 0;
  std::chrono::steady_clock::time_point retry_at_{};
  std::chrono::milliseconds backoff_{0};
  Status last_connect_error_;
  // Set when the token rejected the PIN: the fingerprint of the PIN source
  // at that time. The same PIN is not sent again until the source changes.
  std::optional<std::string> rejected_pin_source_;
  std::atomic<uint64_t> generation_{0};
  // The first generation of this process (set when a forked child drops the
  // parent's connection): a session of an older one is the parent's, even
  // after the child connected, and is forgotten on return, never closed
  // (its handle may name one of the child's sessions) nor counted.
  uint64_t first_own_generation_ = 0;

  // A reconnect is the prober's job (guarded by mu_): set when a
  // connected token faults or a probe was scheduled, cleared on connect.
  bool probe_pending_ = false;
  // Set (before it takes mu_) while the prober connects: Acquire fails fast
  // instead of waiting for mu_ behind a connect to a token that may not
  // answer.
  std::atomic<bool> probing_{false};
  std::atomic<int64_t> last_success_ms_{-1};  // steady clock, ms
  std::atomic<uint64_t> faults_{0};
  std::atomic<bool> failing_{false};
  std::string last_error_;  // see label_
  // Steady ms of the last successful connect (-1: never).
  std::atomic<int64_t> connected_at_ms_{-1};
  // A fault within kFlapWindow of a reconnect that itself came within
  // kFlapWindow of a fault: the back-off is kept (not reset) and repeated
  // lines are logged once a minute (guarded by mu_).
  bool flapping_ = false;
  int64_t last_fault_ms_ = -1;  // steady ms of the last fault (-1: none)
  int64_t flap_logged_ms_ = 0;

  std::mutex object_mu_;  // serialises use of object_session_
  // Last member: destroyed (its thread joined) before anything it uses.
  std::unique_ptr<Prober> prober_;
};

template <typename Fn>
Status Token::WithObjectSession(Fn &&fn) {
  // Connect (or fail fast in back-off) through an ordinary lease first.
  Result<Session> probe = Acquire();
  if (!probe.ok()) return probe.status();
  std::lock_guard<std::mutex> object_lock(object_mu_);
  CK_SESSION_HANDLE h;
  uint64_t gen;
  CK_FUNCTION_LIST *functions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    h = object_session_;
    gen = generation_.load();
    if (state_ != TokenState::kConnected || h == CK_INVALID_HANDLE) {
      return Unavailable("token disconnected");
    }
    functions = module_->functions();
    object_session_in_use_ = h;
    object_session_retired_ = false;
  }
  Session object_session(this, functions, h, gen);
  Status status = fn(object_session);
  // The object session is owned by the token, never pooled here; closed
  // here only if a disconnect retired it while we were using it.
  object_session.token_ = nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  if (object_session_retired_ && !ForkedSinceConnect()) {
    P11_CLEANUP(functions, C_CloseSession, h);
  }
  object_session_in_use_ = CK_INVALID_HANDLE;
  object_session_retired_ = false;
  return status;
}

}  // namespace hsmstek::p11
