// StoreSet: one store reached through several tokens that hold the same
// masters (replicated with `hsmstek export`/`import`, docs/CLI.md), used one
// at a time. Every member is its own KeyStore on its own Token: key handles
// belong to one token, so a ticket's keys always come from the member the
// handshake picked (Active) and are used on that member's token only.
//
// Failover: when the active member's token is failing (a fault dropped it,
// or a connect failed), the next verified member that is not failing
// becomes active; when a member earlier in the list is connected again
// (its prober reconnected it), the set fails back to it. Choosing costs no
// token round trip (atomic state reads only). Each move logs one line; a store
// with no usable member logs its outage through log::OutageLog (start, once a
// minute, end).
//
// Verification: Load() reads every reachable member's masters and their
// check values; a member whose masters differ from the first loaded one is
// refused (an error naming both check values), never used. A member
// unreachable at load is not verified and so never used in this process.
//
// Thread-safety: all methods are thread-safe. Holds no lock (atomics only),
// so it has nothing to do at fork; its KeyStores and Tokens handle theirs.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/outage_log.h"
#include "common/status.h"
#include "keystore/store.h"

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

  // Load loads every member and verifies their masters against the first
  // member that loads. Errors: kFailedPrecondition naming both check values
  // for a member with different masters (the set is unusable until the
  // configuration is fixed), or the first member's error when none loads.
  // A member that cannot be reached is skipped (not verified).
  [[nodiscard]] Status Load();

  // Active returns the member to use for this handshake, failing over or
  // back first if the token states call for it. Never null.
  std::shared_ptr<KeyStore> Active();

  // Served reports a handshake's outcome with `store` (from Active):
  // `token_trouble` when no ticket was sealed or opened because of the
  // token (`cause` says why). Drives failover and the outage log, which
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
  struct Member {
    std::shared_ptr<KeyStore> store;
    std::atomic<bool> verified{false};
    std::atomic<uint64_t> failovers{0};
  };
  explicit StoreSet(std::vector<std::shared_ptr<KeyStore>> stores);
  // "token <label> (serial <serial>)" of member i, or "token #i".
  std::string Name(size_t i) const;
  // A member handshakes may move to: verified, not failing (a member not
  // connected yet in this process, e.g. a forked worker, connects on use).
  bool Usable(size_t i) const;
  // A member to move back to: verified, connected, not failing.
  bool Recovered(size_t i) const;
  // Moves from `from` to `to` if `from` is still active; logs the move.
  bool MoveTo(size_t from, size_t to, bool failback);

  std::vector<Member> members_;
  std::atomic<size_t> active_{0};
  std::atomic<uint64_t> total_failovers_{0};
  log::OutageLog outage_;
};

}  // namespace hsmstek::keystore
