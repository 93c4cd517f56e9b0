#include "keystore/link_check.h"

#include <map>

#include "common/bytes.h"
#include "keystore/derivation.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {

Result<bool> LinkFollows(p11::Session &session, CK_OBJECT_HANDLE previous,
                         uint64_t index, CK_OBJECT_HANDLE candidate,
                         std::atomic<unsigned> *refused) {
  std::array<uint8_t, kDerivationDataSize> data =
      DerivationData(kPurposeRatchet, index);
  CK_KEY_DERIVATION_STRING_DATA params{data.data(),
                                       static_cast<CK_ULONG>(data.size())};
  CK_MECHANISM mechanism{CKM_AES_ECB_ENCRYPT_DATA, &params, sizeof(params)};
  // The master's template as a session object, with neither label nor id:
  // no other process can ever find or use it.
  KeySpec spec;
  spec.kind = KeyKind::kMaster;
  spec.for_derive = true;
  p11::Template base = KeyTemplate(spec, 0);
  p11::Template t;
  for (const CK_ATTRIBUTE &a : base.attributes()) {
    if (a.type == CKA_TOKEN) continue;
    t.Data(a.type,
           ByteSpan(static_cast<const uint8_t *>(a.pValue), a.ulValueLen));
  }
  t.Bool(CKA_TOKEN, false);
  CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
  Status s = P11_CALL(session, C_DeriveKey, session.handle(), &mechanism,
                      previous, t.data(), t.size(), &derived);
  if (!s.ok() && p11::IsHandleInvalid(s.ckr())) {
    return NotFound("ratchet link destroyed meanwhile");
  }
  if (!s.ok()) return s.WithContext("deriving a ratchet link to compare");
  p11::ScopedObject owner(session, derived);
  Result<std::array<uint8_t, kCheckValueSize>> want =
      ComputeCheckValue(session, derived, refused);
  if (!want.ok()) return want.status();
  Result<std::array<uint8_t, kCheckValueSize>> got =
      ComputeCheckValue(session, candidate, refused);
  // A key the derivation refuses (other mechanisms, no CKA_DERIVE) is no
  // link of ours; token trouble is reported as such.
  if (!got.ok()) {
    // Destroyed by another server since it was found: gone.
    if (p11::IsHandleInvalid(got.status().ckr())) {
      return NotFound("ratchet link destroyed meanwhile");
    }
    if (got.status().code() == ErrorCode::kUnavailable) return got.status();
    return false;
  }
  return ConstantTimeEqual(*want, *got);
}

void LinkTrust::Sync(const p11::Session &session) {
  if (session.generation() == generation_) return;
  // Handles of another generation mean nothing any more.
  generation_ = session.generation();
  trusted_.clear();
  refused_.clear();
}

void LinkTrust::Trust(const p11::Session &session, CK_OBJECT_HANDLE handle) {
  Record(session, handle, true);
}

void LinkTrust::Record(const p11::Session &session, CK_OBJECT_HANDLE handle,
                       bool ok) {
  Sync(session);
  (ok ? trusted_ : refused_).insert(handle);
}

Status LinkTrust::Verify(p11::Session &session, Master &m,
                         std::vector<SkippedObject> *skipped,
                         std::atomic<unsigned> *refused) {
  Sync(session);
  std::map<uint64_t, std::vector<CK_OBJECT_HANDLE>> candidates;
  for (const auto &[j, h] : m.links) candidates[j].push_back(h);
  for (const auto &[j, h] : m.duplicate_links) candidates[j].push_back(h);
  if (candidates.empty()) return Status::Ok();
  const std::string master = "master " + HexEncode(m.id);
  auto report = [&](uint64_t j, std::string reason) {
    if (skipped == nullptr) return;
    skipped->push_back({"ratchet link " + std::to_string(j) + " of " + master,
                        std::move(reason)});
  };
  // The anchor: the lowest link this process already trusts, else the
  // lowest present (a fresh process has nothing better; docs/SECURITY.md).
  uint64_t anchor = candidates.begin()->first;
  CK_OBJECT_HANDLE anchor_handle = candidates.begin()->second.front();
  bool found_trusted = false;
  for (const auto &[j, hs] : candidates) {
    for (CK_OBJECT_HANDLE h : hs) {
      if (!found_trusted && Trusted(h)) {
        anchor = j;
        anchor_handle = h;
        found_trusted = true;
      }
    }
  }
  // Several objects at the lowest index and none trusted yet: the one with
  // a successor that follows from it is the chain's.
  if (!found_trusted && candidates.begin()->second.size() > 1) {
    const uint64_t low = candidates.begin()->first;
    auto next = candidates.find(low + 1);
    anchor_handle = CK_INVALID_HANDLE;
    for (CK_OBJECT_HANDLE c : candidates.begin()->second) {
      if (next == candidates.end()) break;
      for (CK_OBJECT_HANDLE n : next->second) {
        Result<bool> follows = LinkFollows(session, c, low + 1, n, refused);
        if (!follows.ok()) return follows.status();
        if (*follows) anchor_handle = c;
        if (*follows) break;
      }
      if (anchor_handle != CK_INVALID_HANDLE) break;
    }
    if (anchor_handle == CK_INVALID_HANDLE) {
      // Nothing tells which one is the chain's: none is used.
      report(low,
             "several objects with this link's id and no later link to tell "
             "which follows from the chain (a planted key?); the master "
             "serves no tickets until resolved");
      m.links.clear();
      m.duplicate_links.clear();
      m.key = CK_INVALID_HANDLE;
      return Status::Ok();
    }
  }
  trusted_.insert(anchor_handle);

  std::map<uint64_t, CK_OBJECT_HANDLE> links{{anchor, anchor_handle}};
  std::vector<std::pair<uint64_t, CK_OBJECT_HANDLE>> duplicates;
  // Checks the candidates at `j` against the verified neighbour: `from`
  // derives `j` (upwards), or the candidate derives `to` (downwards).
  auto check = [&](uint64_t j, CK_OBJECT_HANDLE neighbour,
                   bool up) -> Result<bool> {
    CK_OBJECT_HANDLE chosen = CK_INVALID_HANDLE;
    for (CK_OBJECT_HANDLE c : candidates[j]) {
      if (c == anchor_handle) continue;
      bool ok;
      if (candidates[j].size() == 1 && verified_before_.count({m.id, j})) {
        trusted_.insert(c);
      }
      if (Trusted(c)) {
        ok = true;
      } else if (Refused(c)) {
        ok = false;
      } else {
        Result<bool> follows =
            up ? LinkFollows(session, neighbour, j, c, refused)
               : LinkFollows(session, c, j + 1, neighbour, refused);
        if (!follows.ok() && follows.status().code() == ErrorCode::kNotFound) {
          continue;  // destroyed meanwhile
        }
        // Token trouble (e.g. C_Sign failing after a reconnect): the link
        // stays in use unverified and is checked again at the next reload
        // (the ratchet never adopts a link it could not check).
        ok = !follows.ok() || *follows;
        if (follows.ok()) Record(session, c, ok);
      }
      if (!ok) {
        report(j,
               "its value does not follow from the chain (not derived by "
               "hsmstek: a planted key?); never used, not destroyed");
        continue;
      }
      if (chosen == CK_INVALID_HANDLE) {
        chosen = c;
        if (Trusted(c)) verified_before_.insert({m.id, j});
      } else {
        duplicates.emplace_back(j, c);
      }
    }
    if (chosen == CK_INVALID_HANDLE) return false;
    links[j] = chosen;
    return true;
  };
  // The anchor's own duplicates: same value as the anchor's successor...
  // cannot be shown without a neighbour; they are checked as candidates of
  // their index against the next link below.
  for (auto it = candidates.find(anchor); std::next(it) != candidates.end();
       ++it) {
    const uint64_t j = std::next(it)->first;
    if (j != it->first + 1) {
      for (auto rest = std::next(it); rest != candidates.end(); ++rest) {
        report(rest->first, "above a gap in the chain (no link " +
                                std::to_string(it->first + 1) + "); not used");
      }
      break;
    }
    Result<bool> ok = check(j, links.at(it->first), /*up=*/true);
    if (!ok.ok()) return ok.status();
    if (!*ok) {
      for (auto rest = std::next(it, 2); rest != candidates.end(); ++rest) {
        report(rest->first, "above a link that does not follow; not used");
      }
      break;
    }
  }
  for (auto it = candidates.find(anchor); it != candidates.begin(); --it) {
    const uint64_t j = std::prev(it)->first;
    if (j + 1 != it->first) break;  // older links only: left out
    Result<bool> ok = check(j, links.at(it->first), /*up=*/false);
    if (!ok.ok()) return ok.status();
    if (!*ok) break;
  }
  // Duplicates of the anchor: the same value as the anchor shows as
  // deriving the same successor; without a successor they stay unused.
  for (CK_OBJECT_HANDLE c : candidates[anchor]) {
    if (c == anchor_handle) continue;
    auto next = links.find(anchor + 1);
    bool ok = Trusted(c);
    if (!ok && !Refused(c) && next != links.end()) {
      Result<bool> follows =
          LinkFollows(session, c, anchor + 1, next->second, refused);
      if (!follows.ok()) return follows.status();
      ok = *follows;
      Record(session, c, ok);
    }
    if (ok) {
      duplicates.emplace_back(anchor, c);
    } else {
      report(anchor,
             "a second object with this link's id that cannot be "
             "shown to follow from the chain; never used");
    }
  }
  m.links = std::move(links);
  m.duplicate_links = std::move(duplicates);
  auto zero = m.links.find(0);
  m.key = zero == m.links.end() ? CK_INVALID_HANDLE : zero->second;
  return Status::Ok();
}

}  // namespace hsmstek::keystore
