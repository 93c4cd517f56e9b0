#include "keystore/store.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <limits>
#include <new>
#include <set>

#include "common/barrier.h"
#include "common/bytes.h"
#include "common/exit_guard.h"
#include "common/log.h"
#include "common/test_seam.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {

namespace {

const Master *FindMaster(const std::vector<Master> &masters,
                         const StoreId &id) {
  for (const Master &m : masters) {
    if (ConstantTimeEqual(m.id, id)) return &m;
  }
  return nullptr;
}

// The start of the oldest epoch whose link `m` still holds (nullopt: no
// link left).
std::optional<int64_t> HorizonOf(const Master &m) {
  if (m.links.empty()) return std::nullopt;
  return EpochStart(LinkFirstEpoch(m.links.begin()->first, m.first_epoch(),
                                   RatchetPeriods(m.policy)),
                    m.policy.period_s);
}

}  // namespace

Result<std::shared_ptr<KeyStore>> KeyStore::Open(std::string_view uri_text,
                                                 StoreOptions options) {
  Result<p11::TokenUri> uri = p11::ParseTokenUri(uri_text);
  if (!uri.ok()) return uri.status();
  if (!uri->object || uri->object->empty()) {
    return InvalidArgument("the URI must name the store with object=<label>: " +
                           uri->text);
  }
  // CKM_AES_ECB: the pre-armed decryption of an open (block decryption,
  // CBC chaining in memory; src/provider/armed_pool.h).
  for (CK_MECHANISM_TYPE m : {CKM_AES_CBC_PAD, CKM_AES_ECB, CKM_SHA256_HMAC,
                              CKM_AES_ECB_ENCRYPT_DATA}) {
    auto &required = options.token.required_mechanisms;
    if (std::find(required.begin(), required.end(), m) == required.end()) {
      required.push_back(m);
    }
  }
  // The ratchet derives and destroys token objects in every server.
  options.token.read_write = true;
  Result<std::shared_ptr<p11::Token>> token =
      p11::Token::Create(*uri, options.token);
  if (!token.ok()) return token.status();
  return std::shared_ptr<KeyStore>(
      new KeyStore(*uri->object, std::move(*token), std::move(options)));
}

KeyStore::KeyStore(std::string label, std::shared_ptr<p11::Token> token,
                   StoreOptions options)
    : label_(std::move(label)),
      token_(std::move(token)),
      options_(std::move(options)),
      clock_skew_s_(options_.clock_skew_s) {
  exit_guard::Init();  // outside every lock (it registers fork handlers)
  atfork::Register(this);
}

void KeyStore::ForkPrepare(atfork::Rank rank) {
  if (rank == atfork::Rank::kStoreLoad) load_mu_.lock();
  if (rank == atfork::Rank::kLeaf) {
    mu_.lock();
    thread_mu_.lock();
  }
}

void KeyStore::ForkParent(atfork::Rank rank) {
  if (rank == atfork::Rank::kLeaf) {
    thread_mu_.unlock();
    mu_.unlock();
  }
  if (rank == atfork::Rank::kStoreLoad) load_mu_.unlock();
}

void KeyStore::ForkChild(atfork::Rank rank) {
  if (rank == atfork::Rank::kLeaf) {
    // The parent's thread does not exist here: its object is leaked
    // (joining would hang) and the next use starts the child's own.
    thread_ = nullptr;
    thread_running_for_.store(0);
    // The parent's thread may have been waiting on thread_cv_: the copy
    // counts a waiter that does not exist here, and destroying or
    // signalling it could block forever. A fresh one replaces it (not
    // destroyed: that is what would block; it owns no resources).
    new (&thread_cv_) std::condition_variable();
    // The parent's snapshot names its token generation; the child computes
    // its own (and a refresh the parent was running is not running here).
    fs_.reset();
    fs_generation_ = 0;
    fs_refreshing_.store(false);
    thread_mu_.unlock();
    mu_.unlock();
  }
  if (rank == atfork::Rank::kStoreLoad) load_mu_.unlock();
}

KeyStore::~KeyStore() {
  atfork::Unregister(this);
  std::thread *thread;
  {
    std::lock_guard<std::mutex> lock(thread_mu_);
    stop_ = true;
    thread = thread_;
    thread_ = nullptr;
  }
  thread_cv_.notify_all();
  // A thread object inherited through fork() has no thread behind it:
  // joining it would hang, so it is deliberately leaked.
  if (thread != nullptr && thread_fork_count_ == p11::Module::ForkCount()) {
    thread->join();
    delete thread;
  }
}

Status KeyStore::Load() {
  // Even when this first load fails (token not there yet), retries must
  // happen in the background, not only when a handshake comes by.
  EnsureMaintenanceThread();
  Result<std::shared_ptr<const View>> view = CurrentView(/*force_reload=*/true);
  if (!view.ok()) return view.status();
  // One maintenance pass now: the ratchet catches up and the name table is
  // filled before the first handshake (a decryption never computes names).
  Maintain();
  return Status::Ok();
}

Result<std::shared_ptr<const KeyStore::View>> KeyStore::CurrentView(
    bool force_reload) {
  // The ticket path's allocations (views, cache entries) start here.
  seam::Hit(seam::Point::kStoreLookup);
  auto fresh = [this](const std::shared_ptr<const View> &v) {
    // State before generation: a reconnect completing between the two
    // reads then shows as a newer generation. In the other order the old
    // generation could pair with the new connection, and a view (and cached
    // keys) of the dead generation would be handed out as fresh.
    if (!v || token_->state() != p11::TokenState::kConnected) return false;
    if (v->generation != token_->generation()) return false;
    int64_t age = options_.clock->NowUnix() - v->loaded_at;
    return age >= 0 && age < options_.refresh_interval_s;
  };
  std::shared_ptr<const View> view;
  {
    std::lock_guard<std::mutex> lock(mu_);
    view = view_;
  }
  if (!force_reload && fresh(view)) return view;

  std::lock_guard<std::mutex> load_lock(load_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Another thread may have reloaded while we waited.
    if (!force_reload && view_ != view && fresh(view_)) return view_;
    view = view_;
  }
  // A view whose handles are still good: served while a reload backs off,
  // but only for one more refresh interval. Past that it may hide a retire
  // or a destroy made since (the emergency kind), so failing reloads then
  // mean no tickets, as before the back-off existed.
  auto usable = [this](const std::shared_ptr<const View> &v) {
    if (!v || token_->state() != p11::TokenState::kConnected ||
        v->generation != token_->generation()) {
      return false;
    }
    const int64_t age = options_.clock->NowUnix() - v->loaded_at;
    return age >= 0 && age < 2 * options_.refresh_interval_s;
  };
  if (!force_reload && !ReloadDueLocked()) {
    if (usable(view)) return view;
    return last_reload_error_;
  }
  Status status = ReloadLocked();
  if (!status.ok()) {
    // Not again on every handshake: dozens of token calls each time.
    reload_backoff_.Failed(options_.clock->NowUnix(),
                           options_.refresh_interval_s);
    last_reload_error_ = status;
    failed_generation_ = token_->generation();
    if (!force_reload && usable(view)) return view;
    return status;
  }
  reload_backoff_.Succeeded();
  std::lock_guard<std::mutex> lock(mu_);
  return view_;
}

bool KeyStore::ReloadDueLocked() const {
  if (last_reload_error_.ok()) return true;
  // A reconnect since the failure (a new generation, or one to come) may
  // have fixed it: try at once, the token backs off its own connects.
  if (token_->state() != p11::TokenState::kConnected ||
      token_->generation() != failed_generation_) {
    return true;
  }
  return reload_backoff_.Due(options_.clock->NowUnix());
}

void KeyStore::LogSkippedLocked(const std::vector<SkippedObject> &skipped) {
  for (const SkippedObject &o : skipped) {
    std::string line = "hsmstek: store " + QuoteForMessage(label_) + ": " +
                       o.what + " left out: " + o.reason +
                       " (the rest of the store serves; see hsmstek status)";
    if (logged_skips_.insert(line).second) log::Warning(line);
  }
}

Result<std::vector<Master>> KeyStore::LoadVerifiedLocked(
    p11::Session &session, std::vector<SkippedObject> *skipped) {
  Result<std::vector<Master>> masters = LoadMasters(session, label_, skipped);
  if (!masters.ok()) return masters.status();
  // Only links shown to follow from the chain are used (link_check.h).
  p11::ObjectsMayVanish vanish;
  for (Master &m : *masters) {
    Status s = link_trust_.Verify(session, m, skipped, &refused_lockdown_);
    if (!s.ok()) return s.WithContext("verifying the ratchet links");
  }
  return masters;
}

Status KeyStore::ReloadLocked() {
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) return session.status();
  std::vector<SkippedObject> skipped;
  Result<std::vector<Master>> masters = LoadVerifiedLocked(*session, &skipped);
  if (!masters.ok()) return masters.status();
  Result<std::vector<LegacyKeyObjects>> legacy =
      LoadLegacyKeys(*session, label_, &skipped);
  if (!legacy.ok()) return legacy.status();
  // Links the current and next epochs need are derived before the view is
  // published (a cold start, or a server back from a pause): the view then
  // always holds the active master's current link. Destruction waits for
  // the maintenance pass.
  {
    View draft;
    draft.generation = session->generation();
    draft.masters = *masters;
    const int64_t now = options_.clock->NowUnix();
    std::vector<MasterState> states = ComputeStates(draft.masters, now);
    bool derived = false;
    for (size_t i = 0; i < draft.masters.size(); ++i) {
      Status ignored;  // reported by the maintenance pass
      derived |= RatchetLocked(draft, draft.masters[i], states[i], now,
                               /*destroy=*/false, &ignored);
    }
    if (derived) {
      skipped.clear();
      masters = LoadVerifiedLocked(*session, &skipped);
      if (!masters.ok()) return masters.status();
      legacy = LoadLegacyKeys(*session, label_, &skipped);
      if (!legacy.ok()) return legacy.status();
    }
  }
  LogSkippedLocked(skipped);
  last_reload_error_ = Status::Ok();

  auto view = std::make_shared<View>();
  view->skipped = std::move(skipped);
  view->generation = session->generation();
  view->loaded_at = options_.clock->NowUnix();
  view->masters = std::move(*masters);
  view->legacy = std::move(*legacy);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!view_ || view_->generation != view->generation) {
      // Handles of another generation are dead: forget them, never reuse.
      cache_.clear();
    }
    view_ = view;
  }
  reloads_.fetch_add(1);
  // The names of every acceptable epoch, before any lookup uses this view
  // (missing ones only: one C_Sign per new epoch in steady state). Errors
  // are the maintenance pass's to report.
  (void)RefreshNames(*view, view->loaded_at);
  return Status::Ok();
}

std::optional<KeyName> KeyStore::CachedNameLocked(const StoreId &id,
                                                  uint64_t epoch) const {
  for (const NameEntry &e : names_) {
    if (e.epoch == epoch && e.master == id) return KeyName{e.name};
  }
  return std::nullopt;
}

Status KeyStore::ComputeNames(const View &view, const Master &m, uint64_t first,
                              uint64_t last) {
  // By link: one name key per link, one C_Sign per epoch.
  std::map<uint64_t, std::vector<uint64_t>> missing;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (uint64_t e = first; e <= last && e >= first; ++e) {
      std::optional<uint64_t> j = m.LinkOf(e);
      if (j && !CachedNameLocked(m.id, e)) missing[*j].push_back(e);
    }
  }
  if (missing.empty()) return Status::Ok();
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) return session.status();
  if (session->generation() != view.generation) {
    return Unavailable("token reconnected; reloading the store");
  }
  Status first_error;
  std::vector<NameEntry> computed;
  p11::ObjectsMayVanish vanish;  // links other servers destroy
  for (const auto &[j, epochs] : missing) {
    auto link = m.links.find(j);
    if (link == m.links.end()) {
      if (first_error.ok()) {
        first_error =
            NotFound("ratchet link " + std::to_string(j) + " of master " +
                     HexEncode(m.id) + " is not in the token");
      }
      continue;
    }
    Result<CK_OBJECT_HANDLE> key =
        DeriveNameKey(*session, link->second, &refused_lockdown_);
    if (!key.ok()) return key.status().WithContext("deriving a name key");
    p11::ScopedObject owner(*session, *key);
    for (uint64_t e : epochs) {
      Result<KeyName> name = SignKeyName(*session, *key, e);
      if (!name.ok()) return name.status().WithContext("computing a key name");
      computed.push_back(NameEntry{name->bytes, m.id, e});
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const NameEntry &n : computed) {
    if (!CachedNameLocked(n.master, n.epoch)) names_.push_back(n);
  }
  return first_error;
}

Result<KeyName> KeyStore::NameOf(const StoreId &id, uint64_t epoch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (std::optional<KeyName> n = CachedNameLocked(id, epoch)) return *n;
  }
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) return view.status();
  const Master *master = FindMaster((*view)->masters, id);
  if (master == nullptr) {
    return NotFound("no master " + HexEncode(id) + " in store " +
                    QuoteForMessage(label_));
  }
  if (!master->LinkOf(epoch)) {
    return NotFound("epoch " + std::to_string(epoch) +
                    " is before the activation of master " + HexEncode(id));
  }
  Status s = ComputeNames(**view, *master, epoch, epoch);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  if (std::optional<KeyName> n = CachedNameLocked(id, epoch)) return *n;
  return Internal("key name computed but not recorded");
}

size_t KeyStore::known_names() const {
  std::lock_guard<std::mutex> lock(mu_);
  return names_.size();
}

uint64_t KeyStore::OldestAcceptable(const Master &m, int64_t now) const {
  // Skew grace at the old end: a ticket at the last second of its lifetime
  // still resumes on a server whose clock is ahead by less than the
  // tolerance. Capped at one period so the name table and the links kept
  // grow by one epoch at most.
  const int64_t grace =
      std::clamp<int64_t>(clock_skew_s_.load(), 0, m.policy.period_s);
  const uint64_t n_old = EpochAt(now - grace, m.policy.period_s);
  const uint64_t window_epochs =
      static_cast<uint64_t>(m.policy.decrypt_window_s / m.policy.period_s);
  const uint64_t oldest = n_old > window_epochs ? n_old - window_epochs : 0;
  return std::max(oldest, m.first_epoch());
}

Result<TicketKeys> KeyStore::KeysFor(const View &view, const Master &master,
                                     uint64_t epoch, bool old, bool *declined) {
  std::optional<KeyName> cached_name;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cached_name = CachedNameLocked(master.id, epoch);
  }
  if (!cached_name) {
    // Maintenance computes names ahead; only a first ticket before the
    // first pass (or a pass that failed) gets here, never a decryption.
    Status s = ComputeNames(view, master, epoch, epoch);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    cached_name = CachedNameLocked(master.id, epoch);
    if (!cached_name) return Internal("key name computed but not recorded");
  }
  const KeyName name = *cached_name;
  const CK_OBJECT_HANDLE link = master.LinkFor(epoch);
  if (link == CK_INVALID_HANDLE) {
    return NotFound("the ratchet link of epoch " + std::to_string(epoch) +
                    " of master " + HexEncode(master.id) +
                    " is not in the token");
  }
  auto from_entry = [&](const CacheEntry &e) {
    return TicketKeys{name, e.keys.aes, e.keys.hmac, e.generation,
                      master.policy.decrypt_window_s};
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(name.bytes);
    if (it != cache_.end() && it->second.generation == view.generation) {
      return from_entry(it->second);
    }
  }
  std::lock_guard<std::mutex> load_lock(load_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(name.bytes);
    if (it != cache_.end() && it->second.generation == view.generation) {
      return from_entry(it->second);
    }
  }
  // Remote clients choose old epochs freely (the name is read before any
  // MAC): past the budget, decline instead of deriving on every handshake.
  if (old && !old_derivations_.Take(options_.clock->NowUnix())) {
    if (declined != nullptr) *declined = true;
    return Unavailable("store \"" + label_ + "\": more than " +
                       std::to_string(kMaxOldDerivationsPerSecond) +
                       " derivations of old epochs this second; ticket "
                       "declined (full handshake)");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!MakeRoomLocked(view, options_.clock->NowUnix(), old)) {
      if (declined != nullptr) *declined = true;
      return Unavailable("store \"" + label_ + "\" holds " +
                         std::to_string(kMaxDerivedPairs) +
                         " derived key pairs; ticket of an old epoch declined "
                         "until evicted ones are destroyed");
    }
  }
  DerivedKeys derived;
  Status status = token_->WithObjectSession([&](p11::Session &session) {
    if (session.generation() != view.generation) {
      return Unavailable("token reconnected; reloading the store");
    }
    // The link may have been destroyed by another server: a miss.
    p11::ObjectsMayVanish vanish;
    Result<DerivedKeys> keys =
        DeriveEpochKeys(session, link, epoch, &refused_lockdown_);
    if (!keys.ok()) return keys.status();
    derived = *keys;
    return Status::Ok();
  });
  if (!status.ok()) {
    return status.WithContext("deriving keys of epoch " +
                              std::to_string(epoch) + " of store " +
                              QuoteForMessage(label_));
  }
  derivations_.fetch_add(1);
  CacheEntry entry{derived, view.generation, master.id, epoch};
  std::lock_guard<std::mutex> lock(mu_);
  cache_[name.bytes] = entry;
  return from_entry(entry);
}

Result<TicketKeys> KeyStore::KeysForEncrypt() {
  EnsureMaintenanceThread();
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) return view.status();
  int64_t now = options_.clock->NowUnix();
  const std::vector<Master> &masters = (*view)->masters;
  std::vector<MasterState> states = ComputeStates(masters, now);
  for (size_t i = 0; i < masters.size(); ++i) {
    if (states[i].state != KeyState::kActive) continue;
    return KeysFor(**view, masters[i],
                   EpochAt(now, masters[i].policy.period_s));
  }
  return FailedPrecondition("store " + QuoteForMessage(label_) +
                            " has no active master");
}

DecryptLookup KeyStore::KeysForDecrypt(const KeyName &name) {
  EnsureMaintenanceThread();
  DecryptLookup out;
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) {
    out.verdict = DecryptVerdict::kUnavailable;
    out.error = view.status();
    return out;
  }
  const View &v = **view;
  const int64_t now = options_.clock->NowUnix();
  const int64_t skew = clock_skew_s_.load();

  // The name table holds every name we may accept: an unknown name costs
  // no token call. Every entry is compared (constant time, no early exit).
  NameEntry hit;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const NameEntry &entry : names_) {
      if (ConstantTimeEqual(entry.name, name.bytes)) {
        hit = entry;
        found = true;
      }
    }
  }
  const Master *master = found ? FindMaster(v.masters, hit.master) : nullptr;
  if (master == nullptr) {
    for (const LegacyKeyObjects &legacy : v.legacy) {
      if (!ConstantTimeEqual(legacy.name.bytes, name.bytes)) continue;
      if (now >= legacy.expires) {
        out.verdict = DecryptVerdict::kExpired;
        return out;
      }
      out.verdict = DecryptVerdict::kOld;
      out.keys = TicketKeys{name, legacy.aes, legacy.hmac, v.generation,
                            legacy.expires - now};
      return out;
    }
    out.verdict = DecryptVerdict::kUnknownKey;
    return out;
  }

  std::vector<MasterState> states = ComputeStates(v.masters, now);
  const KeyState state = states[master - v.masters.data()].state;
  const Policy &policy = master->policy;
  if (state == KeyState::kRetired) {
    out.verdict = DecryptVerdict::kExpired;
    return out;
  }
  if (state == KeyState::kPending && now + skew < policy.not_before) {
    out.verdict = DecryptVerdict::kFuture;
    return out;
  }
  const uint64_t n = EpochAt(now, policy.period_s);
  const uint64_t e = hit.epoch;
  DecryptVerdict verdict;
  if (e > n + 1) {
    verdict = DecryptVerdict::kFuture;
  } else if (e == n + 1) {
    verdict = EpochStart(e, policy.period_s) - now <= skew
                  ? DecryptVerdict::kCurrent
                  : DecryptVerdict::kFuture;
  } else if (e == n) {
    verdict = state == KeyState::kActive ? DecryptVerdict::kCurrent
                                         : DecryptVerdict::kOld;
  } else if (e >= OldestAcceptable(*master, now)) {
    verdict = DecryptVerdict::kOld;
  } else {
    verdict = DecryptVerdict::kExpired;
  }
  // A superseded master's "next epoch" ticket was still issued by it.
  if (verdict == DecryptVerdict::kCurrent && state != KeyState::kActive) {
    verdict = DecryptVerdict::kOld;
  }
  if (verdict != DecryptVerdict::kCurrent && verdict != DecryptVerdict::kOld) {
    out.verdict = verdict;
    return out;
  }
  bool declined = false;
  Result<TicketKeys> keys = KeysFor(
      v, *master, e, /*old=*/verdict == DecryptVerdict::kOld, &declined);
  if (!keys.ok()) {
    // Its link is gone: the ratchet has forgotten that epoch for good.
    if (declined) {
      out.verdict = DecryptVerdict::kDeclined;
    } else if (keys.status().code() == ErrorCode::kNotFound) {
      out.verdict = DecryptVerdict::kExpired;
    } else {
      out.verdict = DecryptVerdict::kUnavailable;
    }
    out.error = keys.status();
    return out;
  }
  out.verdict = verdict;
  out.keys = *keys;
  return out;
}

bool KeyStore::MakeRoomLocked(const View &view, int64_t now, bool old) {
  // Evicted pairs are not destroyed here: a ticket operation on another
  // thread (or the maintenance thread's) may hold their handles, and an
  // invalid handle reads as a lost token (a full reconnect). They wait a
  // maintenance pass in evicted_ (DestroyEvicted) and count meanwhile.
  size_t used = cache_.size();
  for (const Evicted &e : evicted_) {
    if (e.generation == view.generation) ++used;
  }
  if (used + 1 <= kMaxDerivedPairs) return true;
  std::vector<MasterState> states = ComputeStates(view.masters, now);
  std::vector<NameBytes> names;
  std::vector<CachedEpoch> entries;
  for (const auto &[name, e] : cache_) {
    CachedEpoch c;
    const Master *m = FindMaster(view.masters, e.master);
    if (m != nullptr && e.generation == view.generation) {
      const KeyState state = states[m - view.masters.data()].state;
      const uint64_t n = EpochAt(now, m->policy.period_s);
      c.epoch_start = EpochStart(e.epoch, m->policy.period_s);
      c.pinned = (state == KeyState::kActive && e.epoch >= n) ||
                 (state == KeyState::kPending &&
                  e.epoch == EpochAt(m->policy.not_before, m->policy.period_s));
    } else {
      c.epoch_start = INT64_MIN;  // dead or unknown: first to go
    }
    names.push_back(name);
    entries.push_back(c);
  }
  // Several at once, so that after one pass there is room for a second's
  // budget of old epochs.
  const size_t keep = kMaxDerivedPairs > kMaxOldDerivationsPerSecond
                          ? kMaxDerivedPairs - kMaxOldDerivationsPerSecond
                          : 0;
  for (size_t i : EvictionOrder(entries, keep)) {
    auto it = cache_.find(names[i]);
    if (it->second.generation == view.generation) {
      evicted_.push_back(
          {it->second.keys, it->second.generation, maintenance_passes_});
    }
    cache_.erase(it);
  }
  // An old epoch waits (the ticket is declined) until the evicted pairs are
  // gone; the active master's current and next epochs never wait.
  return !old;
}

void KeyStore::EvictLocked(const View &view, int64_t now) {
  for (auto it = cache_.begin(); it != cache_.end();) {
    const CacheEntry &e = it->second;
    bool keep = false;
    if (e.generation == view.generation) {
      if (const Master *m = FindMaster(view.masters, e.master)) {
        uint64_t n = EpochAt(now, m->policy.period_s);
        keep = e.epoch >= OldestAcceptable(*m, now) && e.epoch <= n + 1 &&
               m->LinkFor(e.epoch) != CK_INVALID_HANDLE;
      }
    }
    if (!keep && e.generation == view.generation) {
      evicted_.push_back({e.keys, e.generation, maintenance_passes_});
    }
    it = keep ? std::next(it) : cache_.erase(it);
  }
}

void KeyStore::DestroyEvicted(uint64_t pass) {
  std::vector<Evicted> due;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A plain split: GCC 12 (-O2) reports a false -Wfree-nonheap-object on
    // std::partition + assign here.
    std::vector<Evicted> waiting;
    for (const Evicted &e : evicted_) {
      (e.pass + 2 > pass ? waiting : due).push_back(e);
    }
    evicted_.swap(waiting);
  }
  if (due.empty()) return;
  // Failures are ignored: a key that cannot be destroyed now dies with its
  // session at the next reconnect or close.
  (void)token_->WithObjectSession([&](p11::Session &session) {
    for (const Evicted &e : due) {
      // Keys of an older generation died with their session.
      if (e.generation != session.generation()) continue;
      for (CK_OBJECT_HANDLE h : {e.keys.aes, e.keys.hmac}) {
        if (h == CK_INVALID_HANDLE) continue;
        (void)P11_CALL(session, C_DestroyObject, session.handle(), h);
      }
    }
    return Status::Ok();
  });
}

int64_t KeyStore::SteadyNow() const {
  if (options_.steady_clock != nullptr) return options_.steady_clock->NowUnix();
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool KeyStore::RatchetLocked(const View &view, const Master &m,
                             const MasterState &state, int64_t now,
                             bool destroy, Status *error) {
  if (m.links.empty()) return false;
  if (state.state == KeyState::kRetired) {
    return destroy && SpentAt(m, state) <= now && SpendLocked(view, m, error);
  }
  // Pending masters need only link 0.
  if (state.state == KeyState::kPending) return false;
  const uint64_t n = EpochAt(now, m.policy.period_s);
  // The next epoch's link exists before its first epoch (active master
  // only: a superseded one issues nothing new).
  std::optional<uint64_t> want_top;
  if (state.state == KeyState::kActive) want_top = m.LinkOf(n + 1);
  const std::optional<uint64_t> keep_from = m.LinkOf(OldestAcceptable(m, now));
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) {
    *error = session.status();
    return false;
  }
  if (session->generation() != view.generation) return false;
  // Links are destroyed by other servers at any time: gone, not a fault.
  p11::ObjectsMayVanish vanish;
  bool changed = false;
  uint64_t top = m.links.rbegin()->first;
  CK_OBJECT_HANDLE top_handle = m.links.rbegin()->second;
  // Destruction never outruns the token (docs/DESIGN.md, "Behind"): a clock
  // that wants more than the next link is ahead of every server that
  // derived the chain so far (or the fleet was down): derive, but destroy
  // nothing for one ratchet interval of this process's steady clock.
  DestroyGuard &guard = destroy_guard_[m.id];
  const int64_t steady = SteadyNow();
  const int64_t interval_s =
      static_cast<int64_t>(RatchetPeriods(m.policy)) * m.policy.period_s;
  const bool jump = want_top && *want_top > top + 1;
  if (jump) {
    guard.armed = true;
    guard.since = steady;
    if (!guard.jump_logged) {
      guard.jump_logged = true;
      log::Warning("hsmstek: store " + QuoteForMessage(label_) + ": master " +
                   HexEncode(m.id) + ": this clock wants ratchet link " +
                   std::to_string(*want_top) + " but the token holds links " +
                   "up to " + std::to_string(top) +
                   " only (clock ahead, or every server was down): deriving "
                   "forward, destroying nothing for one ratchet interval");
    }
  } else if (want_top) {
    guard.jump_logged = false;
  }
  // A server back from a long pause catches up a bounded number of links
  // per pass (one pass a second): maintenance stays short.
  for (int steps = 0; want_top && top < *want_top && steps < kMaxRatchetSteps;
       ++steps) {
    const LinkId id = MakeLinkId(m.id, top + 1);
    // Another server may have derived it since this view was loaded: same
    // value either way, but one object is enough.
    p11::Template find;
    find.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .Ulong(CKA_KEY_TYPE, CKK_AES)
        .String(CKA_LABEL, label_)
        .Data(CKA_ID, id);
    Result<std::vector<CK_OBJECT_HANDLE>> found =
        p11::FindObjects(*session, find, 8);
    if (!found.ok()) {
      *error = found.status();
      return changed;
    }
    // Adopted only when its value is shown to be the successor of `top`: a
    // PIN holder may have planted a key of known value under this id.
    CK_OBJECT_HANDLE next = CK_INVALID_HANDLE;
    for (CK_OBJECT_HANDLE c : *found) {
      bool ok = link_trust_.Trusted(c);
      if (!ok && !link_trust_.Refused(c)) {
        Result<bool> follows =
            LinkFollows(*session, top_handle, top + 1, c, &refused_lockdown_);
        if (!follows.ok() && follows.status().code() == ErrorCode::kNotFound) {
          continue;  // destroyed meanwhile
        }
        if (!follows.ok()) {
          *error = follows.status().WithContext("verifying a ratchet link");
          return changed;
        }
        ok = *follows;
        link_trust_.Record(*session, c, ok);
        if (!ok) {
          log::Warning("hsmstek: store " + QuoteForMessage(label_) +
                       ": ratchet link " + std::to_string(top + 1) +
                       " of master " + HexEncode(m.id) +
                       " found in the token does not follow from the chain "
                       "(a planted key?): not used; deriving the real one");
        }
      }
      if (ok) {
        next = c;
        break;
      }
    }
    if (next == CK_INVALID_HANDLE) {
      // Extractable only if the chain is: the policy text alone (a data
      // object the user PIN can rewrite) must not make a link wrappable.
      Result<CK_OBJECT_HANDLE> derived =
          DeriveLink(*session, top_handle, top + 1, label_, m.id,
                     m.policy.replicable && m.extractable, &refused_lockdown_);
      if (!derived.ok()) {
        *error = derived.status().WithContext("ratchet of master " +
                                              HexEncode(m.id));
        return changed;
      }
      next = *derived;
      link_trust_.Trust(*session, next);
      links_derived_.fetch_add(1);
    }
    changed = true;
    ++top;
    top_handle = next;
  }
  if (!keep_from || !destroy || jump) return changed;
  // At most one link per ratchet interval of the steady clock: what a
  // normal server needs, and all a clock far ahead can take before the
  // fleet would destroy the same link anyway.
  if (guard.armed && steady - guard.since < interval_s) return changed;
  // The highest link is never destroyed: the chain continues from it.
  const uint64_t destroy_below = std::min(*keep_from, top);
  std::set<uint64_t> doomed;
  for (const auto &[j, h] : m.links) {
    if (j < destroy_below) doomed.insert(j);
  }
  for (const auto &[j, h] : m.duplicate_links) {
    if (j < destroy_below) doomed.insert(j);
  }
  if (doomed.size() > 1) doomed.erase(std::next(doomed.begin()), doomed.end());
  if (!doomed.empty()) {
    guard.armed = true;
    guard.since = steady;
  }
  for (uint64_t j : doomed) {
    if (!DestroyLinkCopies(*session, m.id, j, "an old ratchet link of master",
                           error)) {
      return changed;
    }
    changed = true;
  }
  return changed;
}

bool KeyStore::DestroyLinkCopies(p11::Session &session, const StoreId &id,
                                 uint64_t j, std::string_view what,
                                 Status *error) {
  // Found again right before: another server may have destroyed it since
  // this view was loaded, and a stale handle reads as a lost token.
  p11::Template find;
  find.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .String(CKA_LABEL, label_);
  if (j == 0) {
    find.Data(CKA_ID, id);
  } else {
    find.Data(CKA_ID, MakeLinkId(id, j));
  }
  Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(session, find);
  if (!found.ok()) {
    if (error->ok()) *error = found.status();
    return false;
  }
  for (CK_OBJECT_HANDLE h : *found) {
    Status s = P11_CALL(session, C_DestroyObject, session.handle(), h);
    // Several servers destroy the same links: already gone is done.
    if (s.ok()) {
      links_destroyed_.fetch_add(1);
    } else if (s.ckr() != CKR_OBJECT_HANDLE_INVALID && error->ok()) {
      *error = s.WithContext("destroying " + std::string(what) + " " +
                             HexEncode(id));
    }
  }
  return true;
}

int64_t KeyStore::SpentAt(const Master &m, const MasterState &state) const {
  // The last second it issued tickets (retired, or superseded), plus the
  // decrypt window and the skew grace, as for OldestAcceptable: a server
  // whose clock lags, or one that still reads it as decrypt-only, has no
  // use for its links after that.
  int64_t end = std::numeric_limits<int64_t>::max();
  if (m.policy.retire_at) end = *m.policy.retire_at;
  if (state.superseded_at) end = std::min(end, *state.superseded_at);
  if (end == std::numeric_limits<int64_t>::max()) return end;
  const int64_t grace =
      std::clamp<int64_t>(clock_skew_s_.load(), 0, m.policy.period_s);
  return end + m.policy.decrypt_window_s + grace;
}

bool KeyStore::SpendLocked(const View &view, const Master &m, Status *error) {
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) {
    *error = session.status();
    return false;
  }
  if (session->generation() != view.generation) return false;
  // Every link, link 0 included; the policy object stays (status shows a
  // spent master). Found again by id: another server may be spending it
  // too, and a stale handle reads as a lost token. Links another server
  // derived since this view was loaded are found by the next pass.
  std::set<uint64_t> doomed;
  for (const auto &[j, h] : m.links) doomed.insert(j);
  for (const auto &[j, h] : m.duplicate_links) doomed.insert(j);
  bool changed = false;
  for (uint64_t j : doomed) {
    if (!DestroyLinkCopies(*session, m.id, j, "a ratchet link of spent master",
                           error)) {
      return changed;
    }
    changed = true;
  }
  return changed;
}

Status KeyStore::RefreshNames(const View &v, int64_t now) {
  Status first_error;
  std::vector<MasterState> states = ComputeStates(v.masters, now);
  // The name table: every epoch a ticket may name (window, skew grace,
  // next epoch), so that lookups never call the token.
  std::vector<std::pair<uint64_t, uint64_t>> ranges(v.masters.size(),
                                                    {1, 0});  // empty
  for (size_t i = 0; i < v.masters.size(); ++i) {
    const Master &m = v.masters[i];
    const uint64_t n = EpochAt(now, m.policy.period_s);
    if (states[i].state == KeyState::kActive ||
        states[i].state == KeyState::kDecryptOnly) {
      ranges[i] = {OldestAcceptable(m, now), n + 1};
    } else if (states[i].state == KeyState::kPending &&
               m.policy.not_before - now <= m.policy.period_s) {
      ranges[i] = {m.first_epoch(), m.first_epoch()};
    }
    if (ranges[i].first > ranges[i].second) continue;
    Status s = ComputeNames(v, m, ranges[i].first, ranges[i].second);
    if (!s.ok() && s.code() != ErrorCode::kNotFound && first_error.ok()) {
      first_error = s;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<NameEntry> kept;
    for (const NameEntry &e : names_) {
      const Master *m = FindMaster(v.masters, e.master);
      if (m == nullptr) continue;
      const auto &[lo, hi] = ranges[m - v.masters.data()];
      if (e.epoch >= lo && e.epoch <= hi) kept.push_back(e);
    }
    names_.swap(kept);
  }
  return first_error;
}

void KeyStore::Maintain() {
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) {
    ReportBackground(view.status());
    return;
  }
  Status first_error;
  int64_t now = options_.clock->NowUnix();
  // The ratchet first: links derived or destroyed mean a fresh view.
  bool changed = false;
  {
    std::lock_guard<std::mutex> load_lock(load_mu_);
    const View &v = **view;
    std::vector<MasterState> states = ComputeStates(v.masters, now);
    for (size_t i = 0; i < v.masters.size(); ++i) {
      Status error;
      changed |= RatchetLocked(v, v.masters[i], states[i], now,
                               /*destroy=*/true, &error);
      if (!error.ok() && first_error.ok()) first_error = error;
    }
  }
  if (changed) {
    view = CurrentView(/*force_reload=*/true);
    if (!view.ok()) {
      ReportBackground(view.status());
      return;
    }
  }
  const View &v = **view;
  std::vector<MasterState> states = ComputeStates(v.masters, now);
  Status names = RefreshNames(v, now);
  if (!names.ok() && first_error.ok()) first_error = names;
  for (size_t i = 0; i < v.masters.size(); ++i) {
    const Master &m = v.masters[i];
    uint64_t n = EpochAt(now, m.policy.period_s);
    if (states[i].state == KeyState::kActive) {
      // The next epoch's keys exist before the boundary: no handshake pays
      // for a derivation.
      for (uint64_t epoch : {n, n + 1}) {
        Result<TicketKeys> keys = KeysFor(v, m, epoch);
        if (!keys.ok() && first_error.ok()) first_error = keys.status();
      }
    } else if (states[i].state == KeyState::kPending &&
               m.policy.not_before - now <= m.policy.period_s) {
      Result<TicketKeys> keys = KeysFor(v, m, m.first_epoch());
      if (!keys.ok() && first_error.ok()) first_error = keys.status();
    }
  }
  Status fs = RefreshForwardSecrecy(v, now);
  if (!fs.ok() && first_error.ok()) first_error = fs;
  ReportBackground(first_error);
  // Evicted handles are destroyed one pass later, not at once: a ticket
  // operation on another thread may have just taken one (it has a whole
  // maintenance interval to finish). One later still fails on the destroyed
  // handle: fail-soft makes that a full handshake, and the keys never leave
  // the token either way.
  uint64_t pass;
  {
    std::lock_guard<std::mutex> lock(mu_);
    EvictLocked(v, now);
    pass = ++maintenance_passes_;
  }
  DestroyEvicted(pass);
}

Status KeyStore::RefreshForwardSecrecy(const View &v, int64_t now) {
  // One refresh at a time (the maintenance thread and Maintain() callers):
  // a refresh already running publishes the same view's answer.
  if (fs_refreshing_.exchange(true)) return Status::Ok();
  struct Done {
    std::atomic<bool> &flag;
    ~Done() { flag.store(false); }
  } done{fs_refreshing_};

  std::vector<MasterState> states = ComputeStates(v.masters, now);
  const Master *active = nullptr;
  for (size_t i = 0; i < v.masters.size(); ++i) {
    if (states[i].state == KeyState::kActive) active = &v.masters[i];
  }
  if (active == nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    fs_.reset();
    return Status::Ok();
  }
  ForwardSecrecy next;
  next.master = active->id;
  next.links_held = active->links.size();
  next.as_of = v.loaded_at;  // the links are those this view found
  next.legacy_keys = v.legacy.size();
  // What the token can open is every link it holds, whatever its master's
  // state (a superseded or retired master opens its tickets until its links
  // are destroyed), and a legacy key (no ratchet) opens tickets of any age.
  std::optional<int64_t> horizon;
  for (const Master &m : v.masters) {
    std::optional<int64_t> h = HorizonOf(m);
    if (h && (!horizon || *h < *horizon)) horizon = h;
  }
  next.horizon = v.legacy.empty() ? horizon.value_or(now) : 0;
  std::optional<uint64_t> link =
      active->LinkOf(EpochAt(now, active->policy.period_s));
  next.current_link = link.value_or(0);
  CK_OBJECT_HANDLE handle =
      active->LinkFor(EpochAt(now, active->policy.period_s));
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The check value changes only with the link: computed once per step.
    // Without the link (destroyed under us), all zero.
    if (handle == CK_INVALID_HANDLE ||
        (fs_ && fs_generation_ == v.generation &&
         ConstantTimeEqual(fs_->master, next.master) &&
         fs_->current_link == next.current_link)) {
      if (handle != CK_INVALID_HANDLE) next.check = fs_->check;
      fs_ = next;
      if (handle == CK_INVALID_HANDLE) fs_generation_ = 0;
      return Status::Ok();
    }
  }
  Status error;
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) {
    error = session.status();
  } else if (session->generation() != v.generation) {
    error = Unavailable("token reconnected; try again");
  } else {
    p11::ObjectsMayVanish vanish;
    Result<std::array<uint8_t, kCheckValueSize>> check =
        ComputeCheckValue(*session, handle, &refused_lockdown_);
    if (check.ok()) {
      next.check = *check;
    } else {
      error = check.status();
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  fs_ = next;
  // A failed check value is computed again next pass.
  fs_generation_ = error.ok() ? v.generation : 0;
  return error.WithContext("check value of the current link");
}

std::optional<ForwardSecrecy> KeyStore::forward_secrecy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fs_;
}

size_t KeyStore::cached_keys() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cache_.size();
}

Result<StoreSnapshot> KeyStore::Describe() {
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) return view.status();
  const View &v = **view;
  StoreSnapshot out;
  out.label = label_;
  out.now = options_.clock->NowUnix();
  std::vector<MasterState> states = ComputeStates(v.masters, out.now);
  for (size_t i = 0; i < v.masters.size(); ++i) {
    const Master &m = v.masters[i];
    MasterInfo info;
    info.id = m.id;
    info.policy = m.policy;
    info.state = states[i].state;
    info.superseded_at = states[i].superseded_at;
    info.extractable = m.extractable;
    info.current_epoch = EpochAt(out.now, m.policy.period_s);
    // Status only (never the ticket path): may compute it in the token.
    if (m.LinkFor(info.current_epoch) != CK_INVALID_HANDLE) {
      Result<KeyName> name = NameOf(m.id, info.current_epoch);
      if (name.ok()) info.current_name = *name;
    }
    info.ratchet_periods = RatchetPeriods(m.policy);
    info.current_link = m.LinkOf(info.current_epoch);
    for (const auto &[j, h] : m.links) info.links.push_back(j);
    info.horizon = HorizonOf(m);
    info.next_rotation = EpochStart(info.current_epoch + 1, m.policy.period_s);
    info.protections = m.protections;
    out.masters.push_back(info);
  }
  std::sort(out.masters.begin(), out.masters.end(),
            [](const MasterInfo &a, const MasterInfo &b) {
              return a.policy.not_before > b.policy.not_before;
            });
  for (const LegacyKeyObjects &l : v.legacy) {
    out.legacy.push_back(LegacyInfo{l.name, l.expires, l.format,
                                    l.aes_key_bytes, l.protections});
  }
  out.skipped = v.skipped;
  return out;
}

Result<std::array<uint8_t, kCheckValueSize>> KeyStore::CheckValue(
    const StoreId &id, uint64_t *link) {
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) return view.status();
  const Master *master = FindMaster((*view)->masters, id);
  if (master == nullptr) {
    return NotFound("no master " + HexEncode(id) + " in store " +
                    QuoteForMessage(label_));
  }
  if (master->links.empty()) {
    return NotFound("master " + HexEncode(id) + " has no ratchet link left");
  }
  // The current epoch's link; before activation (or when it is not
  // derived yet) the oldest present.
  auto it = master->links.begin();
  const uint64_t n =
      EpochAt(options_.clock->NowUnix(), master->policy.period_s);
  if (std::optional<uint64_t> j = master->LinkOf(n)) {
    if (auto found = master->links.find(*j); found != master->links.end()) {
      it = found;
    }
  }
  if (link != nullptr) *link = it->first;
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) return session.status();
  if (session->generation() != (*view)->generation) {
    return Unavailable("token reconnected; try again");
  }
  p11::ObjectsMayVanish vanish;
  return ComputeCheckValue(*session, it->second, &refused_lockdown_);
}

void KeyStore::EnsureMaintenanceThread() {
  if (!options_.background_maintenance) return;
  const uint64_t forks = p11::Module::ForkCount();
  // Called for every ticket: no lock once this process's thread runs.
  if (thread_running_for_.load(std::memory_order_acquire) == forks + 1) return;
  std::lock_guard<std::mutex> lock(thread_mu_);
  if (stop_) return;
  if (thread_ != nullptr && thread_fork_count_ == forks) return;
  // In a forked child the parent's thread does not exist: leak its object
  // (joining would hang) and start our own.
  // Runs on the ticket path (the first use, and again in a forked child):
  // a failed start (std::system_error, std::bad_alloc) must not leave
  // here. Tickets work without the thread; the next use tries again.
  try {
    seam::Hit(seam::Point::kStoreThreadStart);
    auto thread = std::make_unique<std::thread>([this] { MaintenanceLoop(); });
    thread_ = thread.release();
  } catch (...) {
    barrier::ReportCaught("store maintenance thread start");
    exceptions_.fetch_add(1);  // last: an observer of it sees the report
    return;
  }
  thread_fork_count_ = forks;
  thread_running_for_.store(forks + 1, std::memory_order_release);
}

void KeyStore::ReportBackground(const Status &status) {
  std::string message = status.ok() ? std::string()
                                    : "store " + QuoteForMessage(label_) +
                                          ": maintenance: " + status.message();
  {
    std::lock_guard<std::mutex> lock(thread_mu_);
    // Once per cause: a token that stays away must not flood the log.
    if (message == last_background_error_) return;
    last_background_error_ = message;
  }
  // The sink runs with no lock of ours held: a host's sink that blocks
  // must not stall a fork's prepare handler behind thread_mu_, and one
  // that forks would deadlock in it (thread_mu_ is not recursive).
  if (status.ok()) {
    log::Info("store " + QuoteForMessage(label_) + ": maintenance recovered");
  } else {
    log::Warning(message);
  }
}

void KeyStore::MaintenanceLoop() {
  std::unique_lock<std::mutex> lock(thread_mu_);
  while (!stop_) {
    lock.unlock();
    {
      exit_guard::Activity activity;
      if (!activity.ok()) {
        // Parked until the store stops, as the re-armers are
        // (armed_pool.cc): the process is exiting.
        lock.lock();
        thread_cv_.wait(lock, [this] { return stop_; });
        return;
      }
      // The thread's own barrier: an exception leaving a std::thread's
      // body calls std::terminate, which would kill the host (an nginx
      // worker). A failed pass is retried on the next one.
      try {
        Maintain();
      } catch (...) {
        barrier::ReportCaught("store maintenance thread");
        exceptions_.fetch_add(1);  // last: an observer of it sees the report
      }
    }
    lock.lock();
    thread_cv_.wait_for(lock, std::chrono::seconds(1),
                        [this] { return stop_; });
  }
}

}  // namespace hsmstek::keystore
