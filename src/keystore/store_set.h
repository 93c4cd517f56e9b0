// StoreSet: one store reached through several tokens that hold the same
// masters (replicated with `hsmstek export`/`import`, docs/CLI.md), used one
// at a time. Every member is its own KeyStore on its own Token: key handles
// belong to one token, so a ticket's keys always come from the member the
// handshake picked (Active) and are used on that member's token only.
//
// Failover: when the active member's token is failing (a fault dropped it,
// or a connect failed) or its view is no longer verified, the next usable
// member becomes active; the set fails back to an earlier member once its
// token has been connected, without a fault, for a hold-down (kHoldDown)
// and, for a member other than the first, its view is verified. Choosing
// costs no token round trip (atomic reads only). Each move logs one line; a
// store with no usable member logs its outage through log::OutageLog
// (start, once a minute, end). Failover follows the token state only:
// other errors (no active master, ...) do not move the set.
//
// Verification: the first member is the reference, always. Every other
// member is usable only while pinned: its masters (ids, policies, check
// values of the non-retired ones) and legacy keys were found equal to the
// reference's at the token generation and reload count it has now. Any
// reconnect or reload of a member (its 30 s refresh included), or a change
// of the reference's content, unpins it until a background pass (one
// thread per set, token round trips there only) has compared it again; a
// member that differs stays refused (not verified, never chosen) and is
// logged once per difference. A member can only be verified against a
// reference read in this process: while the first member has never
// answered, no other member is used. A new master is therefore usable on
// a secondary only once it is on every token (docs/SECURITY.md).
//
// Thread-safety: all methods are thread-safe. verify_mu_ (rank kLeaf, held
// only to copy or compare the cached reference) follows
// common/fork_registry.h; the verification thread is a Prober (prober.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/fork_registry.h"
#include "common/outage_log.h"
#include "common/status.h"
#include "keystore/store.h"
#include "pkcs11/prober.h"

namespace hsmstek::keystore {

// Health of one member, as this process sees it (no token round trip).
struct MemberHealth {
  // "token <label> (serial <serial>)", or "token #<n>" before connect.
  std::string token;
  bool verified = false;
  bool active = false;
  p11::TokenHealth health;
  uint64_t failovers = 0;  // times the set moved away from this member
};

class StoreSet {
 public:
  // Open opens one KeyStore per URI (each with `options`); the first URI is
  // the preferred member. Fails on an empty list or any URI KeyStore::Open
  // rejects; touches no token (call Load).
  [[nodiscard]] static Result<std::shared_ptr<StoreSet>> Open(
      const std::vector<std::string> &uris, StoreOptions options = {});
  // Of wraps existing stores (the first preferred); none may be null.
  [[nodiscard]] static Result<std::shared_ptr<StoreSet>> Of(
      std::vector<std::shared_ptr<KeyStore>> stores);

  // Load loads every member, reads the first member's masters as the
  // reference and verifies every other member against it, then starts the
  // background verification. Errors: the first member's own error (no
  // other member is used until it answers and they are verified), or
  // kFailedPrecondition naming both check values for a member with
  // different masters (that member stays refused; the others are used).
  // A member that cannot be reached is verified later in the background.
  [[nodiscard]] Status Load();

  // One verification pass now (what the background thread runs each
  // second; tests). Token round trips: for each member whose pin is stale,
  // Describe plus one derivation per non-retired master.
  void VerifyNow();

  // Active returns the member to use for this handshake, failing over or
  // back first if the token states call for it. Never null.
  std::shared_ptr<KeyStore> Active();

  // Served reports a handshake's outcome with `store` (from Active):
  // `token_trouble` when no ticket was sealed or opened because of the
  // token (`cause` says why). Feeds the outage log (failover itself follows
  // the token state, see above), which
  // counts handshakes by their seals (`seal`): every full handshake and
  // most resumptions seal once, an open that failed is followed by a seal.
  void Served(const KeyStore &store, bool token_trouble, std::string_view cause,
              bool seal = true);

  size_t size() const { return members_.size(); }
  const std::shared_ptr<KeyStore> &member(size_t i) const {
    return members_[i].store;
  }
  const std::shared_ptr<KeyStore> &primary() const { return members_[0].store; }
  MemberHealth Health(size_t i) const;
  uint64_t failovers() const { return total_failovers_.load(); }
  const log::OutageLog &outage() const { return outage_; }

 private:
  // What must be equal on every token of the store.
  struct MasterView {
    Policy policy;
    std::optional<std::array<uint8_t, kCheckValueSize>> check;  // not retired
    bool operator==(const MasterView &) const = default;
  };
  struct Content {
    std::map<StoreId, MasterView> masters;
    std::optional<StoreId> active;
    std::vector<std::pair<KeyName, int64_t>> legacy;  // name, expires
    bool operator==(const Content &) const = default;
  };
  // A member's view as of a token generation and reload count.
  struct Pin {
    uint64_t generation = 0;
    uint64_t reloads = 0;
    bool operator==(const Pin &) const = default;
  };
  struct Member {
    std::shared_ptr<KeyStore> store;
    std::atomic<bool> verified{false};
    // Valid with verified: the view compared, and the reference version.
    std::atomic<uint64_t> pin_generation{0};
    std::atomic<uint64_t> pin_reloads{0};
    std::atomic<uint64_t> pin_reference{0};
    std::atomic<uint64_t> failovers{0};
    std::string last_refusal;  // guarded by verify_mu_
  };
  class ForkHook final : public atfork::Participant {
   public:
    explicit ForkHook(std::mutex &mu) : mu_(mu) { atfork::Register(this); }
    ~ForkHook() { atfork::Unregister(this); }
    void ForkPrepare(atfork::Rank rank) override {
      if (rank == atfork::Rank::kLeaf) mu_.lock();
    }
    void ForkParent(atfork::Rank rank) override {
      if (rank == atfork::Rank::kLeaf) mu_.unlock();
    }
    void ForkChild(atfork::Rank rank) override {
      if (rank == atfork::Rank::kLeaf) mu_.unlock();
    }

   private:
    std::mutex &mu_;
  };
  explicit StoreSet(std::vector<std::shared_ptr<KeyStore>> stores);
  static Pin PinOf(const KeyStore &store);
  static Result<Content> ReadContent(KeyStore &store);
  // Compares member i (> 0) with the reference; returns the refusal.
  Status VerifyMember(size_t i, bool log_refusal);
  // Re-reads the reference if its pin is stale.
  Status RefreshReference();
  // Member i is pinned to its current view and the current reference.
  bool Pinned(size_t i) const;
  // "token <label> (serial <serial>)" of member i, or "token #i".
  std::string Name(size_t i) const;
  // A member handshakes may move to: verified, not failing (a member not
  // connected yet in this process, e.g. a forked worker, connects on use).
  bool Usable(size_t i) const;
  // A member to move back to: usable, connected for kHoldDown since its
  // last fault or connect.
  bool Recovered(size_t i) const;
  // Moves from `from` to `to` if `from` is still active; logs the move.
  bool MoveTo(size_t from, size_t to, bool failback);

  std::vector<Member> members_;
  std::atomic<size_t> active_{0};
  std::atomic<uint64_t> total_failovers_{0};
  log::OutageLog outage_;

  mutable std::mutex verify_mu_;  // guards reference_; rank kLeaf
  std::optional<Content> reference_;
  Pin reference_pin_;  // guarded by verify_mu_
  // Bumped when the reference's content changes (0: never read).
  std::atomic<uint64_t> reference_version_{0};
  ForkHook fork_hook_{verify_mu_};
  // Starts the verification thread if this process has none yet (after
  // Load, and on the first Active() in a forked child).
  void EnsureVerifier();
  // ForkCount()+1 of the process whose verifier was scheduled (0: none).
  std::atomic<uint64_t> verifier_for_{0};
  // Last member: destroyed (its thread joined) first.
  std::unique_ptr<p11::Prober> verifier_;
};

}  // namespace hsmstek::keystore
