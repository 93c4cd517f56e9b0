// Durations as operators write them: "90s", "15m", "1h", "7d", "1h30m".
//
// Grammar (strict, ASCII only): one or more groups `<digits><unit>` with
// unit one of s, m, h, d (seconds, minutes, hours, days), units in strictly
// decreasing size ("1d12h" yes, "30m1h" and "1h1h" no). No sign, no
// whitespace, no bare number without unit. Pure functions, thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace hsmstek::keystore {

// Whether a total of zero seconds ("0s") is acceptable.
enum class ZeroDuration { kReject, kAllow };

// ParseDuration returns the number of seconds `text` denotes. Errors are
// kInvalidArgument with a message that quotes (a printable prefix of) the
// input: "empty duration", "... contains whitespace", "... is negative",
// "... lacks a unit", "... has unknown unit 'x'", "... repeats or misorders
// unit 'h'", "... overflows", "... must be positive" (zero when `zero` is
// kReject, the default).
Result<int64_t> ParseDuration(std::string_view text,
                              ZeroDuration zero = ZeroDuration::kReject);

// FormatDuration returns the canonical form of `seconds`: largest units
// first, zero groups left out ("1d2h", "1m30s", "1h"); 0 is "0s". A negative
// value gets a leading '-' (which ParseDuration refuses). For every
// seconds > 0, ParseDuration(FormatDuration(seconds)) == seconds.
std::string FormatDuration(int64_t seconds);

}  // namespace hsmstek::keystore
