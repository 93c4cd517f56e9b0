// Fuzz target: ParseTokenUri and RedactUri on arbitrary strings (PKCS#11
// URIs come from configuration, the CLI and the C API).
// Invariants:
//   - never crashes; the same input gives the same result;
//   - the redacted text never keeps a pin-value (every "pin-value=" is
//     followed by "***" and then the end of its value), nor a pin-source
//     that does not name a file (followed by "***", "file:/" or "/"), and
//     changes nothing in a string without "pin-value=" or "pin-source=";
//   - errors are kInvalidArgument whose message ends with the redacted text
//     and holds no other "pin-value"; a NUL byte is an error (p11-kit would
//     ignore the rest);
//   - an accepted URI's text is the redacted input, its module-path is not
//     empty, its type is one p11-kit names, and its components survive a
//     round trip through a canonical URI built from them;
//   - MatchesToken agrees with the components: a token info built from
//     them matches, one with a changed label/serial/slot does not.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "pkcs11/uri.h"

namespace hsmstek::fuzz {
namespace {

using p11::TokenUri;

constexpr std::string_view kPinKey = "pin-value=";
constexpr std::string_view kSourceKey = "pin-source=";

void Check(bool ok, const char *what, std::string_view input) {
  if (ok) return;
  std::fprintf(stderr, "fuzz_uri invariant failed: %s\ninput: %.*s\n", what,
               static_cast<int>(input.size()), input.data());
  std::abort();
}

// True if some "pin-value=" in `s` is not followed by exactly "***" and
// the end of its value ('&' or the end in the query; ';', '?', '&' or the
// end before it).
bool KeepsPin(std::string_view s) {
  const size_t query = s.find('?');
  for (size_t pos = s.find(kPinKey); pos != std::string_view::npos;
       pos = s.find(kPinKey, pos + 1)) {
    std::string_view rest = s.substr(pos + kPinKey.size());
    if (rest.substr(0, 3) != "***") return true;
    rest.remove_prefix(3);
    if (rest.empty()) continue;
    const bool in_query = query != std::string_view::npos && pos > query;
    const std::string_view ends = in_query ? "&" : ";?&";
    if (ends.find(rest[0]) == std::string_view::npos) return true;
  }
  return false;
}

// True if some "pin-source=" in `s` is followed by neither "***" nor a
// file name ("file:/", "/").
bool KeepsPinSource(std::string_view s) {
  for (size_t pos = s.find(kSourceKey); pos != std::string_view::npos;
       pos = s.find(kSourceKey, pos + 1)) {
    const std::string_view rest = s.substr(pos + kSourceKey.size());
    if (rest.substr(0, 3) != "***" && rest.substr(0, 6) != "file:/" &&
        rest.substr(0, 1) != "/") {
      return true;
    }
  }
  return false;
}

std::string Pct(std::string_view v) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : v) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
        (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
        c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

const char *TypeName(CK_OBJECT_CLASS type) {
  switch (type) {
    case CKO_CERTIFICATE:
      return "cert";
    case CKO_DATA:
      return "data";
    case CKO_PRIVATE_KEY:
      return "private";
    case CKO_PUBLIC_KEY:
      return "public";
    case CKO_SECRET_KEY:
      return "secret-key";
    default:
      return nullptr;
  }
}

// A URI that states exactly `uri`'s components, every value
// percent-encoded.
std::string Canonical(const TokenUri &uri) {
  std::string path;
  auto add = [](std::string &to, char sep, const char *name,
                std::string_view value) {
    if (!to.empty()) to += sep;
    to += name;
    to += '=';
    to += Pct(value);
  };
  if (uri.token) add(path, ';', "token", *uri.token);
  if (uri.manufacturer) add(path, ';', "manufacturer", *uri.manufacturer);
  if (uri.serial) add(path, ';', "serial", *uri.serial);
  if (uri.model) add(path, ';', "model", *uri.model);
  if (uri.slot_id) {
    if (!path.empty()) path += ';';
    path += "slot-id=" + std::to_string(*uri.slot_id);
  }
  if (uri.object) add(path, ';', "object", *uri.object);
  if (uri.id) {
    add(path, ';', "id",
        std::string_view(reinterpret_cast<const char *>(uri.id->data()),
                         uri.id->size()));
  }
  if (uri.type) add(path, ';', "type", TypeName(*uri.type));
  std::string query;
  if (uri.module_path) add(query, '&', "module-path", *uri.module_path);
  if (uri.module_name) add(query, '&', "module-name", *uri.module_name);
  if (uri.pin_source) add(query, '&', "pin-source", *uri.pin_source);
  if (uri.pin_value) add(query, '&', "pin-value", *uri.pin_value);
  return "pkcs11:" + path + (query.empty() ? "" : "?" + query);
}

bool SameComponents(const TokenUri &a, const TokenUri &b) {
  return a.token == b.token && a.manufacturer == b.manufacturer &&
         a.serial == b.serial && a.model == b.model && a.slot_id == b.slot_id &&
         a.object == b.object && a.id == b.id && a.type == b.type &&
         a.module_path == b.module_path && a.module_name == b.module_name &&
         a.pin_source == b.pin_source && a.pin_value == b.pin_value;
}

// Blank-padded field holding `value`, or junk when the URI leaves it open.
template <size_t N>
void Fill(CK_UTF8CHAR (&field)[N], const std::optional<std::string> &value) {
  std::memset(field, value ? ' ' : 'j', N);
  if (value) std::memcpy(field, value->data(), std::min(value->size(), N));
}

void CheckMatching(const TokenUri &uri, std::string_view input) {
  CK_TOKEN_INFO info{};
  Fill(info.label, uri.token);
  Fill(info.manufacturerID, uri.manufacturer);
  Fill(info.serialNumber, uri.serial);
  Fill(info.model, uri.model);
  const CK_SLOT_ID slot = uri.slot_id.value_or(7);
  Check(uri.MatchesToken(info, slot), "matches its own token info", input);
  if (uri.slot_id) {
    Check(!uri.MatchesToken(info, slot + 1), "other slot differs", input);
  }
  if (uri.token) {
    CK_TOKEN_INFO other = info;
    other.label[0] ^= 0x80;
    Check(!uri.MatchesToken(other, slot), "other label differs", input);
  }
  if (uri.serial) {
    CK_TOKEN_INFO other = info;
    other.serialNumber[0] ^= 0x80;
    Check(!uri.MatchesToken(other, slot), "other serial differs", input);
  }
}

}  // namespace

int FuzzUri(const uint8_t *data, size_t size) {
  const std::string_view input(reinterpret_cast<const char *>(data), size);
  const std::string redacted = p11::RedactUri(input);
  Check(!KeepsPin(redacted), "redacted text keeps a pin-value", input);
  Check(!KeepsPinSource(redacted), "redacted text keeps a pin-source value",
        input);
  if (input.find(kPinKey) == std::string_view::npos &&
      input.find(kSourceKey) == std::string_view::npos) {
    Check(redacted == input, "redaction changes only PIN attributes", input);
  }

  Result<TokenUri> uri = p11::ParseTokenUri(input);
  Result<TokenUri> again = p11::ParseTokenUri(input);
  Check(uri.ok() == again.ok(), "deterministic", input);
  Check(!uri.ok() || input.find('\0') == std::string_view::npos,
        "a NUL byte is refused", input);
  if (!uri.ok()) {
    const std::string &message = uri.status().message();
    Check(message == again.status().message(), "same message", input);
    Check(uri.status().code() == ErrorCode::kInvalidArgument, "error code",
          input);
    Check(message.size() > redacted.size() &&
              message.compare(message.size() - redacted.size(), redacted.size(),
                              redacted) == 0,
          "message ends with the redacted text", input);
    Check(message.substr(0, message.size() - redacted.size()).find(kPinKey) ==
              std::string::npos,
          "no pin in the message prefix", input);
    return 0;
  }
  Check(SameComponents(*uri, *again), "same components", input);
  Check(uri->text == redacted, "text is the redacted input", input);
  Check(!uri->module_path || !uri->module_path->empty(), "module-path", input);
  Check(!uri->type || TypeName(*uri->type) != nullptr, "known type", input);

  const std::string canonical = Canonical(*uri);
  Result<TokenUri> round = p11::ParseTokenUri(canonical);
  if (!round.ok()) {
    std::fprintf(stderr, "canonical %s: %s\n", canonical.c_str(),
                 round.status().message().c_str());
  }
  Check(round.ok(), "canonical form parses", input);
  Check(SameComponents(*uri, *round), "round trip", input);
  CheckMatching(*uri, input);
  return 0;
}

}  // namespace hsmstek::fuzz

#ifdef HSMSTEK_LIBFUZZER
extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  return hsmstek::fuzz::FuzzUri(data, size);
}
#endif
