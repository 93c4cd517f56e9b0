#include "keystore/key_lookup.h"

#include <algorithm>
#include <array>

#include "pkcs11/error.h"
#include "pkcs11/object.h"

namespace hsmstek::keystore {
namespace {

// The token, slot and info of the session (to check a key URI's token
// attributes against the store's token).
struct SessionToken {
  CK_SLOT_ID slot = 0;
  CK_TOKEN_INFO info{};
  std::string label;
};

Result<SessionToken> TokenOf(p11::Session &session) {
  CK_SESSION_INFO si;
  Status s = P11_CALL(session, C_GetSessionInfo, session.handle(), &si);
  if (!s.ok()) return s;
  SessionToken out;
  out.slot = si.slotID;
  s = P11_CALL(session, C_GetTokenInfo, si.slotID, &out.info);
  if (!s.ok()) return s;
  out.label = p11::TrimPadded(out.info.label, sizeof(out.info.label));
  return out;
}

}  // namespace

std::string DescribeKey(const KeyRef &key) {
  return "key \"" + key.label + "\" (id " +
         (key.id.empty() ? std::string("none") : HexEncode(key.id)) + ")";
}

static std::string_view ClassName(CK_OBJECT_CLASS cls) {
  switch (cls) {
    case CKO_PUBLIC_KEY:
      return "public key";
    case CKO_PRIVATE_KEY:
      return "private key";
    case CKO_SECRET_KEY:
      return "secret key";
    default:
      return "object";
  }
}

// Finds the keys of `classes` that `uri` names (object=, id=, type=) in the
// session's token. `what` names the option in messages ("--wrap-key").
Result<std::vector<KeyRef>> FindKeys(p11::Session &session,
                                     const p11::TokenUri &uri,
                                     std::vector<CK_OBJECT_CLASS> classes,
                                     std::string_view what) {
  if (!uri.object && !uri.id) {
    return InvalidArgument(std::string(what) + " " + uri.text +
                           " must name the key with object= and/or id=");
  }
  Result<SessionToken> token = TokenOf(session);
  if (!token.ok()) return token.status();
  if (!uri.MatchesToken(token->info, token->slot)) {
    return InvalidArgument(std::string(what) + " " + uri.text +
                           " names another token; the key must be in token \"" +
                           token->label + "\", the store's token");
  }
  if (uri.type) {
    if (std::find(classes.begin(), classes.end(), *uri.type) == classes.end()) {
      return InvalidArgument(std::string(what) + " " + uri.text + " names a " +
                             std::string(ClassName(*uri.type)) +
                             ", which cannot serve here");
    }
    classes = {*uri.type};
  }
  std::vector<KeyRef> out;
  for (CK_OBJECT_CLASS cls : classes) {
    p11::Template t;
    t.Ulong(CKA_CLASS, cls);
    if (uri.object) t.String(CKA_LABEL, *uri.object);
    if (uri.id) t.Data(CKA_ID, *uri.id);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(session, t);
    if (!found.ok()) return found.status();
    for (CK_OBJECT_HANDLE h : *found) {
      KeyRef key;
      key.handle = h;
      key.cls = cls;
      Result<CK_ULONG> type = p11::ReadUlong(session, h, CKA_KEY_TYPE);
      if (!type.ok()) return type.status();
      key.type = *type;
      Result<Bytes> id = p11::ReadAttribute(session, h, CKA_ID);
      if (id.ok()) key.id = *id;
      Result<Bytes> label = p11::ReadAttribute(session, h, CKA_LABEL);
      if (label.ok()) key.label.assign(label->begin(), label->end());
      out.push_back(std::move(key));
    }
  }
  if (out.empty()) {
    std::string kinds;
    for (size_t i = 0; i < classes.size(); ++i) {
      if (i > 0) kinds += i + 1 == classes.size() ? " or " : ", ";
      kinds += ClassName(classes[i]);
    }
    return NotFound("no " + kinds + " matches " + std::string(what) + " " +
                    uri.text + " in token \"" + token->label + "\"");
  }
  return out;
}

Result<bool> ReadFlag(p11::Session &session, CK_OBJECT_HANDLE h,
                      CK_ATTRIBUTE_TYPE type) {
  Result<std::vector<std::optional<bool>>> v =
      p11::ReadBools(session, h, std::array{type});
  if (!v.ok()) return v.status();
  return (*v)[0] == true;
}

Status RequireFlags(p11::Session &session, CK_OBJECT_HANDLE h,
                    std::span<const RequiredFlag> flags,
                    std::string_view what) {
  std::vector<CK_ATTRIBUTE_TYPE> types;
  for (const RequiredFlag &f : flags) types.push_back(f.type);
  Result<std::vector<std::optional<bool>>> v =
      p11::ReadBools(session, h, types);
  if (!v.ok()) return v.status();
  for (size_t i = 0; i < flags.size(); ++i) {
    const std::optional<bool> got = (*v)[i];
    if (got == flags[i].value ||
        (!got && flags[i].absent_ok && !flags[i].value)) {
      continue;
    }
    const char *want = flags[i].value ? "TRUE" : "FALSE";
    return PermissionDenied(
        std::string(what) + " is weaker than required: " + flags[i].name +
        " is " + (got ? (*got ? "TRUE" : "FALSE") : "absent") + " (must be " +
        want + ")");
  }
  return Status::Ok();
}

}  // namespace hsmstek::keystore
