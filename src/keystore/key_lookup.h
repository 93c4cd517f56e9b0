// Finding the keys that a key URI (--wrap-key, --unwrap-key, --signer)
// names in a session's token, and reading their attributes back to refuse
// keys weaker than required. Used by replication.cc and signing.cc.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/bytes.h"
#include "common/status.h"
#include "pkcs11/token.h"
#include "pkcs11/uri.h"

namespace hsmstek::keystore {

// A key found through a key URI.
struct KeyRef {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  CK_OBJECT_CLASS cls = 0;
  CK_KEY_TYPE type = 0;
  Bytes id;
  std::string label;
};

// DescribeKey returns `key "label" (id hex)` for messages.
std::string DescribeKey(const KeyRef &key);

// FindKeys returns the keys of `classes` that `uri` names (object=, id=,
// type=) in the session's token; `what` names the option in messages
// ("--wrap-key"). Token attributes of `uri`, if any, must match the
// session's token. kNotFound when nothing matches.
[[nodiscard]] Result<std::vector<KeyRef>> FindKeys(
    p11::Session &session, const p11::TokenUri &uri,
    std::vector<CK_OBJECT_CLASS> classes, std::string_view what);

// ReadFlag reads one boolean attribute; an absent one is false.
[[nodiscard]] Result<bool> ReadFlag(p11::Session &session, CK_OBJECT_HANDLE h,
                                    CK_ATTRIBUTE_TYPE type);

// One boolean a key must have: `name` for messages; `absent_ok` lets a
// missing attribute count as FALSE (usage flags a token may not report).
struct RequiredFlag {
  CK_ATTRIBUTE_TYPE type;
  const char *name;
  bool value;
  bool absent_ok;
};

// RequireFlags reads `flags` of `h` back and returns kPermissionDenied,
// "<what> is weaker than required: CKA_X is TRUE (must be FALSE)", for the
// first that differs.
[[nodiscard]] Status RequireFlags(p11::Session &session, CK_OBJECT_HANDLE h,
                                  std::span<const RequiredFlag> flags,
                                  std::string_view what);

}  // namespace hsmstek::keystore
