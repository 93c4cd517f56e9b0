#include "keystore/time_format.h"

#include "common/bytes.h"

namespace hsmstek::keystore {
namespace {

constexpr int64_t kSecondsPerDay = 86400;

bool IsLeapYear(int64_t y) {
  return y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
}

int DaysInMonth(int64_t y, int m) {
  static constexpr int kDays[] = {31, 28, 31, 30, 31, 30,
                                  31, 31, 30, 31, 30, 31};
  return m == 2 && IsLeapYear(y) ? 29 : kDays[m - 1];
}

// Days since 1970-01-01 of the proleptic Gregorian date y-m-d (Howard
// Hinnant's days_from_civil).
int64_t DaysFromCivil(int64_t y, int m, int d) {
  y -= m <= 2;
  const int64_t era = (y >= 0 ? y : y - 399) / 400;
  const int64_t yoe = y - era * 400;
  const int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

// Inverse of DaysFromCivil.
void CivilFromDays(int64_t z, int64_t *y, int *m, int *d) {
  z += 719468;
  const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const int64_t doe = z - era * 146097;
  const int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  const int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const int64_t mp = (5 * doy + 2) / 153;
  *d = static_cast<int>(doy - (153 * mp + 2) / 5 + 1);
  *m = static_cast<int>(mp < 10 ? mp + 3 : mp - 9);
  *y = yoe + era * 400 + (*m <= 2);
}

// Reads exactly `n` decimal digits at text[*pos]; advances *pos.
bool ReadDigits(std::string_view text, size_t *pos, size_t n, int *out) {
  if (text.size() - *pos < n) return false;
  int v = 0;
  for (size_t i = 0; i < n; ++i) {
    char c = text[*pos + i];
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  *pos += n;
  *out = v;
  return true;
}

// Appends `v` (0 <= v < 10^width) as exactly `width` decimal digits.
void AppendDigits(int64_t v, int width, std::string *out) {
  char digits[4];
  for (int i = width - 1; i >= 0; --i) {
    digits[i] = static_cast<char>('0' + v % 10);
    v /= 10;
  }
  out->append(digits, static_cast<size_t>(width));
}

bool ReadChar(std::string_view text, size_t *pos, char a, char b = 0) {
  if (*pos >= text.size()) return false;
  char c = text[*pos];
  if (c != a && (b == 0 || c != b)) return false;
  ++*pos;
  return true;
}

}  // namespace

Result<int64_t> ParseRfc3339(std::string_view text) {
  if (text.empty()) return InvalidArgument("empty time");
  const std::string what = "time " + QuoteForMessage(text);
  const std::string shape =
      what + " is not RFC 3339 (YYYY-MM-DDTHH:MM:SSZ or ...+HH:MM)";
  size_t pos = 0;
  int year = 0, month = 0, day = 0, hour = 0, minute = 0, second = 0;
  if (!ReadDigits(text, &pos, 4, &year) || !ReadChar(text, &pos, '-') ||
      !ReadDigits(text, &pos, 2, &month) || !ReadChar(text, &pos, '-') ||
      !ReadDigits(text, &pos, 2, &day) || !ReadChar(text, &pos, 'T', 't') ||
      !ReadDigits(text, &pos, 2, &hour) || !ReadChar(text, &pos, ':') ||
      !ReadDigits(text, &pos, 2, &minute) || !ReadChar(text, &pos, ':') ||
      !ReadDigits(text, &pos, 2, &second)) {
    return InvalidArgument(shape);
  }
  if (ReadChar(text, &pos, '.')) {
    size_t digits = 0;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
      ++pos;
      ++digits;
    }
    if (digits == 0 || digits > 9) {
      return InvalidArgument(what + " has a fraction of " +
                             std::to_string(digits) +
                             " digits (1 to 9 allowed)");
    }
  }
  int64_t offset = 0;
  if (ReadChar(text, &pos, 'Z', 'z')) {
    offset = 0;
  } else if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) {
    const bool negative = text[pos] == '-';
    ++pos;
    int oh = 0, om = 0;
    if (!ReadDigits(text, &pos, 2, &oh) || !ReadChar(text, &pos, ':') ||
        !ReadDigits(text, &pos, 2, &om)) {
      return InvalidArgument(shape);
    }
    if (oh > 23 || om > 59) {
      return InvalidArgument(what + " has an out-of-range UTC offset");
    }
    offset = (oh * 60 + om) * 60;
    if (negative) offset = -offset;
  } else {
    return InvalidArgument(shape);
  }
  if (pos != text.size()) return InvalidArgument(shape);

  if (month < 1 || month > 12) {
    return InvalidArgument(what + " has month out of range");
  }
  if (day < 1 || day > DaysInMonth(year, month)) {
    return InvalidArgument(what + " has day out of range for its month");
  }
  if (hour > 23) return InvalidArgument(what + " has hour out of range");
  if (minute > 59) return InvalidArgument(what + " has minute out of range");
  if (second == 60) {
    return InvalidArgument(what + " is a leap second (not representable)");
  }
  if (second > 59) return InvalidArgument(what + " has second out of range");

  const int64_t days = DaysFromCivil(year, month, day);
  return days * kSecondsPerDay + hour * 3600 + minute * 60 + second - offset;
}

std::string FormatRfc3339(int64_t unix_time) {
  if (unix_time < kMinRfc3339Time) unix_time = kMinRfc3339Time;
  if (unix_time > kMaxRfc3339Time) unix_time = kMaxRfc3339Time;
  // Floor division: negative times belong to the day before 1970-01-01.
  int64_t days = unix_time / kSecondsPerDay;
  int64_t secs = unix_time % kSecondsPerDay;
  if (secs < 0) {
    secs += kSecondsPerDay;
    --days;
  }
  int64_t year = 0;
  int month = 0, day = 0;
  CivilFromDays(days, &year, &month, &day);
  std::string out;
  out.reserve(20);
  AppendDigits(year, 4, &out);
  out.push_back('-');
  AppendDigits(month, 2, &out);
  out.push_back('-');
  AppendDigits(day, 2, &out);
  out.push_back('T');
  AppendDigits(secs / 3600, 2, &out);
  out.push_back(':');
  AppendDigits(secs / 60 % 60, 2, &out);
  out.push_back(':');
  AppendDigits(secs % 60, 2, &out);
  out.push_back('Z');
  return out;
}

}  // namespace hsmstek::keystore
