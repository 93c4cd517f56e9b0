// KeyStore: the server-side view of one store (a label in one token).
//
// It finds the store's masters and legacy keys, computes their states from
// the policies and the injected clock, derives per-epoch keys inside the
// token on demand, and caches their handles by key name (bounded: decrypt
// window / period + 3 per master, the skew grace included). A maintenance
// pass (a background thread by default, or Maintain() from tests) re-reads
// the token every refresh interval, moves the forward-secure ratchet (links
// derived ahead, unused ones destroyed), keeps the table of acceptable key
// names, derives the next epoch's keys ahead of the boundary and evicts
// keys that left the window. Opaque names and the ratchet: docs/DESIGN.md.
//
// Handles are only valid for one token generation: after a reconnect (or in
// a forked child) everything is reloaded, never reused.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/fork_registry.h"
#include "keystore/derivation.h"
#include "keystore/link_check.h"
#include "keystore/master.h"
#include "keystore/store_limits.h"
#include "pkcs11/token.h"

namespace hsmstek::keystore {

struct StoreOptions {
  // Must outlive the store.
  const Clock *clock = &SystemClock::Instance();
  p11::TokenOptions token;
  // How often masters, policies and legacy keys are re-read from the token
  // (picks up rotations, retirements and imports from other processes).
  int64_t refresh_interval_s = 30;
  // Seconds a ticket's epoch may be ahead of this server's clock.
  int64_t clock_skew_s = 60;
  // Monotonic seconds for the ratchet's destruction rate limit; nullptr:
  // this process's steady clock. Tests pass a fake clock. Must outlive the
  // store.
  const Clock *steady_clock = nullptr;
  // Run maintenance on a background thread (started on first use, and
  // again in a forked child). Tests turn it off and call Maintain().
  bool background_maintenance = true;
};

// Handles of the keys for one ticket: no key bytes, only what the token
// needs to run the operation, valid for `generation`.
struct TicketKeys {
  KeyName name;
  CK_OBJECT_HANDLE aes = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE hmac = CK_INVALID_HANDLE;
  uint64_t generation = 0;
  // The decrypt window of the issuing master (caps the ticket lifetime).
  int64_t decrypt_window_s = 0;
};

// What the store says about a ticket's key name (docs/FORMAT.md, "Accepting a
// ticket").
enum class DecryptVerdict : uint8_t {
  kCurrent,     // current epoch of the active master (or next, within skew)
  kOld,         // inside the decrypt window, a superseded master, or legacy
  kUnknownKey,  // not one of our names
  kExpired,     // older than the decrypt window, retired, or legacy expired
  kFuture,      // epoch beyond the clock-skew tolerance
  // An old epoch's keys would have to be derived past the store's budget
  // (a flood of old names): declined, the token is fine.
  kDeclined,
  kUnavailable,  // the token could not be used
};

struct DecryptLookup {
  DecryptVerdict verdict = DecryptVerdict::kUnknownKey;
  TicketKeys keys;  // set for kCurrent and kOld
  Status error;     // set for kUnavailable and kDeclined
};

struct MasterInfo {
  StoreId id{};
  Policy policy;
  KeyState state = KeyState::kRetired;
  std::optional<int64_t> superseded_at;
  bool extractable = false;
  uint64_t current_epoch = 0;
  // The name of the current epoch (all zero when it could not be computed:
  // its link is gone, or the token failed).
  KeyName current_name;
  int64_t next_rotation = 0;  // start of the next epoch
  Protections protections;    // as read back
  // Ratchet (docs/DESIGN.md): periods per link, the current epoch's link
  // (nullopt before activation), the links present in the token, and the
  // forward-secrecy horizon: the start of the oldest epoch whose tickets
  // this token can still open (nullopt: no link left).
  uint64_t ratchet_periods = 0;
  std::optional<uint64_t> current_link;
  std::vector<uint64_t> links;
  std::optional<int64_t> horizon;
};

// The forward secrecy of a store as of the last maintenance pass: read
// without a token call (status pages, the C API). Published while the store
// has an active master.
struct ForwardSecrecy {
  StoreId master{};  // the active master
  // The link serving the current epoch and its check value (docs/FORMAT.md;
  // all zero when the token failed to compute it or the link is gone).
  uint64_t current_link = 0;
  std::array<uint8_t, kCheckValueSize> check{};
  // The oldest moment whose tickets the token can still open: the first
  // epoch of the oldest link of any master in the token (superseded and
  // retired ones included), 0 while a legacy key is present (it opens
  // tickets of any age).
  int64_t horizon = 0;
  uint64_t links_held = 0;   // links of the active master in the token
  uint64_t legacy_keys = 0;  // legacy keys in the token
  int64_t as_of = 0;         // when the token was read
};

struct LegacyInfo {
  KeyName name;
  int64_t expires = 0;
  std::string format;
  size_t aes_key_bytes = 0;
  Protections protections;
};

struct StoreSnapshot {
  std::string label;
  int64_t now = 0;
  std::vector<MasterInfo> masters;
  std::vector<LegacyInfo> legacy;
  // Objects with the store's label that were left out, and why.
  std::vector<SkippedObject> skipped;
};

class KeyStore final : public atfork::Participant {
 public:
  // Opens the store named by `uri` (an RFC 7512 URI whose `object` is the
  // store label). Fails at once on a bad URI, a missing `object`, or a
  // module that cannot be loaded; the token itself is reached lazily.
  [[nodiscard]] static Result<std::shared_ptr<KeyStore>> Open(
      std::string_view uri, StoreOptions options = {});

  ~KeyStore();
  KeyStore(const KeyStore &) = delete;

  // Fork participant: load_mu_ (rank kStoreLoad), mu_ and thread_mu_
  // (kLeaf) are held across fork. The child forgets the parent's
  // maintenance thread (the next use starts its own); its view and cached
  // handles are already stale through the token's new generation.
  void ForkPrepare(atfork::Rank rank) override;
  void ForkParent(atfork::Rank rank) override;
  void ForkChild(atfork::Rank rank) override;
  KeyStore &operator=(const KeyStore &) = delete;

  // Connects if needed, (re)reads masters and legacy keys now and runs one
  // maintenance pass (ratchet, name table, current and next epoch keys);
  // errors of that pass are logged, not returned.
  [[nodiscard]] Status Load();

  // KeysForEncrypt returns the current epoch's keys of the active master,
  // deriving them if needed. Errors: kFailedPrecondition (no active
  // master), kUnavailable (token trouble), ...
  [[nodiscard]] Result<TicketKeys> KeysForEncrypt();

  // KeysForDecrypt classifies `name` by docs/FORMAT.md, "Accepting a ticket"
  // and, when the ticket may be accepted, returns its keys.
  DecryptLookup KeysForDecrypt(const KeyName &name);

  // One maintenance pass: refresh if due, derive the next epoch ahead of
  // the boundary, evict keys outside the window.
  void Maintain();

  // Describes masters (with states) and legacy keys, reloading if stale.
  [[nodiscard]] Result<StoreSnapshot> Describe();

  // Computes the check value of master `id` (docs/FORMAT.md) on the link of the
  // current epoch (the oldest link present before activation). Two tokens
  // at the same link show the same value. `*link` gets its index.
  [[nodiscard]] Result<std::array<uint8_t, kCheckValueSize>> CheckValue(
      const StoreId &id, uint64_t *link = nullptr);

  // NameOf returns the key name of `epoch` of master `id`: from the name
  // table, else computed in the token (one derivation and one C_Sign; never
  // called on the decrypt path). kNotFound when the epoch's link is gone.
  [[nodiscard]] Result<KeyName> NameOf(const StoreId &id, uint64_t epoch);

  // The active master's forward secrecy as the last maintenance pass saw
  // it (nullopt before one ran with an active master, or after one found
  // none). No token call: a maintenance pass computes the check value
  // once per new link (4 token calls), off the handshake path.
  std::optional<ForwardSecrecy> forward_secrecy() const;

  // Number of names in the name table (for tests of the bound).
  size_t known_names() const;

  const std::string &label() const { return label_; }
  const std::shared_ptr<p11::Token> &token() const { return token_; }
  const Clock &clock() const { return *options_.clock; }
  const StoreOptions &options() const { return options_; }
  void set_clock_skew(int64_t seconds) { clock_skew_s_.store(seconds); }

  // Counters since open.
  uint64_t derivations() const { return derivations_.load(); }
  // Ratchet links derived and destroyed by this store.
  uint64_t links_derived() const { return links_derived_.load(); }
  uint64_t links_destroyed() const { return links_destroyed_.load(); }
  uint64_t reloads() const { return reloads_.load(); }
  // Exceptions stopped inside the store (a failed maintenance thread start).
  uint64_t exceptions() const { return exceptions_.load(); }
  // Number of cached epoch keys (for tests of the bound).
  size_t cached_keys() const;
  // CKA_ALLOWED_MECHANISMS on the keys this store derives: kApplied, or
  // kUnsupported once the token refused it.
  Protection derived_allowed_mechanisms() const {
    return (refused_lockdown_.load() & kLockAllowedMechanisms)
               ? Protection::kUnsupported
               : Protection::kApplied;
  }

 private:
  struct View {
    uint64_t generation = 0;
    int64_t loaded_at = 0;
    std::vector<Master> masters;
    std::vector<LegacyKeyObjects> legacy;
    std::vector<SkippedObject> skipped;
  };
  // One entry of the name table: the names of every epoch a server may
  // accept, computed in maintenance so that an unknown name costs no token
  // call.
  struct NameEntry {
    std::array<uint8_t, kKeyNameSize> name{};
    StoreId master{};
    uint64_t epoch = 0;
  };
  struct CacheEntry {
    DerivedKeys keys;
    uint64_t generation = 0;
    StoreId master{};
    uint64_t epoch = 0;
  };
  using NameBytes = std::array<uint8_t, kKeyNameSize>;

  KeyStore(std::string label, std::shared_ptr<p11::Token> token,
           StoreOptions options);

  // Returns a view whose handles belong to the token's current generation,
  // reloading when stale, disconnected or due.
  Result<std::shared_ptr<const View>> CurrentView(bool force_reload);
  Status ReloadLocked();
  // LoadMasters, keeping only the links LinkTrust verifies (load_mu_ held).
  Result<std::vector<Master>> LoadVerifiedLocked(
      p11::Session &session, std::vector<SkippedObject> *skipped);
  // Whether a reload may run now (load_mu_ held): not during the back-off
  // after a failed one, unless the token reconnected since.
  bool ReloadDueLocked() const;
  void LogSkippedLocked(const std::vector<SkippedObject> &skipped);
  // Makes room for one more derived pair under kMaxDerivedPairs (mu_
  // held) by evicting cached pairs, destroyed a maintenance pass later.
  // False when an `old` epoch must wait for that.
  bool MakeRoomLocked(const View &view, int64_t now, bool old);
  // `old`: a derivation for an old epoch, under kMaxOldDerivationsPerSecond.
  // `*declined` (if given) is set when it failed on a budget (that one or
  // the bound on derived pairs), not on the token.
  Result<TicketKeys> KeysFor(const View &view, const Master &master,
                             uint64_t epoch, bool old = false,
                             bool *declined = nullptr);
  void EvictLocked(const View &view, int64_t now);
  // The oldest epoch of `m` still acceptable at `now` (decrypt window plus
  // the skew grace, never before activation).
  uint64_t OldestAcceptable(const Master &m, int64_t now) const;
  // Ratchet maintenance of one master: derives links forward up to the one
  // of the next epoch, destroys links (and duplicates) no acceptable epoch
  // uses. True when it changed the token (the view must be reloaded).
  // `destroy` false: derive only (a reload does that; the maintenance pass
  // destroys).
  // When a retired (or superseded) master's links may all go: its last
  // issuing second plus the decrypt window plus the skew grace.
  int64_t SpentAt(const Master &m, const MasterState &state) const;
  // Destroys every link of `m` (link 0 too), keeping its policy object.
  bool SpendLocked(const View &view, const Master &m, Status *error);
  // Destroys every copy of link `j` of master `id` found by id now (link 0
  // is the master); already gone counts as done. False if the search
  // failed (`*error` set); a failed destroy sets `*error` and goes on.
  bool DestroyLinkCopies(p11::Session &session, const StoreId &id, uint64_t j,
                         std::string_view what, Status *error);
  bool RatchetLocked(const View &view, const Master &m,
                     const MasterState &state, int64_t now, bool destroy,
                     Status *error);
  // Brings the name table to the epochs each master may accept at `now`
  // (computing the missing names in the token, dropping the others).
  Status RefreshNames(const View &view, int64_t now);
  // Computes the names of [first, last] of `m` missing from the table.
  Status ComputeNames(const View &view, const Master &m, uint64_t first,
                      uint64_t last);
  // The cached name of (master, epoch), if any (mu_ held).
  std::optional<KeyName> CachedNameLocked(const StoreId &id,
                                          uint64_t epoch) const;
  // Destroys evicted key pairs that have waited a full maintenance pass.
  void DestroyEvicted(uint64_t pass);
  // Starts the maintenance thread if this process has none. Never throws.
  void EnsureMaintenanceThread();
  // Logs a maintenance error once per cause (and the recovery once).
  void ReportBackground(const Status &status);
  void MaintenanceLoop();

  const std::string label_;
  const std::shared_ptr<p11::Token> token_;
  const StoreOptions options_;
  std::atomic<int64_t> clock_skew_s_;

  std::mutex load_mu_;     // serialises reloads and derivations
  mutable std::mutex mu_;  // guards view_ and cache_
  std::shared_ptr<const View> view_;
  std::map<NameBytes, CacheEntry> cache_;
  std::vector<NameEntry> names_;  // guarded by mu_
  // Guarded by mu_; `fs_generation_` is the token generation its check
  // value was computed in.
  std::optional<ForwardSecrecy> fs_;
  uint64_t fs_generation_ = 0;
  std::atomic<bool> fs_refreshing_{false};
  // Refreshes fs_ from `view` at `now` (maintenance only).
  Status RefreshForwardSecrecy(const View &view, int64_t now);
  // Pairs evicted from cache_ (guarded by mu_), destroyed in the token a
  // maintenance pass later: session objects would otherwise pile up, two
  // per epoch, until the session closes.
  struct Evicted {
    DerivedKeys keys;
    uint64_t generation = 0;
    uint64_t pass = 0;
  };
  std::vector<Evicted> evicted_;
  uint64_t maintenance_passes_ = 0;  // guarded by mu_

  std::atomic<uint64_t> derivations_{0};
  std::atomic<uint64_t> reloads_{0};
  std::atomic<uint64_t> links_derived_{0};
  std::atomic<uint64_t> links_destroyed_{0};
  // Lock-down attributes the token refused on derived keys (CreateKey).
  std::atomic<unsigned> refused_lockdown_{0};

  // Guarded by load_mu_.
  ReloadBackoff reload_backoff_;
  DerivationBudget old_derivations_;
  Status last_reload_error_;
  uint64_t failed_generation_ = 0;
  std::set<std::string> logged_skips_;  // logged once each
  LinkTrust link_trust_;
  // Per master: when this process last destroyed a link (or saw its clock
  // jump ahead of the token), on the steady clock. See RatchetLocked.
  struct DestroyGuard {
    bool armed = false;
    int64_t since = 0;
    bool jump_logged = false;
  };
  std::map<StoreId, DestroyGuard> destroy_guard_;
  int64_t SteadyNow() const;
  std::atomic<uint64_t> exceptions_{0};

  std::mutex thread_mu_;
  std::condition_variable thread_cv_;
  bool stop_ = false;
  std::thread *thread_ = nullptr;  // leaked in a forked child, see .cc
  uint64_t thread_fork_count_ = 0;
  std::string last_background_error_;  // guarded by thread_mu_
  // ForkCount()+1 of the process that runs the maintenance thread (0: none
  // yet): lets EnsureMaintenanceThread skip thread_mu_ on every ticket.
  std::atomic<uint64_t> thread_running_for_{0};
};

}  // namespace hsmstek::keystore
