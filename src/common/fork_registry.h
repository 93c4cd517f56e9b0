// Fork registry: makes fork() a normal event for every live object that
// holds a lock or PKCS#11 state (tokens, key stores, modules).
//
// One set of pthread_atfork handlers for the process. The prepare handler
// takes the locks of every registered participant, rank by rank, in the
// order every other code path nests them (below); the parent handler
// releases them; the child handler bumps the fork count first, lets each
// participant forget what belongs to the parent (without closing anything:
// it is the parent's), and releases. So a child never inherits a lock held
// by a thread that does not exist in it, and its first use of a token
// reconnects before any cached handle is used.
//
// Thread-safety: all functions are thread-safe.
#pragma once

#include <cstdint>

namespace hsmstek::atfork {

// Lock ranks in nesting order: a thread holding a lock of rank r only ever
// takes locks of a higher rank. The prepare handler takes rank 0 of every
// participant, then rank 1 of every participant, ...; participants never
// nest locks across objects of the same rank.
enum class Rank : uint8_t {
  kStoreLoad = 0,  // KeyStore::load_mu_ (held across token calls)
  kTokenObject,    // Token::object_mu_ (held across C_DeriveKey etc.)
  kTokenState,     // Token::mu_ (held while connecting: Module locks inside)
  kModule,         // Module::mu_
  kLeaf,           // locks under which nothing else is taken
};
inline constexpr int kRankCount = 5;

class Participant {
 public:
  // Takes this object's locks of `rank` (prepare handler).
  virtual void ForkPrepare(Rank rank) = 0;
  // Releases them in the parent, which keeps its state.
  virtual void ForkParent(Rank rank) = 0;
  // In the child: forgets the parent's state guarded by `rank`'s locks
  // (ForkCount() already counts this fork), then releases them. Must not
  // call into a PKCS#11 module or start threads.
  virtual void ForkChild(Rank rank) = 0;

 protected:
  ~Participant() = default;
};

// Register adds `p` (call once its locks exist). Unregister removes it;
// call it before taking any of `p`'s locks in its destructor, so a fork in
// progress finishes with `p` first.
void Register(Participant *p);
void Unregister(Participant *p);

// ForkCount counts the forks of this process's ancestry in which we ran:
// 0 in the original process, bumped in each child before any participant's
// child handler. Lock-free.
uint64_t ForkCount();

}  // namespace hsmstek::atfork
