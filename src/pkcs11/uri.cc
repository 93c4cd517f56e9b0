#include "pkcs11/uri.h"

#include <p11-kit/uri.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <memory>
#include <string>

namespace hsmstek::p11 {
namespace {

struct UriDeleter {
  void operator()(P11KitUri *uri) const { p11_kit_uri_free(uri); }
};
using UniqueUri = std::unique_ptr<P11KitUri, UriDeleter>;

// Token-info fields p11-kit leaves zeroed when the URI does not set them.
std::optional<std::string> PaddedField(const CK_UTF8CHAR *field, size_t size) {
  if (field[0] == 0) return std::nullopt;
  return TrimPadded(field, size);
}

bool ContainsUnknownQuery(std::string_view uri, std::string *name) {
  size_t q = uri.find('?');
  if (q == std::string_view::npos) return false;
  std::string_view query = uri.substr(q + 1);
  static constexpr std::string_view kKnown[] = {"module-path", "module-name",
                                                "pin-source", "pin-value"};
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view item = query.substr(0, amp);
    std::string_view key = item.substr(0, item.find('='));
    bool known = false;
    for (std::string_view k : kKnown) known |= (k == key);
    if (!known) {
      *name = std::string(key);
      return true;
    }
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return false;
}

}  // namespace

std::string RedactUri(std::string_view uri) {
  static constexpr std::string_view kValue = "pin-value=";
  static constexpr std::string_view kSource = "pin-source=";
  const size_t query = uri.find('?');
  std::string out;
  size_t copied = 0;
  auto next = [&](size_t from) {
    return std::min(uri.find(kValue, from), uri.find(kSource, from));
  };
  for (size_t pos = next(0); pos != std::string_view::npos; pos = next(pos)) {
    const bool source = uri.substr(pos, kSource.size()) == kSource;
    const size_t start = pos + (source ? kSource.size() : kValue.size());
    // p11-kit ends a query value only at '&'; a path value at ';' or '?'.
    const bool in_query = query != std::string_view::npos && pos > query;
    size_t end = uri.find_first_of(in_query ? "&" : ";?&", start);
    if (end == std::string_view::npos) end = uri.size();
    const std::string_view value = uri.substr(start, end - start);
    // A pin-source that names a file is kept (the file's name helps the
    // operator); anything else may be a PIN pasted in the wrong place.
    if (source &&
        (value.substr(0, 6) == "file:/" || value.substr(0, 1) == "/")) {
      pos = start;
      continue;
    }
    out.append(uri.substr(copied, start - copied));
    out.append("***");
    copied = end;
    pos = end;
  }
  out.append(uri.substr(copied));
  return out;
}

std::string TrimPadded(const CK_UTF8CHAR *field, size_t size) {
  std::string s(reinterpret_cast<const char *>(field), size);
  size_t end = s.find_last_not_of(" \0", std::string::npos, 2);
  s.resize(end == std::string::npos ? 0 : end + 1);
  return s;
}

bool TokenUri::MatchesToken(const CK_TOKEN_INFO &info, CK_SLOT_ID slot) const {
  if (token && *token != TrimPadded(info.label, sizeof(info.label)))
    return false;
  if (manufacturer && *manufacturer != TrimPadded(info.manufacturerID,
                                                  sizeof(info.manufacturerID)))
    return false;
  if (serial &&
      *serial != TrimPadded(info.serialNumber, sizeof(info.serialNumber)))
    return false;
  if (model && *model != TrimPadded(info.model, sizeof(info.model)))
    return false;
  if (slot_id && *slot_id != slot) return false;
  return true;
}

Result<TokenUri> ParseTokenUri(std::string_view text) {
  TokenUri out;
  out.text = RedactUri(text);
  // The scheme is case-insensitive (RFC 3986); p11-kit wants it lowercase.
  std::string copy(text);
  for (size_t i = 0; i < copy.size() && i < 7; ++i) {
    copy[i] =
        static_cast<char>(std::tolower(static_cast<unsigned char>(copy[i])));
  }
  if (copy.substr(0, 7) != "pkcs11:") {
    return InvalidArgument("not a PKCS#11 URI (must start with \"pkcs11:\"): " +
                           out.text);
  }
  // p11-kit reads a C string: it would silently ignore everything after a
  // NUL (attributes that should restrict the match, or be refused).
  if (text.find('\0') != std::string_view::npos) {
    return InvalidArgument("PKCS#11 URI contains a NUL byte: " + out.text);
  }
  UniqueUri uri(p11_kit_uri_new());
  if (!uri) return Internal("p11_kit_uri_new failed");
  int rc = p11_kit_uri_parse(copy.c_str(), P11_KIT_URI_FOR_ANY, uri.get());
  if (rc != P11_KIT_URI_OK) {
    return InvalidArgument(std::string("bad PKCS#11 URI (") +
                           p11_kit_uri_message(rc) + "): " + out.text);
  }
  if (p11_kit_uri_any_unrecognized(uri.get())) {
    return InvalidArgument("PKCS#11 URI has an unknown attribute: " + out.text);
  }
  std::string unknown;
  if (ContainsUnknownQuery(text, &unknown)) {
    return InvalidArgument("PKCS#11 URI has an unknown query attribute \"" +
                           unknown + "\": " + out.text);
  }

  const CK_TOKEN_INFO *info = p11_kit_uri_get_token_info(uri.get());
  out.token = PaddedField(info->label, sizeof(info->label));
  out.manufacturer =
      PaddedField(info->manufacturerID, sizeof(info->manufacturerID));
  out.serial = PaddedField(info->serialNumber, sizeof(info->serialNumber));
  out.model = PaddedField(info->model, sizeof(info->model));
  CK_SLOT_ID slot = p11_kit_uri_get_slot_id(uri.get());
  if (slot != static_cast<CK_SLOT_ID>(-1)) out.slot_id = slot;

  if (CK_ATTRIBUTE *a = p11_kit_uri_get_attribute(uri.get(), CKA_LABEL)) {
    out.object =
        std::string(static_cast<const char *>(a->pValue), a->ulValueLen);
  }
  if (CK_ATTRIBUTE *a = p11_kit_uri_get_attribute(uri.get(), CKA_ID)) {
    const auto *p = static_cast<const uint8_t *>(a->pValue);
    out.id = Bytes(p, p + a->ulValueLen);
  }
  if (CK_ATTRIBUTE *a = p11_kit_uri_get_attribute(uri.get(), CKA_CLASS)) {
    if (a->ulValueLen != sizeof(CK_OBJECT_CLASS)) {
      return InvalidArgument("PKCS#11 URI has a bad type: " + out.text);
    }
    CK_OBJECT_CLASS cls;
    std::memcpy(&cls, a->pValue, sizeof(cls));
    out.type = cls;
  }
  if (const char *v = p11_kit_uri_get_module_path(uri.get())) {
    out.module_path = v;
  }
  if (const char *v = p11_kit_uri_get_module_name(uri.get())) {
    out.module_name = v;
  }
  if (const char *v = p11_kit_uri_get_pin_source(uri.get())) {
    out.pin_source = v;
  }
  if (const char *v = p11_kit_uri_get_pin_value(uri.get())) {
    out.pin_value = v;
  }
  if (out.module_path && out.module_path->empty()) {
    return InvalidArgument("PKCS#11 URI has an empty module-path: " + out.text);
  }
  return out;
}

}  // namespace hsmstek::p11
