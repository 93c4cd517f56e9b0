// Rate-limited logging for paths a remote client can drive (the ticket
// callback): one message per cause per interval, with the number held
// back since, so a failing token cannot flood the host's error log.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/log.h"
#include "common/status.h"

namespace hsmstek::log {

// The cause of `status` for rate limiting: its code and CKR, never its
// text (which may carry varying details such as an epoch).
std::string CauseOf(const Status &status);

// Emits `msg` at `level` unless a message of the same `cause` was emitted
// less than `interval_s` ago (by `now`, Unix seconds of the caller's
// clock); the next one emitted says how many were held back. Remembers at
// most 64 causes (then the oldest is forgotten). Thread-safe.
void EmitLimited(Level level, std::string_view cause, std::string_view msg,
                 int64_t now, int64_t interval_s = 60);

}  // namespace hsmstek::log
