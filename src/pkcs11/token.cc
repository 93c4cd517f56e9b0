#include "pkcs11/token.h"

#include <openssl/err.h>

#include <algorithm>
#include <string>
#include <thread>

#include "common/exit_guard.h"
#include "common/log.h"
#include "pkcs11/object.h"
#include "pkcs11/pin.h"

namespace hsmstek::p11 {

// ---- Session ---------------------------------------------------------------

Session::~Session() { Release(); }

Session::Session(Session &&other) noexcept
    : token_(other.token_),
      fn_(other.fn_),
      handle_(other.handle_),
      generation_(other.generation_),
      discard_(other.discard_) {
  other.token_ = nullptr;
  other.handle_ = CK_INVALID_HANDLE;
}

Session &Session::operator=(Session &&other) noexcept {
  if (this != &other) {
    Release();
    token_ = other.token_;
    fn_ = other.fn_;
    handle_ = other.handle_;
    generation_ = other.generation_;
    discard_ = other.discard_;
    other.token_ = nullptr;
    other.handle_ = CK_INVALID_HANDLE;
  }
  return *this;
}

void Session::Release() {
  if (token_ == nullptr) return;
  token_->ReturnSession(fn_, handle_, generation_, discard_);
  token_ = nullptr;
  handle_ = CK_INVALID_HANDLE;
}

Status Session::Check(const char *function, CK_RV rv) {
  if (rv == CKR_OK) return Status::Ok();
  Status status = CheckRv(function, rv);
  if (IsConnectionFault(rv) && !ObjectVanished(rv)) {
    discard_ = true;
    if (token_ != nullptr) token_->ReportFault(rv, generation_);
  }
  return status;
}

// ---- Token -----------------------------------------------------------------

Token::Token(TokenUri uri, TokenOptions options,
             std::vector<std::shared_ptr<Module>> candidates)
    : uri_(std::move(uri)),
      options_(std::move(options)),
      candidates_(std::move(candidates)) {
  if (options_.background_probe) {
    prober_ = std::make_unique<Prober>([this] { return Probe(); });
  }
  atfork::Register(this);
}

Token::~Token() {
  // First: a probe in flight finishes and no other starts.
  prober_.reset();
  atfork::Unregister(this);
  Disconnect();
}

namespace {

int64_t SteadyMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A probe overdue by this much means the prober is stuck or could not
// start: Acquire then reconnects itself rather than never.
constexpr std::chrono::seconds kProbeStalled{3};
constexpr std::chrono::milliseconds kMinProbeInterval{50};
// A fault this soon after a connect keeps the back-off (a flapping token).
constexpr std::chrono::seconds kFlapWindow{10};

}  // namespace

void Token::ScheduleProbeLocked(std::chrono::steady_clock::time_point at) {
  if (prober_ == nullptr) return;
  probe_pending_ = prober_->Schedule(at);
}

std::optional<std::chrono::steady_clock::time_point> Token::Probe() {
  // Set before taking mu_, cleared on every exit: a handshake that sees it
  // never waits for mu_ behind this connect (Acquire).
  probing_.store(true);
  struct ClearProbing {
    std::atomic<bool> &flag;
    ~ClearProbing() { flag.store(false); }
  } clear_probing{probing_};
  std::lock_guard<std::mutex> lock(mu_);
  if (!probe_pending_) return std::nullopt;
  if (state_ != TokenState::kDisconnected && ForkedSinceConnect()) {
    DisconnectLocked(/*close_handles=*/false);
  }
  if (state_ == TokenState::kConnected) {
    probe_pending_ = false;
    return std::nullopt;
  }
  if (state_ == TokenState::kBackoff &&
      std::chrono::steady_clock::now() < retry_at_) {
    return retry_at_;
  }
  Status status = ConnectLocked();
  if (status.ok()) {
    probe_pending_ = false;
    return std::nullopt;
  }
  return retry_at_;
}

TokenHealth Token::Health() const {
  TokenHealth h;
  h.up = state_.load() == TokenState::kConnected;
  const int64_t last = last_success_ms_.load();
  h.since_success_ms = last < 0 ? -1 : SteadyMs() - last;
  h.faults = faults_.load();
  h.probes = prober_ ? prober_->probes() : 0;
  std::lock_guard<std::mutex> lock(info_mu_);
  h.last_error = last_error_;
  return h;
}

int64_t Token::connected_for_ms() const {
  if (state_.load() != TokenState::kConnected) return 0;
  const int64_t at = connected_at_ms_.load();
  return at < 0 ? 0 : SteadyMs() - at;
}

void Token::ForkPrepare(atfork::Rank rank) {
  if (rank == atfork::Rank::kTokenObject) object_mu_.lock();
  if (rank == atfork::Rank::kTokenState) mu_.lock();
  if (rank == atfork::Rank::kLeaf) info_mu_.lock();
}

void Token::ForkParent(atfork::Rank rank) {
  if (rank == atfork::Rank::kLeaf) info_mu_.unlock();
  if (rank == atfork::Rank::kTokenState) mu_.unlock();
  if (rank == atfork::Rank::kTokenObject) object_mu_.unlock();
}

void Token::ForkChild(atfork::Rank rank) {
  if (rank == atfork::Rank::kLeaf) info_mu_.unlock();
  if (rank == atfork::Rank::kTokenState) {
    // Before anything can read state() or generation(): the store then sees
    // its view and cached handles as stale and reloads, which reconnects.
    if (state_ != TokenState::kDisconnected || !idle_.empty() ||
        object_session_ != CK_INVALID_HANDLE || held_module_) {
      ForgetParentLocked();
    }
    // Always, even with nothing of the parent's held: a failing parent's
    // probe schedule is not the child's (Prober::ForkChild forgets it), so
    // a child keeping failing_ would be skipped by StoreSet and never
    // reconnected. The child starts fresh and connects on first use.
    probe_pending_ = false;
    probing_.store(false);
    failing_.store(false);
    retry_at_ = {};
    backoff_ = std::chrono::milliseconds(0);
    flapping_ = false;
    last_fault_ms_ = -1;
    if (state_ == TokenState::kBackoff) state_ = TokenState::kDisconnected;
    mu_.unlock();
  }
  if (rank == atfork::Rank::kTokenObject) object_mu_.unlock();
}

void Token::ForgetParentLocked() {
  // Nothing of the parent's is ours to close, and its leases belong to
  // threads that do not exist here. The child needs its own C_Initialize
  // before any call (its module starts with no token counted); a new
  // generation makes every handle of the parent stale.
  idle_.clear();
  object_session_ = CK_INVALID_HANDLE;
  object_session_in_use_ = CK_INVALID_HANDLE;
  object_session_retired_ = false;
  leased_ = 0;
  held_module_.reset();
  state_ = TokenState::kDisconnected;
  first_own_generation_ = generation_.fetch_add(1) + 1;
  // The child connects on first use; the parent's prober is not its own.
  probe_pending_ = false;
  failing_.store(false);
}

Result<std::shared_ptr<Token>> Token::Create(const TokenUri &uri,
                                             TokenOptions options) {
  std::vector<std::shared_ptr<Module>> candidates;
  if (uri.module_path) {
    Result<std::shared_ptr<Module>> m = Module::FromPath(*uri.module_path);
    if (!m.ok()) return m.status();
    candidates.push_back(*m);
  } else {
    Result<std::vector<std::shared_ptr<Module>>> ms =
        Module::FromP11Kit(uri.module_name.value_or(""));
    if (!ms.ok()) return ms.status();
    candidates = std::move(*ms);
  }
  return std::shared_ptr<Token>(
      new Token(uri, std::move(options), std::move(candidates)));
}

TokenState Token::state() const { return state_.load(); }

std::string Token::label() const {
  std::lock_guard<std::mutex> lock(info_mu_);
  return label_;
}

std::string Token::serial() const {
  std::lock_guard<std::mutex> lock(info_mu_);
  return serial_;
}

CK_SLOT_ID Token::slot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return slot_;
}

bool Token::ForkedSinceConnect() const {
  return connected_fork_count_ != Module::ForkCount();
}

Status Token::Connect() {
  std::lock_guard<std::mutex> lock(mu_);
  if (ForkedSinceConnect()) DisconnectLocked(/*close_handles=*/false);
  if (state_ == TokenState::kConnected) return Status::Ok();
  return ConnectLocked();
}

namespace {

struct SlotMatch {
  std::shared_ptr<Module> module;
  CK_SLOT_ID slot;
  CK_TOKEN_INFO info;
};

std::string Describe(const CK_TOKEN_INFO &info, CK_SLOT_ID slot) {
  // Built with append: GCC 12 at -O3 (Release) reports a false -Wrestrict
  // on `"literal" + std::string&&` here.
  std::string s = QuoteForMessage(TrimPadded(info.label, sizeof(info.label)));
  s += " (serial ";
  s +=
      QuoteForMessage(TrimPadded(info.serialNumber, sizeof(info.serialNumber)));
  s += ", slot ";
  s += std::to_string(slot);
  s += ")";
  return s;
}

}  // namespace

Status Token::ConnectLocked() {
  // Modules built on OpenSSL (SoftHSM) leave entries on this thread's
  // OpenSSL error queue during C_Initialize and C_Login; a connect that runs
  // inside a handshake must not make the server report them as its own.
  struct ErrorQueueMark {
    ErrorQueueMark() { ERR_set_mark(); }
    ~ErrorQueueMark() { ERR_pop_to_mark(); }
  } error_mark;
  // Every candidate module counts as in use while we connect, so no other
  // token re-initialises one under our calls (our own TryReinitialize
  // allows for this one hold).
  struct ConnectHolds {
    explicit ConnectHolds(const std::vector<std::shared_ptr<Module>> &modules)
        : modules(modules) {
      for (const std::shared_ptr<Module> &m : modules) m->TokenConnected();
    }
    ~ConnectHolds() {
      for (const std::shared_ptr<Module> &m : modules) m->TokenDisconnected();
    }
    const std::vector<std::shared_ptr<Module>> &modules;
  } connect_holds(candidates_);
  // Back-off bookkeeping runs on every exit path below.
  auto fail = [this](Status status) {
    state_ = TokenState::kBackoff;
    backoff_ = backoff_.count() == 0
                   ? options_.backoff_initial
                   : std::min(backoff_ * 2, options_.backoff_max);
    retry_at_ = std::chrono::steady_clock::now() + backoff_;
    // One line per distinct failure: the prober retries every second for
    // as long as the token is out (the store logs the outage itself).
    if (status.message() != last_connect_error_.message()) {
      log::Warning("token " + QuoteForMessage(uri_.text, kMaxQuotedUri) + ": " +
                   status.message());
    }
    last_connect_error_ = status;
    {
      std::lock_guard<std::mutex> info(info_mu_);
      last_error_ = status.message();
    }
    failing_.store(true);
    // Never sooner than kMinProbeInterval: a zero back-off must not spin.
    ScheduleProbeLocked(std::max(
        retry_at_, std::chrono::steady_clock::now() + kMinProbeInterval));
    return status;
  };

  std::vector<SlotMatch> matches;
  std::vector<std::string> seen;
  auto scan = [&]() -> Status {
    matches.clear();
    seen.clear();
    for (const std::shared_ptr<Module> &module : candidates_) {
      Status init = module->EnsureInitialized();
      if (!init.ok()) return init;
      CK_FUNCTION_LIST *f = module->functions();
      CK_ULONG count = 0;
      Status listed =
          P11_CHECK(module->name(), f, C_GetSlotList, CK_TRUE, nullptr, &count);
      if (!listed.ok()) return listed;
      std::vector<CK_SLOT_ID> slots(count);
      listed = P11_CHECK(module->name(), f, C_GetSlotList, CK_TRUE,
                         slots.data(), &count);
      if (!listed.ok()) return listed;
      slots.resize(count);
      for (CK_SLOT_ID slot : slots) {
        CK_TOKEN_INFO info;
        Status read = P11_CHECK(module->name(), f, C_GetTokenInfo, slot, &info);
        if (!read.ok()) continue;  // token went away between the two calls
        if (!(info.flags & CKF_TOKEN_INITIALIZED)) continue;
        seen.push_back(Describe(info, slot));
        if (uri_.MatchesToken(info, slot)) {
          matches.push_back({module, slot, info});
        }
      }
    }
    return Status::Ok();
  };
  Status scanned = scan();
  if (!scanned.ok()) return fail(scanned);
  if (matches.empty()) {
    // SoftHSM reads its token files only in C_Initialize: a token created
    // (or being rewritten by another process, e.g. a sibling nginx worker)
    // at that moment stays invisible until the module is initialised again.
    bool reinitialised = false;
    for (const std::shared_ptr<Module> &module : candidates_) {
      reinitialised = module->TryReinitialize(/*own_holds=*/1) || reinitialised;
    }
    if (reinitialised) {
      scanned = scan();
      if (!scanned.ok()) return fail(scanned);
    }
  }
  auto list_seen = [&seen] {
    if (seen.empty()) return std::string("no initialised tokens are present");
    std::string s = "tokens present: ";
    for (size_t i = 0; i < seen.size(); ++i) {
      if (i > 0) s += ", ";
      s += seen[i];
    }
    return s;
  };
  if (matches.empty()) {
    return fail(NotFound("no token matches " +
                         QuoteForMessage(uri_.text, kMaxQuotedUri) + "; " +
                         list_seen()));
  }
  if (matches.size() > 1) {
    return fail(InvalidArgument("more than one token matches " +
                                QuoteForMessage(uri_.text, kMaxQuotedUri) +
                                "; add token=, serial= or slot-id=; " +
                                list_seen()));
  }

  const SlotMatch &match = matches[0];
  module_ = match.module;
  slot_ = match.slot;
  {
    std::lock_guard<std::mutex> info(info_mu_);
    label_ = TrimPadded(match.info.label, sizeof(match.info.label));
    serial_ =
        TrimPadded(match.info.serialNumber, sizeof(match.info.serialNumber));
  }
  CK_FUNCTION_LIST *f = module_->functions();

  for (CK_MECHANISM_TYPE m : options_.required_mechanisms) {
    CK_MECHANISM_INFO info;
    Status offered = P11_CHECK(QuoteForMessage(label_), f, C_GetMechanismInfo,
                               slot_, m, &info);
    if (offered.ckr() == CKR_MECHANISM_INVALID) {
      return fail(Unsupported("token " + QuoteForMessage(label_) +
                              " lacks mechanism " + MechanismName(m)));
    }
    if (!offered.ok()) return fail(offered);
  }

  CK_SESSION_HANDLE object_session = CK_INVALID_HANDLE;
  CK_FLAGS flags =
      CKF_SERIAL_SESSION | (options_.read_write ? CKF_RW_SESSION : 0);
  Status opened = P11_CHECK(QuoteForMessage(label_), f, C_OpenSession, slot_,
                            flags, nullptr, nullptr, &object_session);
  if (!opened.ok()) return fail(opened);

  // Tokens lock a PIN after a few wrong attempts: never retry a PIN the
  // token rejected until its source (e.g. the PIN file) has changed.
  const bool external_pin = static_cast<bool>(options_.pin_provider);
  const std::string pin_source =
      external_pin ? std::string("provider") : PinSourceFingerprint(uri_);
  if (!external_pin && rejected_pin_source_ == pin_source) {
    P11_CLEANUP(f, C_CloseSession, object_session);
    return fail(PermissionDenied(
        "token " + QuoteForMessage(label_) +
        " rejected the PIN earlier; not trying it again until the PIN "
        "source changes"));
  }
  Result<SecretBuffer> pin =
      external_pin ? options_.pin_provider() : ReadPin(uri_);
  if (!pin.ok()) {
    P11_CLEANUP(f, C_CloseSession, object_session);
    return fail(pin.status().WithContext("token " + QuoteForMessage(label_)));
  }
  Status login = P11_CHECK("token " + QuoteForMessage(label_), f, C_Login,
                           object_session, options_.login_as, pin->data(),
                           static_cast<CK_ULONG>(pin->size()));
  pin->clear();
  const CK_RV rv = login.ckr();
  if (!login.ok() && rv != CKR_USER_ALREADY_LOGGED_IN) {
    P11_CLEANUP(f, C_CloseSession, object_session);
    if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_INVALID ||
        rv == CKR_PIN_LEN_RANGE || rv == CKR_PIN_LOCKED ||
        rv == CKR_PIN_EXPIRED) {
      rejected_pin_source_ = pin_source;
    }
    // SoftHSM answers CKR_GENERAL_ERROR when its token files changed under
    // it (see above): the next attempt starts from a fresh C_Initialize.
    if (rv == CKR_GENERAL_ERROR) module_->TryReinitialize(/*own_holds=*/1);
    return fail(login);
  }
  rejected_pin_source_.reset();

  object_session_ = object_session;
  state_ = TokenState::kConnected;
  if (held_module_ && ForkedSinceConnect()) {
    // Held in the parent: the leases belong to threads that do not exist
    // here, and the child's module counts no token yet.
    held_module_.reset();
    leased_ = 0;
  }
  if (held_module_ != module_) {
    // Only after a token moved to another module with calls still in
    // flight on the old one; rare enough to release the old one now.
    if (held_module_) held_module_->TokenDisconnected();
    module_->TokenConnected();
    held_module_ = module_;
  }
  // backoff_ is kept: reset only once a connection has lasted
  // kFlapWindow (ReportFault), so a token that connects and then fails at
  // once is retried at the growing back-off, not in a loop.
  connected_fork_count_ = Module::ForkCount();
  last_connect_error_ = Status::Ok();
  probe_pending_ = false;
  failing_.store(false);
  last_success_ms_.store(SteadyMs());
  connected_at_ms_.store(SteadyMs());
  generation_.fetch_add(1);
  if (!flapping_) {
    log::Info("connected to token " + QuoteForMessage(label_) + " (slot " +
              std::to_string(slot_) + ")");
  }
  return Status::Ok();
}

Result<CK_SESSION_HANDLE> Token::OpenSessionLocked() {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_FLAGS flags =
      CKF_SERIAL_SESSION | (options_.read_write ? CKF_RW_SESSION : 0);
  Status status = P11_CHECK(QuoteForMessage(label_), fn(), C_OpenSession, slot_,
                            flags, nullptr, nullptr, &h);
  if (!status.ok()) {
    if (IsConnectionFault(status.ckr()))
      DisconnectLocked(/*close_handles=*/true);
    return status;
  }
  return h;
}

Result<Session> Token::Acquire() {
  // The process is exiting: the module may be torn down any moment now, so
  // a background pass in progress stops at its next call and the exit
  // handler's wait covers one call, not a pass (common/exit_guard.h).
  if (exit_guard::Exiting()) return Unavailable("process exiting");
  // A probe holds mu_ while it connects to a token in back-off; a handshake
  // does not wait for it. Right after a fault (kDisconnected) the probe is
  // the reconnect the caller would have made: waiting for it is as fast.
  // probing_ is set before the prober takes mu_, so a handshake never
  // waits behind its connect; other holders of mu_ are short.
  std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
  for (int spins = 0; !lock.try_lock(); ++spins) {
    if (probing_.load()) return Unavailable("token unavailable (reconnecting)");
    if (spins < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  if (state_ != TokenState::kDisconnected && ForkedSinceConnect()) {
    // Nothing opened by the parent is used by the child.
    DisconnectLocked(/*close_handles=*/false);
  }
  const auto now = std::chrono::steady_clock::now();
  // Right after a fault (kDisconnected) one caller reconnects at once, as
  // most faults are a lost session on a healthy token; once a connect has
  // failed (kBackoff) the prober owns reconnecting and callers fail fast.
  if (probe_pending_ && state_ == TokenState::kBackoff &&
      now < retry_at_ + kProbeStalled) {
    // kUnavailable whatever the connect said (e.g. kNotFound for a
    // removed token): the ticket path counts it as token trouble.
    return Unavailable(last_connect_error_.ok()
                           ? std::string("token unavailable (reconnecting)")
                           : "token unavailable (retrying): " +
                                 last_connect_error_.message());
  }
  if (state_ == TokenState::kBackoff) {
    if (now < retry_at_) {
      return Unavailable("token unavailable (retrying): " +
                         last_connect_error_.message());
    }
    state_ = TokenState::kDisconnected;
  }
  if (state_ == TokenState::kDisconnected) {
    Status status = ConnectLocked();
    if (!status.ok()) return status;
  }
  CK_SESSION_HANDLE h;
  if (!idle_.empty()) {
    h = idle_.back();
    idle_.pop_back();
  } else {
    Result<CK_SESSION_HANDLE> opened = OpenSessionLocked();
    if (!opened.ok()) return opened.status();
    h = *opened;
  }
  ++leased_;
  last_success_ms_.store(SteadyMs());
  return Session(this, fn(), h, generation_.load());
}

void Token::ReturnSession(CK_FUNCTION_LIST *functions, CK_SESSION_HANDLE h,
                          uint64_t gen, bool dead) {
  std::lock_guard<std::mutex> lock(mu_);
  // The parent's session outliving a fork in an object of the child (a
  // pre-armed operation): not ours to close, not one of our leases.
  if (gen < first_own_generation_ && !ForkedSinceConnect()) return;
  if (leased_ > 0) --leased_;
  bool current = state_ == TokenState::kConnected &&
                 gen == generation_.load() && !ForkedSinceConnect();
  if (current && !dead && idle_.size() < options_.max_idle_sessions) {
    idle_.push_back(h);
    return;
  }
  // A session of a dead generation (or after fork) may already be gone;
  // closing it is harmless and avoids leaking it on a live token. Closed
  // through the module it was opened on, before the module may be released
  // (and re-initialised by another token).
  if (!ForkedSinceConnect() && functions != nullptr) {
    P11_CLEANUP(functions, C_CloseSession, h);
  }
  ReleaseModuleIfIdleLocked();
}

void Token::ReportFault(CK_RV rv, uint64_t gen) {
  if (!IsConnectionFault(rv)) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (gen != generation_.load() || state_ != TokenState::kConnected) return;
  // Flapping: this connection was a reconnect soon after a fault and it
  // faulted soon again. A single fault (a lost session), even right after
  // the first connect, is retried at once.
  const int64_t now_ms = SteadyMs();
  const int64_t window_ms = kFlapWindow.count() * 1000;
  const int64_t connected_at = connected_at_ms_.load();
  const bool early = now_ms - connected_at < window_ms && last_fault_ms_ >= 0 &&
                     connected_at - last_fault_ms_ < window_ms;
  last_fault_ms_ = now_ms;
  // A token that faults soon after each connect (e.g. it logs in but
  // answers operations with CKR_DEVICE_ERROR) logs once a minute.
  if (!early) {
    flapping_ = false;
  } else if (!flapping_) {
    flapping_ = true;
    flap_logged_ms_ = 0;
  }
  if (!flapping_ || now_ms - flap_logged_ms_ >= 60000) {
    log::Warning("token " + QuoteForMessage(label_) + ": " +
                 std::string(CkrName(rv)) +
                 (flapping_ ? "; it failed again soon after connecting: "
                              "reconnecting at the back-off"
                            : "; dropping sessions and reconnecting"));
    if (flapping_) flap_logged_ms_ = now_ms;
  }
  faults_.fetch_add(1);
  failing_.store(true);
  {
    std::lock_guard<std::mutex> info(info_mu_);
    last_error_ = std::string(CkrName(rv));
  }
  DisconnectLocked(/*close_handles=*/true);
  // Reconnecting is the prober's job from now on: at once after a
  // connection that lasted (most faults are a session lost, not the
  // token), else at the back-off, which keeps growing while it flaps.
  const auto now = std::chrono::steady_clock::now();
  if (early) {
    backoff_ = backoff_.count() == 0
                   ? options_.backoff_initial
                   : std::min(backoff_ * 2, options_.backoff_max);
    // With a prober, never sooner than kMinProbeInterval (no spinning).
    retry_at_ =
        now +
        (prober_ != nullptr ? std::max(backoff_, kMinProbeInterval) : backoff_);
    state_ = TokenState::kBackoff;
  } else {
    backoff_ = std::chrono::milliseconds(0);
    retry_at_ = now;
  }
  ScheduleProbeLocked(retry_at_);
}

void Token::DisconnectLocked(bool close_handles) {
  if (ForkedSinceConnect()) {
    ForgetParentLocked();
    return;
  }
  if (close_handles && module_) {
    for (CK_SESSION_HANDLE h : idle_) P11_CLEANUP(fn(), C_CloseSession, h);
    if (object_session_ != CK_INVALID_HANDLE) {
      // A caller inside WithObjectSession (maybe this thread, reporting a
      // fault) closes it when it is done.
      if (object_session_ == object_session_in_use_) {
        object_session_retired_ = true;
      } else {
        P11_CLEANUP(fn(), C_CloseSession, object_session_);
      }
    }
  }
  idle_.clear();
  object_session_ = CK_INVALID_HANDLE;
  if (state_ == TokenState::kConnected) state_ = TokenState::kDisconnected;
  ReleaseModuleIfIdleLocked();
}

void Token::ReleaseModuleIfIdleLocked() {
  if (held_module_ == nullptr || state_ == TokenState::kConnected ||
      leased_ > 0) {
    return;
  }
  // A hold taken in the parent is not counted by the child's module.
  if (!ForkedSinceConnect()) held_module_->TokenDisconnected();
  held_module_.reset();
}

void Token::Disconnect() {
  std::lock_guard<std::mutex> lock(mu_);
  DisconnectLocked(/*close_handles=*/true);
  generation_.fetch_add(1);
}

}  // namespace hsmstek::p11
