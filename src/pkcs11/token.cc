#include "pkcs11/token.h"

#include <openssl/err.h>

#include <algorithm>
#include <string>

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
  atfork::Register(this);
}

Token::~Token() {
  atfork::Unregister(this);
  Disconnect();
}

void Token::ForkPrepare(atfork::Rank rank) {
  if (rank == atfork::Rank::kTokenObject) object_mu_.lock();
  if (rank == atfork::Rank::kTokenState) mu_.lock();
}

void Token::ForkParent(atfork::Rank rank) {
  if (rank == atfork::Rank::kTokenState) mu_.unlock();
  if (rank == atfork::Rank::kTokenObject) object_mu_.unlock();
}

void Token::ForkChild(atfork::Rank rank) {
  if (rank == atfork::Rank::kTokenState) {
    // Before anything can read state() or generation(): the store then sees
    // its view and cached handles as stale and reloads, which reconnects.
    if (state_ != TokenState::kDisconnected || !idle_.empty() ||
        object_session_ != CK_INVALID_HANDLE || held_module_) {
      ForgetParentLocked();
    }
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
  std::lock_guard<std::mutex> lock(mu_);
  return label_;
}

std::string Token::serial() const {
  std::lock_guard<std::mutex> lock(mu_);
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
    last_connect_error_ = status;
    log::Warning("token " + QuoteForMessage(uri_.text, kMaxQuotedUri) + ": " +
                 status.message());
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
  label_ = TrimPadded(match.info.label, sizeof(match.info.label));
  serial_ =
      TrimPadded(match.info.serialNumber, sizeof(match.info.serialNumber));
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
  backoff_ = std::chrono::milliseconds(0);
  connected_fork_count_ = Module::ForkCount();
  last_connect_error_ = Status::Ok();
  generation_.fetch_add(1);
  log::Info("connected to token " + QuoteForMessage(label_) + " (slot " +
            std::to_string(slot_) + ")");
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
  std::lock_guard<std::mutex> lock(mu_);
  if (state_ != TokenState::kDisconnected && ForkedSinceConnect()) {
    // Nothing opened by the parent is used by the child.
    DisconnectLocked(/*close_handles=*/false);
  }
  if (state_ == TokenState::kBackoff) {
    if (std::chrono::steady_clock::now() < retry_at_) {
      return last_connect_error_.WithContext("token unavailable (retrying)");
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
  log::Warning("token " + QuoteForMessage(label_) + ": " +
               std::string(CkrName(rv)) +
               "; dropping sessions and reconnecting");
  DisconnectLocked(/*close_handles=*/true);
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
