// The non-secret policy of a master (docs/FORMAT.md): stored as the CKA_VALUE of a
// CKO_DATA object (CKA_APPLICATION "hsmstek", same label, CKA_ID = store id)
// next to each master, read by every server that holds the master so a
// fleet shares one schedule. Pure functions, thread-safe.
//
// Text format, version 1 (strict; every line ends with "\n", printable
// ASCII only, no CR, at most 4096 bytes, keys exactly once in this order,
// one space between key and value):
//
//   hsmstek-policy 1
//   period <duration>             rotation period, e.g. 1h (see duration.h)
//   decrypt-window <duration>     how long a ticket stays decryptable, 1d
//   not-before <RFC 3339 time>    activation time of the master
//   retire-at <RFC 3339 time|->   retirement time, "-" for none
//   kdf hstk-aes-ecb-v1           derivation scheme (docs/FORMAT.md); only one
//   replicable yes|no             created with --replicable
//   created <RFC 3339 time>       creation time
//
// Version 2 is version 1 with header "hsmstek-policy 2" and one more line:
//
//   ratchet <duration>            forward-secure ratchet interval: a
//                                 multiple of the period, at most 7 days
//
// A policy with the default ratchet (ratchet_s == 0) is written as version
// 1, so tokens provisioned before the ratchet existed read unchanged and
// older readers keep reading default policies; version 1 means the
// default: one day's worth of periods (DefaultRatchetPeriods).
//
// SerializePolicy writes canonical values (FormatDuration, FormatRfc3339
// with "Z"); ParsePolicy also accepts any value those parsers accept (e.g.
// "60m", "+02:00" offsets). A future version 2 gets a new header line;
// version 1 readers refuse it rather than guess.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"

namespace hsmstek::keystore {

inline constexpr char kPolicyHeader[] = "hsmstek-policy 1";
inline constexpr char kPolicyHeaderV2[] = "hsmstek-policy 2";
inline constexpr size_t kMaxPolicySize = 4096;
// The only KDF: C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA) as in key_name.h.
inline constexpr char kKdfAesEcbV1[] = "hstk-aes-ecb-v1";
// One minute: shorter periods buy nothing (a ticket key per few seconds)
// and inflate the per-master handle cache (window / period + 2 entries).
inline constexpr int64_t kMinPeriodSeconds = 60;
// Seven days: RFC 8446 §4.6.1 caps TLS 1.3 ticket lifetime at 7 days, and
// the advertised lifetime never exceeds the decrypt window.
inline constexpr int64_t kMaxDecryptWindowSeconds = 7 * 24 * 3600;
// At most this many epochs in a decrypt window (7 days of hourly keys). A
// forged ticket naming an old epoch costs a derivation before its MAC can
// be checked, and each server caches window / period + 2 key pairs per
// master, so the ratio bounds both the work an attacker can cause and the
// token memory a store uses.
inline constexpr int64_t kMaxWindowEpochs = 168;
// The ratchet interval (how long one link of the forward-secure chain
// serves, docs/DESIGN.md) is 1 to N periods and at most 7 days: a token
// seized at T opens no ticket older than T - window - interval, so the
// bound keeps that horizon within two weeks; and the first (default) day
// matches the 24 h of a day's worth of periods.
inline constexpr int64_t kMaxRatchetSeconds = 7 * 24 * 3600;
inline constexpr int64_t kDefaultRatchetSeconds = 24 * 3600;

struct Policy {
  int64_t period_s = 0;              // rotation period, seconds
  int64_t decrypt_window_s = 0;      // multiple of period_s
  int64_t not_before = 0;            // Unix time the master becomes active
  std::optional<int64_t> retire_at;  // Unix time it retires, if set
  std::string kdf = kKdfAesEcbV1;
  bool replicable = false;
  int64_t created_at = 0;  // Unix time
  // Ratchet interval, seconds (a multiple of period_s); 0: the default,
  // DefaultRatchetPeriods periods.
  int64_t ratchet_s = 0;

  bool operator==(const Policy &) const = default;
};

// DefaultRatchetPeriods returns max(1, floor(kDefaultRatchetSeconds /
// period_s)): one day's worth of periods (one period when longer).
int64_t DefaultRatchetPeriods(int64_t period_s);

// RatchetPeriods returns r, the periods one link serves: ratchet_s /
// period_s, or the default for ratchet_s == 0. At least 1 for a policy
// that passes ValidatePolicy.
uint64_t RatchetPeriods(const Policy &policy);

// SerializePolicy returns the canonical version-1 text (version 2 when
// ratchet_s is set) of `policy`. For a
// policy that passes ValidatePolicy, ParsePolicy(SerializePolicy(p)) == p.
std::string SerializePolicy(const Policy &policy);

// ParsePolicy parses version-1 or version-2 text and validates the result with
// ValidatePolicy. Errors are kInvalidArgument; format errors name the line
// ("policy line 3 (decrypt-window): ..."), semantic ones start with
// "invalid policy: ".
Result<Policy> ParsePolicy(std::string_view text);

// ValidatePolicy checks: kMinPeriodSeconds <= period_s; 0 < decrypt window
// <= kMaxDecryptWindowSeconds, a multiple of period_s spanning at most
// kMaxWindowEpochs periods; kdf is
// kKdfAesEcbV1; not_before and created_at in [0, kMaxRfc3339Time];
// retire_at, if set, in [1, kMaxRfc3339Time]; ratchet_s 0 or a positive
// multiple of period_s of at most kMaxRatchetSeconds. retire_at <= not_before
// is allowed: it is a pending master retired before it ever activated. Errors
// are kInvalidArgument naming the field.
Status ValidatePolicy(const Policy &policy);

}  // namespace hsmstek::keystore
