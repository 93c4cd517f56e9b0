// Fuzz target: ParseDuration and ParseRfc3339 (CLI options, policy values),
// plus the formatting and key-name arithmetic on arbitrary integers.
// Invariants: parse -> format -> parse is the identity; formatting never
// produces text its parser refuses; key names keep their epoch.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "keystore/duration.h"
#include "keystore/key_name.h"
#include "keystore/time_format.h"

namespace hsmstek::fuzz {
namespace {

void Check(bool ok, const char *what) {
  if (ok) return;
  std::fprintf(stderr, "fuzz_duration_time invariant failed: %s\n", what);
  std::abort();
}

void CheckError(const Status &s) {
  Check(s.code() == ErrorCode::kInvalidArgument, "error code");
  Check(!s.message().empty() && s.message().size() < 300, "error message");
}

}  // namespace

int FuzzDurationTime(const uint8_t *data, size_t size) {
  using keystore::EpochAt;
  using keystore::EpochStart;
  using keystore::FormatDuration;
  using keystore::FormatRfc3339;
  using keystore::KeyName;
  using keystore::kMaxRfc3339Time;
  using keystore::kMinRfc3339Time;
  using keystore::ParseDuration;
  using keystore::ParseRfc3339;
  using keystore::StoreId;
  using keystore::ZeroDuration;
  const std::string_view text(reinterpret_cast<const char *>(data), size);

  Result<int64_t> d = ParseDuration(text, ZeroDuration::kAllow);
  Result<int64_t> positive = ParseDuration(text);
  if (d.ok()) {
    Check(*d >= 0, "duration not negative");
    Check(positive.ok() == (*d > 0), "zero rule");
    Result<int64_t> back =
        ParseDuration(FormatDuration(*d), ZeroDuration::kAllow);
    Check(back.ok() && *back == *d, "duration round trip");
  } else {
    CheckError(d.status());
    Check(!positive.ok(), "reject mode is stricter");
  }

  Result<int64_t> t = ParseRfc3339(text);
  if (t.ok()) {
    Check(*t >= kMinRfc3339Time - 86400 && *t <= kMaxRfc3339Time + 86400,
          "time range");
    if (*t >= kMinRfc3339Time && *t <= kMaxRfc3339Time) {
      Result<int64_t> back = ParseRfc3339(FormatRfc3339(*t));
      Check(back.ok() && *back == *t, "time round trip");
    }
  } else {
    CheckError(t.status());
  }

  // Arbitrary integers from the first 16 bytes.
  if (size >= 16) {
    int64_t a = 0;
    uint64_t b = 0;
    std::memcpy(&a, data, 8);
    std::memcpy(&b, data + 8, 8);
    const std::string formatted = FormatRfc3339(a);
    Check(formatted.size() == 20, "formatted time length");
    Result<int64_t> back = ParseRfc3339(formatted);
    const int64_t clamped = a < kMinRfc3339Time   ? kMinRfc3339Time
                            : a > kMaxRfc3339Time ? kMaxRfc3339Time
                                                  : a;
    Check(back.ok() && *back == clamped, "formatted time parses");
    if (a > 0) {
      Result<int64_t> dur = ParseDuration(FormatDuration(a));
      Check(dur.ok() && *dur == a, "formatted duration parses");
    }
    StoreId id;
    std::memcpy(id.data(), data, id.size());
    const KeyName name = keystore::MakeKeyName(id, b);
    Check(keystore::KeyNameEpoch(name) == b &&
              keystore::KeyNameStoreId(name) == id,
          "key name");
    const int64_t period = static_cast<int64_t>(b % 604800) + 1;
    const uint64_t epoch = EpochAt(a, period);
    if (a >= 0) {
      Check(EpochStart(epoch, period) <= a, "epoch start before time");
      Check(a - EpochStart(epoch, period) < period, "epoch contains time");
    } else {
      Check(epoch == 0, "negative time is epoch 0");
    }
  }
  return 0;
}

}  // namespace hsmstek::fuzz

#ifdef HSMSTEK_LIBFUZZER
extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  return hsmstek::fuzz::FuzzDurationTime(data, size);
}
#endif
