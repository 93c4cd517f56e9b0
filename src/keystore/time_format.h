// RFC 3339 timestamps in UTC, without the C library's time functions (no
// timegm, no TZ lookup): pure integer arithmetic, thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace hsmstek::keystore {

// The representable range: 0000-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
inline constexpr int64_t kMinRfc3339Time = -62167219200;
inline constexpr int64_t kMaxRfc3339Time = 253402300799;

// ParseRfc3339 returns the Unix time (seconds) of an RFC 3339 date-time
//   YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)
// 'T' and 'Z' may be lower case (RFC 3339 §5.6). A fraction of 1 to 9
// digits is accepted and dropped (the result is the whole second at or
// before the instant). The offset is applied, so "2026-11-27T12:00:00+02:00"
// equals "2026-11-27T10:00:00Z". Refused with kInvalidArgument: any other
// shape (spaces, missing offset, date only), out-of-range fields (month 13,
// February 30 outside a leap year, hour 24, offset hour 24) and leap
// seconds (":60", which Unix time cannot represent). The result may lie
// slightly outside [kMinRfc3339Time, kMaxRfc3339Time] after an offset.
Result<int64_t> ParseRfc3339(std::string_view text);

// FormatRfc3339 returns `unix_time` as "YYYY-MM-DDTHH:MM:SSZ". Values
// outside [kMinRfc3339Time, kMaxRfc3339Time] are clamped to that range.
// For every t in the range, ParseRfc3339(FormatRfc3339(t)) == t.
std::string FormatRfc3339(int64_t unix_time);

}  // namespace hsmstek::keystore
