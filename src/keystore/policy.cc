#include "keystore/policy.h"

#include <algorithm>
#include <array>

#include "common/bytes.h"
#include "keystore/duration.h"
#include "keystore/time_format.h"

namespace hsmstek::keystore {
namespace {

// The keys of lines 2..8, in their fixed order.
// Version 2 adds "ratchet" after them.
constexpr std::array<std::string_view, 8> kKeys = {
    "period", "decrypt-window", "not-before", "retire-at",
    "kdf",    "replicable",     "created",    "ratchet"};
constexpr size_t kV1Keys = 7;

std::string LinePrefix(size_t line) {
  return "policy line " + std::to_string(line) + ": ";
}

std::string KeyContext(size_t line, std::string_view key) {
  return "policy line " + std::to_string(line) + " (" + std::string(key) + ")";
}

std::string KeyPrefix(size_t line, std::string_view key) {
  return KeyContext(line, key) + ": ";
}

// Stores the value of line `index` (0-based into kKeys) into `p`.
Status ParseValue(size_t index, std::string_view value, Policy *p) {
  switch (index) {
    case 0:
    case 1:
    case 7: {
      Result<int64_t> d = ParseDuration(value);
      if (!d.ok()) return d.status();
      (index == 0   ? p->period_s
       : index == 1 ? p->decrypt_window_s
                    : p->ratchet_s) = *d;
      // Version 2 always names a ratchet: 0 would read as "default".
      if (index == 7 && *d <= 0) {
        return InvalidArgument("ratchet must be positive");
      }
      return Status::Ok();
    }
    case 2:
    case 3:
    case 6: {
      if (index == 3 && value == "-") {
        p->retire_at.reset();
        return Status::Ok();
      }
      Result<int64_t> t = ParseRfc3339(value);
      if (!t.ok()) return t.status();
      if (index == 2) p->not_before = *t;
      if (index == 3) p->retire_at = *t;
      if (index == 6) p->created_at = *t;
      return Status::Ok();
    }
    case 4:
      if (value != kKdfAesEcbV1) {
        return InvalidArgument("unknown KDF " + QuoteForMessage(value) +
                               " (supported: " + kKdfAesEcbV1 + ")");
      }
      p->kdf = std::string(value);
      return Status::Ok();
    case 5:
      if (value == "yes") {
        p->replicable = true;
      } else if (value == "no") {
        p->replicable = false;
      } else {
        return InvalidArgument("expected \"yes\" or \"no\", got " +
                               QuoteForMessage(value));
      }
      return Status::Ok();
    default:
      return Internal("policy key index out of range");
  }
}

}  // namespace

int64_t DefaultRatchetPeriods(int64_t period_s) {
  if (period_s <= 0 || period_s >= kDefaultRatchetSeconds) return 1;
  return kDefaultRatchetSeconds / period_s;
}

uint64_t RatchetPeriods(const Policy &policy) {
  if (policy.period_s <= 0) return 1;
  if (policy.ratchet_s <= 0) {
    return static_cast<uint64_t>(DefaultRatchetPeriods(policy.period_s));
  }
  return static_cast<uint64_t>(
      std::max<int64_t>(1, policy.ratchet_s / policy.period_s));
}

std::string SerializePolicy(const Policy &policy) {
  std::string out;
  out.reserve(256);
  out += policy.ratchet_s != 0 ? kPolicyHeaderV2 : kPolicyHeader;
  out += "\nperiod " + FormatDuration(policy.period_s);
  out += "\ndecrypt-window " + FormatDuration(policy.decrypt_window_s);
  out += "\nnot-before " + FormatRfc3339(policy.not_before);
  out += "\nretire-at ";
  out += policy.retire_at ? FormatRfc3339(*policy.retire_at) : "-";
  out += "\nkdf " + policy.kdf;
  out += "\nreplicable ";
  out += policy.replicable ? "yes" : "no";
  out += "\ncreated " + FormatRfc3339(policy.created_at);
  if (policy.ratchet_s != 0)
    out += "\nratchet " + FormatDuration(policy.ratchet_s);
  out += "\n";
  return out;
}

Result<Policy> ParsePolicy(std::string_view text) {
  if (text.empty()) return InvalidArgument("empty policy");
  if (text.size() > kMaxPolicySize) {
    return InvalidArgument("policy is " + std::to_string(text.size()) +
                           " bytes, more than " +
                           std::to_string(kMaxPolicySize));
  }
  Policy p;
  size_t key_count = kV1Keys;
  size_t next_key = 0;  // index into kKeys of the key expected next
  size_t line_no = 0;
  size_t start = 0;
  while (start < text.size()) {
    ++line_no;
    const size_t nl = text.find('\n', start);
    if (nl == std::string_view::npos) {
      return InvalidArgument(LinePrefix(line_no) +
                             "missing newline at end of line (truncated?)");
    }
    const std::string_view line = text.substr(start, nl - start);
    start = nl + 1;
    for (char c : line) {
      const auto u = static_cast<unsigned char>(c);
      if (u == '\r') {
        return InvalidArgument(LinePrefix(line_no) +
                               "carriage return not allowed");
      }
      if (u < 0x20 || u > 0x7e) {
        static constexpr char kHex[] = "0123456789abcdef";
        return InvalidArgument(LinePrefix(line_no) + "non-printable byte 0x" +
                               kHex[u >> 4] + kHex[u & 0xf]);
      }
    }
    if (line_no == 1) {
      if (line == kPolicyHeader) continue;
      if (line == kPolicyHeaderV2) {
        key_count = kKeys.size();
        continue;
      }
      constexpr std::string_view kMagic = "hsmstek-policy ";
      if (line.substr(0, kMagic.size()) == kMagic) {
        return InvalidArgument(LinePrefix(1) + "unsupported policy version " +
                               QuoteForMessage(line.substr(kMagic.size())) +
                               " (this build reads 1 and 2)");
      }
      return InvalidArgument(LinePrefix(1) + "expected header \"" +
                             kPolicyHeader + "\"");
    }
    if (line.empty()) {
      return InvalidArgument(LinePrefix(line_no) + "empty line");
    }
    const size_t space = line.find(' ');
    if (space == std::string_view::npos) {
      return InvalidArgument(LinePrefix(line_no) + "expected \"key value\"");
    }
    const std::string_view key = line.substr(0, space);
    const std::string_view value = line.substr(space + 1);
    size_t index = key_count;
    for (size_t i = 0; i < key_count; ++i) {
      if (kKeys[i] == key) index = i;
    }
    if (index == key_count) {
      return InvalidArgument(LinePrefix(line_no) + "unknown key " +
                             QuoteForMessage(key));
    }
    if (index < next_key) {
      return InvalidArgument(LinePrefix(line_no) + "duplicate key " +
                             QuoteForMessage(key));
    }
    if (index > next_key) {
      return InvalidArgument(LinePrefix(line_no) + "key " +
                             QuoteForMessage(key) +
                             " out of order or missing key " +
                             QuoteForMessage(kKeys[next_key]) + " before it");
    }
    if (value.empty()) {
      return InvalidArgument(KeyPrefix(line_no, key) + "empty value");
    }
    if (value.find(' ') != std::string_view::npos) {
      return InvalidArgument(KeyPrefix(line_no, key) +
                             "value contains a space");
    }
    Status s = ParseValue(index, value, &p);
    if (!s.ok()) return s.WithContext(KeyContext(line_no, key));
    ++next_key;
  }
  if (next_key < key_count) {
    return InvalidArgument("policy ends after line " + std::to_string(line_no) +
                           ": missing key " + QuoteForMessage(kKeys[next_key]));
  }
  Status valid = ValidatePolicy(p);
  if (!valid.ok()) return valid.WithContext("invalid policy");
  return p;
}

Status ValidatePolicy(const Policy &p) {
  if (p.period_s < kMinPeriodSeconds) {
    return InvalidArgument("period " + FormatDuration(p.period_s) +
                           " is shorter than the minimum " +
                           FormatDuration(kMinPeriodSeconds));
  }
  if (p.period_s > kMaxDecryptWindowSeconds) {
    return InvalidArgument("period " + FormatDuration(p.period_s) +
                           " is longer than the maximum " +
                           FormatDuration(kMaxDecryptWindowSeconds));
  }
  if (p.decrypt_window_s <= 0) {
    return InvalidArgument("decrypt-window " +
                           FormatDuration(p.decrypt_window_s) +
                           " must be positive");
  }
  if (p.decrypt_window_s > kMaxDecryptWindowSeconds) {
    return InvalidArgument("decrypt-window " +
                           FormatDuration(p.decrypt_window_s) +
                           " is longer than the maximum " +
                           FormatDuration(kMaxDecryptWindowSeconds));
  }
  if (p.decrypt_window_s % p.period_s != 0) {
    return InvalidArgument(
        "decrypt-window " + FormatDuration(p.decrypt_window_s) +
        " is not a multiple of period " + FormatDuration(p.period_s));
  }
  if (p.decrypt_window_s / p.period_s > kMaxWindowEpochs) {
    return InvalidArgument(
        "decrypt-window " + FormatDuration(p.decrypt_window_s) + " spans " +
        std::to_string(p.decrypt_window_s / p.period_s) + " periods; at most " +
        std::to_string(kMaxWindowEpochs) +
        " are allowed (use a longer period)");
  }
  if (p.ratchet_s != 0) {
    if (p.ratchet_s < p.period_s || p.ratchet_s % p.period_s != 0) {
      return InvalidArgument("ratchet " + FormatDuration(p.ratchet_s) +
                             " is not a positive multiple of period " +
                             FormatDuration(p.period_s));
    }
    if (p.ratchet_s > kMaxRatchetSeconds) {
      return InvalidArgument("ratchet " + FormatDuration(p.ratchet_s) +
                             " is longer than the maximum " +
                             FormatDuration(kMaxRatchetSeconds));
    }
  }
  if (p.kdf != kKdfAesEcbV1) {
    return InvalidArgument("unknown KDF " + QuoteForMessage(p.kdf) +
                           " (supported: " + kKdfAesEcbV1 + ")");
  }
  if (p.not_before < 0 || p.not_before > kMaxRfc3339Time) {
    return InvalidArgument("not-before " + std::to_string(p.not_before) +
                           " is out of range (1970 to 9999)");
  }
  if (p.retire_at && (*p.retire_at <= 0 || *p.retire_at > kMaxRfc3339Time)) {
    return InvalidArgument("retire-at " + std::to_string(*p.retire_at) +
                           " is out of range (1970 to 9999)");
  }
  if (p.created_at < 0 || p.created_at > kMaxRfc3339Time) {
    return InvalidArgument("created " + std::to_string(p.created_at) +
                           " is out of range (1970 to 9999)");
  }
  return Status::Ok();
}

}  // namespace hsmstek::keystore
