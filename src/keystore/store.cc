#include "keystore/store.h"

#include <algorithm>
#include <climits>
#include <new>

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
  return view.status();
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

Status KeyStore::ReloadLocked() {
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) return session.status();
  std::vector<SkippedObject> skipped;
  Result<std::vector<Master>> masters = LoadMasters(*session, label_, &skipped);
  if (!masters.ok()) return masters.status();
  Result<std::vector<LegacyKeyObjects>> legacy =
      LoadLegacyKeys(*session, label_, &skipped);
  if (!legacy.ok()) return legacy.status();
  LogSkippedLocked(skipped);
  last_reload_error_ = Status::Ok();

  auto view = std::make_shared<View>();
  view->skipped = std::move(skipped);
  view->generation = session->generation();
  view->loaded_at = options_.clock->NowUnix();
  view->masters = std::move(*masters);
  view->legacy = std::move(*legacy);
  std::lock_guard<std::mutex> lock(mu_);
  if (!view_ || view_->generation != view->generation) {
    // Handles of another generation are dead: forget them, never reuse.
    cache_.clear();
  }
  view_ = view;
  reloads_.fetch_add(1);
  return Status::Ok();
}

Result<TicketKeys> KeyStore::KeysFor(const View &view, const Master &master,
                                     uint64_t epoch, bool old) {
  KeyName name = MakeKeyName(master.id, epoch);
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
    return Unavailable("store \"" + label_ + "\": more than " +
                       std::to_string(kMaxOldDerivationsPerSecond) +
                       " derivations of old epochs this second; ticket "
                       "declined (full handshake)");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!MakeRoomLocked(view, options_.clock->NowUnix(), old)) {
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
    Result<DerivedKeys> keys =
        DeriveEpochKeys(session, master.key, epoch, &refused_lockdown_);
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

  const Master *master = FindMaster(v.masters, KeyNameStoreId(name));
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
  const uint64_t e = KeyNameEpoch(name);
  const uint64_t window_epochs =
      static_cast<uint64_t>(policy.decrypt_window_s / policy.period_s);
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
  } else if (n - e <= window_epochs) {
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
  Result<TicketKeys> keys =
      KeysFor(v, *master, e, /*old=*/verdict == DecryptVerdict::kOld);
  if (!keys.ok()) {
    out.verdict = DecryptVerdict::kUnavailable;
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
        uint64_t window_epochs = static_cast<uint64_t>(
            m->policy.decrypt_window_s / m->policy.period_s);
        keep = e.epoch + window_epochs >= n && e.epoch <= n + 1;
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

void KeyStore::Maintain() {
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) {
    ReportBackground(view.status());
    return;
  }
  Status first_error;
  const View &v = **view;
  const int64_t now = options_.clock->NowUnix();
  std::vector<MasterState> states = ComputeStates(v.masters, now);
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
      Result<TicketKeys> keys =
          KeysFor(v, m, EpochAt(m.policy.not_before, m.policy.period_s));
      if (!keys.ok() && first_error.ok()) first_error = keys.status();
    }
  }
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
    info.current_name = MakeKeyName(m.id, info.current_epoch);
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
    const StoreId &id) {
  Result<std::shared_ptr<const View>> view = CurrentView(false);
  if (!view.ok()) return view.status();
  const Master *master = FindMaster((*view)->masters, id);
  if (master == nullptr) {
    return NotFound("no master " + HexEncode(id) + " in store " +
                    QuoteForMessage(label_));
  }
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) return session.status();
  if (session->generation() != (*view)->generation) {
    return Unavailable("token reconnected; try again");
  }
  return ComputeCheckValue(*session, master->key, &refused_lockdown_);
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
