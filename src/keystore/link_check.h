// Proof that a ratchet link found in the token follows from the chain.
//
// A PIN holder can C_CreateObject a key of known value with the store's
// label and a link's CKA_ID; adopted as a link, every later link would be
// derived from it and every later ticket opened offline. A link this
// process did not derive itself is therefore used only once its value is
// shown to be the successor of a verified neighbour (docs/DESIGN.md, key
// store: "Verified links").
#pragma once

#include <atomic>
#include <set>
#include <vector>

#include "keystore/master.h"
#include "pkcs11/token.h"

namespace hsmstek::keystore {

// LinkFollows returns whether `candidate` holds the value of link `index`
// derived from `previous`: that link is derived as a session object and the
// check values (ComputeCheckValue) of both are compared. No value leaves
// the token. 7 token calls for the derived link, 4 for each check value.
[[nodiscard]] Result<bool> LinkFollows(p11::Session &session,
                                       CK_OBJECT_HANDLE previous,
                                       uint64_t index,
                                       CK_OBJECT_HANDLE candidate,
                                       std::atomic<unsigned> *refused);

// The links one process has verified (or derived itself) in one token
// generation. Not thread-safe: the store uses it under its load lock.
class LinkTrust {
 public:
  // Keeps in `m.links` / `m.duplicate_links` only links proven to follow
  // one another from an anchor: the lowest link this process already
  // trusts, else the lowest link present. A link that does not follow (or
  // lies above a gap) and everything beyond it are left out and listed in
  // `skipped`. Results are remembered: in steady state only a link another
  // process derived since the last reload costs token calls.
  [[nodiscard]] Status Verify(p11::Session &session, Master &m,
                              std::vector<SkippedObject> *skipped,
                              std::atomic<unsigned> *refused);
  // `handle` was derived by this process in `session`'s generation.
  void Trust(const p11::Session &session, CK_OBJECT_HANDLE handle);
  // Whether `handle` is known to follow / known not to follow.
  bool Trusted(CK_OBJECT_HANDLE handle) const {
    return trusted_.count(handle) != 0;
  }
  bool Refused(CK_OBJECT_HANDLE handle) const {
    return refused_.count(handle) != 0;
  }
  // Records the outcome of a LinkFollows check.
  void Record(const p11::Session &session, CK_OBJECT_HANDLE handle, bool ok);

 private:
  void Sync(const p11::Session &session);

  uint64_t generation_ = 0;
  // (store id, index) verified in an earlier generation: after a reconnect
  // a single object at such an index is not checked again (a reconnect
  // must not cost the token calls a fault may be failing).
  std::set<std::pair<StoreId, uint64_t>> verified_before_;
  std::set<CK_OBJECT_HANDLE> trusted_;
  std::set<CK_OBJECT_HANDLE> refused_;
};

}  // namespace hsmstek::keystore
