#include "keystore/master.h"

#include <algorithm>
#include <cstring>

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
  auto retired = [now](const Master &m) {
    return m.policy.retire_at && *m.policy.retire_at <= now;
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

Status VerifyMasterAttributes(p11::Session &session, CK_OBJECT_HANDLE key,
                              bool replicable, std::string_view what) {
  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {
      CKA_TOKEN,  CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE,
      CKA_DERIVE, CKA_ENCRYPT, CKA_DECRYPT,   CKA_SIGN,
      CKA_VERIFY, CKA_WRAP,    CKA_UNWRAP,    CKA_WRAP_WITH_TRUSTED};
  static constexpr const char *kNames[] = {
      "CKA_TOKEN",  "CKA_PRIVATE", "CKA_SENSITIVE", "CKA_EXTRACTABLE",
      "CKA_DERIVE", "CKA_ENCRYPT", "CKA_DECRYPT",   "CKA_SIGN",
      "CKA_VERIFY", "CKA_WRAP",    "CKA_UNWRAP",    "CKA_WRAP_WITH_TRUSTED"};
  Result<std::vector<std::optional<bool>>> values =
      p11::ReadBools(session, key, kTypes);
  if (!values.ok()) return values.status();
  const auto &v = *values;
  auto weak = [&](size_t i, const char *why) {
    return PermissionDenied(std::string(what) + " is weaker than required: " +
                            kNames[i] + " " + why);
  };
  // Required TRUE.
  for (size_t i : {0u, 1u, 2u, 4u}) {
    if (v[i] != true) return weak(i, "is not TRUE");
  }
  // Usages other than derivation must be FALSE (absent counts as FALSE).
  for (size_t i = 5; i <= 10; ++i) {
    if (v[i] == true) return weak(i, "is TRUE (a master only derives)");
  }
  if (v[3] == true) {
    if (!replicable) return weak(3, "is TRUE but the store is not replicable");
    if (v[11] != true) {
      return weak(11,
                  "is not TRUE: a replicable master may only be wrapped "
                  "by a trusted key");
    }
  }
  Result<CK_ULONG> key_type = p11::ReadUlong(session, key, CKA_KEY_TYPE);
  if (!key_type.ok()) return key_type.status();
  Result<CK_ULONG> length = p11::ReadUlong(session, key, CKA_VALUE_LEN);
  if (!length.ok()) return length.status();
  // SoftHSM 2.6 records CKA_VALUE_LEN 0 for an unwrapped key and refuses the
  // attribute in an unwrap template; such a key (CKA_LOCAL FALSE) was proved
  // equal to the exporter's 32-byte master by its check value at import.
  bool unrecorded_length = false;
  if (*length == 0) {
    Result<std::vector<std::optional<bool>>> local =
        p11::ReadBools(session, key, std::array{CKA_LOCAL});
    if (!local.ok()) return local.status();
    unrecorded_length = (*local)[0] == false;
  }
  if (*key_type != CKK_AES || (*length != 32 && !unrecorded_length)) {
    return PermissionDenied(std::string(what) + " is not a 32-byte AES key");
  }
  return Status::Ok();
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
    if (!id.ok()) return id.status();
    out.emplace_back(std::move(*id), h);
  }
  return out;
}

}  // namespace

Result<std::vector<Master>> LoadMasters(p11::Session &session,
                                        std::string_view label) {
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

  std::vector<Master> masters;
  for (const auto &[id, handle] : *key_objects) {
    if (id.size() != sizeof(StoreId)) continue;  // a legacy key (16-byte id)
    Master m;
    std::copy(id.begin(), id.end(), m.id.begin());
    m.key = handle;
    std::string what =
        "master " + HexEncode(id) + " of \"" + std::string(label) + "\"";
    auto policy_it =
        std::find_if(policy_objects->begin(), policy_objects->end(),
                     [&id = id](const auto &p) { return p.first == id; });
    if (policy_it == policy_objects->end()) {
      return FailedPrecondition(what + " has no policy object");
    }
    m.policy_object = policy_it->second;
    Result<Bytes> text = p11::ReadDataValue(session, m.policy_object);
    if (!text.ok()) return text.status().WithContext(what);
    Result<Policy> policy = ParsePolicy(std::string_view(
        reinterpret_cast<const char *>(text->data()), text->size()));
    if (!policy.ok()) return policy.status().WithContext(what);
    m.policy = *policy;
    Status attrs =
        VerifyMasterAttributes(session, handle, m.policy.replicable, what);
    if (!attrs.ok()) return attrs;
    Result<std::vector<std::optional<bool>>> extractable =
        p11::ReadBools(session, handle, std::array{CKA_EXTRACTABLE});
    if (!extractable.ok()) return extractable.status();
    m.extractable = (*extractable)[0] == true;
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

Result<std::vector<LegacyKeyObjects>> LoadLegacyKeys(p11::Session &session,
                                                     std::string_view label) {
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
    if (!parsed.ok()) {
      return parsed.status().WithContext("legacy key " + HexEncode(id));
    }
    legacy.expires = parsed->first;
    legacy.format = parsed->second;
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
        return FailedPrecondition("legacy key " + HexEncode(id) +
                                  " is incomplete in the token");
      }
      (type == CKK_AES ? legacy.aes : legacy.hmac) = (*found)[0];
    }
    Result<CK_ULONG> len = p11::ReadUlong(session, legacy.aes, CKA_VALUE_LEN);
    if (!len.ok()) return len.status();
    legacy.aes_key_bytes = *len;
    out.push_back(legacy);
  }
  return out;
}

}  // namespace hsmstek::keystore
