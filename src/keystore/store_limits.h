// Limits that keep one store cheap for the token and the server however
// the token or the clients behave: a back-off between failed reloads, and
// a fixed bound on the derived key pairs a store keeps in the token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hsmstek::keystore {

// Derived key pairs (two session objects each) a store keeps in the token
// at most, whatever its masters' windows and periods: the current and next
// epoch of the active master, a pending master's first epoch, and the
// latest old epochs that tickets were presented for. Forged key names for
// every in-window epoch can thus cost derivations but never more than
// 2 * kMaxDerivedPairs objects (pairs evicted but not yet destroyed count;
// only a pinned epoch derived with the store full, e.g. the next epoch at a
// boundary, goes over, until the next maintenance pass).
// 16 leaves 13 old epochs cached; an older ticket costs one derivation
// more, or is declined (a full handshake) while evicted pairs wait out
// their maintenance pass.
inline constexpr size_t kMaxDerivedPairs = 16;

// ReloadBackoff: after a failed reload, the next one waits 1 s, doubling
// to `max_s`; a success resets it. Times come from the store's clock.
// Not thread-safe: the store calls it under its load lock.
class ReloadBackoff {
 public:
  bool Due(int64_t now) const { return now >= retry_at_; }
  void Failed(int64_t now, int64_t max_s);
  void Succeeded() {
    delay_s_ = 0;
    retry_at_ = 0;
  }

 private:
  int64_t delay_s_ = 0;
  int64_t retry_at_ = 0;
};

// Derivations of old epochs a store runs per second of its clock at most.
// The bound above keeps few old pairs, so forged names cycling through more
// in-window epochs than it holds would otherwise cost two derivations (and
// two destroys) on every handshake, on the event loop. Over budget, an old
// ticket is declined (a full handshake); the current and next epochs of the
// active master are never limited.
inline constexpr uint32_t kMaxOldDerivationsPerSecond = 8;

// Ratchet links a maintenance pass derives at most (a server back from a
// long pause catches up over several passes, one a second).
inline constexpr int kMaxRatchetSteps = 64;

// DerivationBudget counts old-epoch derivations per second. Not
// thread-safe: the store calls it under its load lock.
class DerivationBudget {
 public:
  bool Take(int64_t now);

 private:
  int64_t second_ = 0;
  uint32_t used_ = 0;
};

// A cached pair as the bound sees it.
struct CachedEpoch {
  int64_t epoch_start = 0;  // Unix time the pair's epoch began
  bool pinned = false;      // current/next of the active master, ...
};

// EvictionOrder returns the indexes of `entries` to evict so that at most
// `keep` remain, oldest epoch first, never a pinned one (so more than
// `keep` may remain when most are pinned).
std::vector<size_t> EvictionOrder(const std::vector<CachedEpoch> &entries,
                                  size_t keep);

}  // namespace hsmstek::keystore
