#include "keystore/duration.h"

#include <limits>

#include "common/bytes.h"

namespace hsmstek::keystore {
namespace {

constexpr int64_t kMinute = 60;
constexpr int64_t kHour = 60 * kMinute;
constexpr int64_t kDay = 24 * kHour;

// Returns the size of `unit` in seconds, or 0 for an unknown unit.
int64_t UnitSeconds(char unit) {
  switch (unit) {
    case 's':
      return 1;
    case 'm':
      return kMinute;
    case 'h':
      return kHour;
    case 'd':
      return kDay;
    default:
      return 0;
  }
}

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

Result<int64_t> ParseDuration(std::string_view text, ZeroDuration zero) {
  if (text.empty()) return InvalidArgument("empty duration");
  const std::string what = "duration " + QuoteForMessage(text);
  for (char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
        c == '\f') {
      return InvalidArgument(what + " contains whitespace");
    }
  }
  if (text[0] == '-') return InvalidArgument(what + " is negative");
  if (text[0] == '+') return InvalidArgument(what + " must not have a sign");

  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t total = 0;
  int64_t previous_unit = 0;  // 0: no group yet
  size_t i = 0;
  while (i < text.size()) {
    if (!IsDigit(text[i])) {
      return InvalidArgument(what + " has no number before " +
                             QuoteForMessage(text.substr(i, 1)));
    }
    int64_t value = 0;
    bool overflow = false;
    while (i < text.size() && IsDigit(text[i])) {
      int digit = text[i] - '0';
      if (value > (kMax - digit) / 10) overflow = true;
      if (!overflow) value = value * 10 + digit;
      ++i;
    }
    if (i == text.size()) {
      return InvalidArgument(what + " lacks a unit (s, m, h or d)");
    }
    const char unit_char = text[i++];
    const int64_t unit = UnitSeconds(unit_char);
    if (unit == 0) {
      return InvalidArgument(what + " has unknown unit " +
                             QuoteForMessage(std::string_view(&unit_char, 1)) +
                             " (use s, m, h or d)");
    }
    if (previous_unit != 0 && unit >= previous_unit) {
      return InvalidArgument(what + " repeats or misorders unit '" +
                             std::string(1, unit_char) +
                             "' (write larger units first, each once)");
    }
    previous_unit = unit;
    if (overflow || value > kMax / unit || total > kMax - value * unit) {
      return InvalidArgument(what + " overflows");
    }
    total += value * unit;
  }
  if (total == 0 && zero == ZeroDuration::kReject) {
    return InvalidArgument(what + " must be positive");
  }
  return total;
}

std::string FormatDuration(int64_t seconds) {
  if (seconds == 0) return "0s";
  std::string out;
  // Work in uint64_t so that INT64_MIN negates without overflow.
  uint64_t rest = static_cast<uint64_t>(seconds);
  if (seconds < 0) {
    out.push_back('-');
    rest = ~rest + 1;
  }
  static constexpr struct {
    uint64_t size;
    char unit;
  } kUnits[] = {{kDay, 'd'}, {kHour, 'h'}, {kMinute, 'm'}, {1, 's'}};
  for (const auto &u : kUnits) {
    if (rest >= u.size) {
      out += std::to_string(rest / u.size);
      out.push_back(u.unit);
      rest %= u.size;
    }
  }
  return out;
}

}  // namespace hsmstek::keystore
