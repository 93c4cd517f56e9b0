// RFC 7512 PKCS#11 URIs, parsed with p11-kit's URI API.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "common/bytes.h"
#include "common/status.h"
#include "pkcs11/ck.h"

namespace hsmstek::p11 {

// A parsed PKCS#11 URI. Absent attributes match anything.
struct TokenUri {
  std::string text;  // the URI as given, with pin-value redacted

  // Token attributes.
  std::optional<std::string> token;  // CK_TOKEN_INFO.label
  std::optional<std::string> manufacturer;
  std::optional<std::string> serial;
  std::optional<std::string> model;
  std::optional<CK_SLOT_ID> slot_id;

  // Object attributes.
  std::optional<std::string> object;  // CKA_LABEL
  std::optional<Bytes> id;            // CKA_ID
  std::optional<CK_OBJECT_CLASS> type;

  // Query attributes.
  std::optional<std::string> module_path;
  std::optional<std::string> module_name;
  std::optional<std::string> pin_source;
  std::optional<std::string> pin_value;  // allowed, documented as unsafe

  // True if this URI's token attributes select the token in `info`
  // on slot `slot`.
  bool MatchesToken(const CK_TOKEN_INFO &info, CK_SLOT_ID slot) const;
};

// Parses `uri`. Syntax errors, unknown attributes and unsupported values
// (e.g. type=foo) are kInvalidArgument with a message naming the problem;
// the message never contains the PIN.
Result<TokenUri> ParseTokenUri(std::string_view uri);

// RedactUri returns `uri` for messages and logs, with the value of every
// pin-value attribute, and of every pin-source that does not name a file
// ("file:/..." or "/..."; a PIN pasted there must not reach a log),
// replaced by "***": in the query (after the first '?') up to the next
// '&', elsewhere up to the next ';', '?' or '&'. Any "pin-value=" or
// "pin-source=" counts, even inside another value (over-redaction is
// harmless; a leaked PIN is not). TokenUri::text holds this form.
std::string RedactUri(std::string_view uri);

// Returns a CK_TOKEN_INFO/CK_SLOT_INFO blank-padded field as a trimmed string.
std::string TrimPadded(const CK_UTF8CHAR *field, size_t size);

}  // namespace hsmstek::p11
