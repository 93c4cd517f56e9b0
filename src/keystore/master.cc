#include "keystore/master.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "keystore/time_format.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {

std::string_view KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kPending:
      return "pending";
    case KeyState::kActive:
      return "active";
    case KeyState::kDecryptOnly:
      return "decrypt-only";
    case KeyState::kRetired:
      return "retired";
    default:
      return "unknown";
  }
}

std::vector<MasterState> ComputeStates(const std::vector<Master> &masters,
                                       int64_t now) {
  // A spent master (no link left) is retired whatever its policy says.
  auto retired = [now](const Master &m) {
    return m.links.empty() ||
           (m.policy.retire_at && *m.policy.retire_at <= now);
  };
  // Activated, unretired masters, newest first: the first one encrypts.
  std::vector<size_t> live;
  for (size_t i = 0; i < masters.size(); ++i) {
    if (!retired(masters[i]) && masters[i].policy.not_before <= now) {
      live.push_back(i);
    }
  }
  std::sort(live.begin(), live.end(), [&](size_t a, size_t b) {
    const Policy &pa = masters[a].policy;
    const Policy &pb = masters[b].policy;
    if (pa.not_before != pb.not_before) return pa.not_before > pb.not_before;
    if (pa.created_at != pb.created_at) return pa.created_at > pb.created_at;
    return masters[a].id > masters[b].id;
  });

  std::vector<MasterState> out(masters.size(),
                               MasterState{KeyState::kRetired, std::nullopt});
  for (size_t i = 0; i < masters.size(); ++i) {
    if (!retired(masters[i]) && masters[i].policy.not_before > now) {
      out[i].state = KeyState::kPending;
    }
  }
  for (size_t rank = 0; rank < live.size(); ++rank) {
    size_t i = live[rank];
    if (rank == 0) {
      out[i].state = KeyState::kActive;
      continue;
    }
    // Superseded when the next newer live master activated.
    int64_t superseded_at = masters[live[rank - 1]].policy.not_before;
    out[i].superseded_at = superseded_at;
    out[i].state = now < superseded_at + masters[i].policy.decrypt_window_s
                       ? KeyState::kDecryptOnly
                       : KeyState::kRetired;
  }
  return out;
}

uint64_t Master::first_epoch() const {
  return EpochAt(policy.not_before, policy.period_s);
}

std::optional<uint64_t> Master::LinkOf(uint64_t epoch) const {
  return LinkIndex(epoch, first_epoch(), RatchetPeriods(policy));
}

CK_OBJECT_HANDLE Master::LinkFor(uint64_t epoch) const {
  std::optional<uint64_t> j = LinkOf(epoch);
  if (!j) return CK_INVALID_HANDLE;
  auto it = links.find(*j);
  return it == links.end() ? CK_INVALID_HANDLE : it->second;
}

Status VerifyMasterAttributes(p11::Session &session, CK_OBJECT_HANDLE key,
                              bool replicable, std::string_view what) {
  KeySpec spec;
  spec.kind = KeyKind::kMaster;
  spec.replicable = replicable;
  return VerifyKey(session, key, spec, what).status();
}

Result<Policy> MostRestrictive(const std::vector<Policy> &policies) {
  // Field by field, not one whole policy: a policy with an earlier
  // retire-at must not bring in a longer window or an earlier activation.
  Policy out = policies.front();
  for (const Policy &p : policies) {
    if (p.period_s != out.period_s || p.kdf != out.kdf ||
        RatchetPeriods(p) != RatchetPeriods(out)) {
      return FailedPrecondition(
          "policy objects that disagree on the period, the ratchet or the "
          "derivation");
    }
    if (p.retire_at && (!out.retire_at || *p.retire_at < *out.retire_at)) {
      out.retire_at = p.retire_at;
    }
    out.decrypt_window_s = std::min(out.decrypt_window_s, p.decrypt_window_s);
    out.not_before = std::max(out.not_before, p.not_before);
    out.replicable = out.replicable && p.replicable;
    out.created_at = std::max(out.created_at, p.created_at);
  }
  return out;
}

namespace {

// Finds objects matching `tmpl` with the value of their id attribute
// (CKA_ID for keys, CKA_OBJECT_ID for data objects).
Result<std::vector<std::pair<Bytes, CK_OBJECT_HANDLE>>> FindById(
    p11::Session &session, p11::Template &tmpl, CK_ATTRIBUTE_TYPE id_type) {
  Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(session, tmpl);
  if (!found.ok()) return found.status();
  std::vector<std::pair<Bytes, CK_OBJECT_HANDLE>> out;
  for (CK_OBJECT_HANDLE h : *found) {
    Result<Bytes> id = p11::ReadAttribute(session, h, id_type);
    // Destroyed by another server since the search: gone, not a fault.
    if (!id.ok() && p11::IsHandleInvalid(id.status().ckr())) continue;
    if (!id.ok()) return id.status();
    out.emplace_back(std::move(*id), h);
  }
  return out;
}

}  // namespace

Result<std::vector<Master>> LoadMasters(p11::Session &session,
                                        std::string_view label,
                                        std::vector<SkippedObject> *skipped) {
  // Other servers destroy ratchet links at any time.
  p11::ObjectsMayVanish vanish;
  p11::Template keys;
  keys.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .String(CKA_LABEL, label);
  Result<std::vector<std::pair<Bytes, CK_OBJECT_HANDLE>>> key_objects =
      FindById(session, keys, CKA_ID);
  if (!key_objects.ok()) return key_objects.status();

  p11::Template policies;
  policies.Ulong(CKA_CLASS, CKO_DATA)
      .String(CKA_APPLICATION, kPolicyApplication)
      .String(CKA_LABEL, label);
  Result<std::vector<std::pair<Bytes, CK_OBJECT_HANDLE>>> policy_objects =
      FindById(session, policies, kDataIdAttribute);
  if (!policy_objects.ok()) return policy_objects.status();

  auto skip = [skipped](std::string what, std::string reason) {
    if (skipped != nullptr)
      skipped->push_back({std::move(what), std::move(reason)});
  };
  // Store ids with a policy object: a 16-byte key id starting with one is
  // a ratchet link, any other 16-byte id a legacy key.
  std::set<Bytes> policy_ids;
  for (const auto &[policy_id, policy_handle] : *policy_objects) {
    policy_ids.insert(policy_id);
  }
  // The key objects of each master: (link index, handle).
  std::map<Bytes, std::vector<std::pair<uint64_t, CK_OBJECT_HANDLE>>> chains;
  for (const auto &[id, handle] : *key_objects) {
    if (id.size() == kKeyNameSize) {
      Bytes prefix(id.begin(), id.begin() + sizeof(StoreId));
      if (policy_ids.count(prefix) == 0) continue;  // a legacy key
      chains[prefix].emplace_back(LoadBigEndian64(id.data() + sizeof(StoreId)),
                                  handle);
      continue;
    }
    if (id.size() != sizeof(StoreId)) {
      skip("key " + HexEncode(id),
           "a key with the store's label that is "
           "neither a master nor a legacy key");
      continue;
    }
    chains[id].emplace_back(0, handle);
  }
  // A policy with no key object left is a spent master (every link
  // destroyed once no acceptable epoch used it): kept so that status shows
  // it; it serves nothing and never counts as live (ComputeStates).
  for (const Bytes &id : policy_ids) {
    if (id.size() == sizeof(StoreId)) (void)chains[id];
  }
  std::vector<Master> masters;
  for (const auto &[id, chain] : chains) {
    std::string what = "master " + HexEncode(id);
    Master m;
    std::copy(id.begin(), id.end(), m.id.begin());
    std::vector<Policy> policies;
    std::vector<CK_OBJECT_HANDLE> handles;
    std::string unreadable;
    for (const auto &[policy_id, policy_handle] : *policy_objects) {
      if (policy_id != id) continue;
      Result<Bytes> text = p11::ReadDataValue(session, policy_handle);
      if (!text.ok()) return text.status().WithContext(what);
      Result<Policy> policy = ParsePolicy(std::string_view(
          reinterpret_cast<const char *>(text->data()), text->size()));
      if (!policy.ok()) {
        unreadable = policy.status().message();
        continue;
      }
      policies.push_back(*policy);
      handles.push_back(policy_handle);
    }
    // An unreadable policy next to readable ones may be the one that
    // retires the master: vouch for none of them.
    if (!unreadable.empty()) {
      skip(what, "unreadable policy (" + unreadable +
                     "; a newer hsmstek may have written it)");
      continue;
    }
    if (policies.empty()) {
      skip(what, "no policy object (a provision interrupted half-way?)");
      continue;
    }
    Result<Policy> merged = MostRestrictive(policies);
    if (!merged.ok()) {
      skip(what, merged.status().message());
      continue;
    }
    m.policy = *merged;
    m.policy_object = handles.front();
    m.extra_policy_objects.assign(handles.begin() + 1, handles.end());
    KeySpec spec;
    spec.kind = KeyKind::kMaster;
    spec.replicable = m.policy.replicable;
    std::string weak;
    for (const auto &[index, handle] : chain) {
      const std::string link_what =
          index == 0 ? what
                     : "ratchet link " + std::to_string(index) + " of " + what;
      Result<Protections> verified =
          VerifyKey(session, handle, spec, link_what);
      if (!verified.ok() && p11::IsHandleInvalid(verified.status().ckr())) {
        continue;  // destroyed by another server meanwhile
      }
      if (!verified.ok()) {
        if (verified.status().code() != ErrorCode::kPermissionDenied) {
          return verified.status();
        }
        weak = verified.status().message();
        break;
      }
      if (!m.links.emplace(index, handle).second) {
        m.duplicate_links.emplace_back(index, handle);
        continue;
      }
      if (index == 0) m.key = handle;
      if (index == m.links.begin()->first) {
        m.protections = *verified;
        Result<std::vector<std::optional<bool>>> extractable =
            p11::ReadBools(session, handle, std::array{CKA_EXTRACTABLE});
        if (!extractable.ok()) return extractable.status();
        m.extractable = (*extractable)[0] == true;
      }
    }
    // One weak link would serve its epochs under weaker protection: the
    // whole master is left out, as for a weak master.
    if (!weak.empty()) {
      skip(what, weak);
      continue;
    }
    masters.push_back(std::move(m));
  }
  return masters;
}

std::string SerializeLegacyInfo(int64_t expires, std::string_view format) {
  return "hsmstek-legacy 1\nexpires " + FormatRfc3339(expires) + "\nformat " +
         std::string(format) + "\n";
}

Result<std::pair<int64_t, std::string>> ParseLegacyInfo(std::string_view text) {
  constexpr std::string_view kHeader = "hsmstek-legacy 1\nexpires ";
  if (text.substr(0, kHeader.size()) != kHeader) {
    return InvalidArgument("legacy key info: bad header");
  }
  text.remove_prefix(kHeader.size());
  size_t nl = text.find('\n');
  if (nl == std::string_view::npos) {
    return InvalidArgument("legacy key info: truncated");
  }
  Result<int64_t> expires = ParseRfc3339(text.substr(0, nl));
  if (!expires.ok()) return expires.status().WithContext("legacy key info");
  text.remove_prefix(nl + 1);
  constexpr std::string_view kFormat = "format ";
  if (text.substr(0, kFormat.size()) != kFormat || text.back() != '\n') {
    return InvalidArgument("legacy key info: bad format line");
  }
  std::string format(text.substr(kFormat.size()));
  format.pop_back();
  return std::make_pair(*expires, format);
}

Result<std::vector<LegacyKeyObjects>> LoadLegacyKeys(
    p11::Session &session, std::string_view label,
    std::vector<SkippedObject> *skipped) {
  auto skip = [skipped](std::string what, std::string reason) {
    if (skipped != nullptr)
      skipped->push_back({std::move(what), std::move(reason)});
  };
  p11::Template infos;
  infos.Ulong(CKA_CLASS, CKO_DATA)
      .String(CKA_APPLICATION, kLegacyApplication)
      .String(CKA_LABEL, label);
  Result<std::vector<std::pair<Bytes, CK_OBJECT_HANDLE>>> info_objects =
      FindById(session, infos, kDataIdAttribute);
  if (!info_objects.ok()) return info_objects.status();

  std::vector<LegacyKeyObjects> out;
  for (const auto &[id, info] : *info_objects) {
    Result<KeyName> name = KeyNameFromBytes(id);
    if (!name.ok()) continue;
    LegacyKeyObjects legacy;
    legacy.name = *name;
    legacy.info = info;
    Result<Bytes> text = p11::ReadDataValue(session, info);
    if (!text.ok()) return text.status();
    Result<std::pair<int64_t, std::string>> parsed =
        ParseLegacyInfo(std::string_view(
            reinterpret_cast<const char *>(text->data()), text->size()));
    const std::string what = "legacy key " + HexEncode(id);
    if (!parsed.ok()) {
      skip(what, "unreadable info object (" + parsed.status().message() + ")");
      continue;
    }
    legacy.expires = parsed->first;
    legacy.format = parsed->second;
    std::string problem;
    for (CK_KEY_TYPE type : {CKK_AES, CKK_GENERIC_SECRET}) {
      p11::Template t;
      t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
          .Ulong(CKA_KEY_TYPE, type)
          .String(CKA_LABEL, label)
          .Data(CKA_ID, id);
      Result<std::vector<CK_OBJECT_HANDLE>> found =
          p11::FindObjects(session, t, 2);
      if (!found.ok()) return found.status();
      if (found->size() != 1) {
        problem = "incomplete in the token";
        break;
      }
      KeySpec spec;
      spec.kind = type == CKK_AES ? KeyKind::kLegacyAes : KeyKind::kLegacyMac;
      Result<Protections> verified =
          VerifyKey(session, (*found)[0], spec, what);
      if (!verified.ok()) {
        if (verified.status().code() != ErrorCode::kPermissionDenied) {
          return verified.status();
        }
        problem = verified.status().message();
        break;
      }
      if (type == CKK_AES) legacy.protections = *verified;
      (type == CKK_AES ? legacy.aes : legacy.hmac) = (*found)[0];
    }
    if (!problem.empty()) {
      skip(what, problem);
      continue;
    }
    Result<CK_ULONG> len = p11::ReadUlong(session, legacy.aes, CKA_VALUE_LEN);
    if (!len.ok()) return len.status();
    legacy.aes_key_bytes = *len;
    out.push_back(legacy);
  }
  return out;
}

}  // namespace hsmstek::keystore
