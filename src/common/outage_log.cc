#include "common/outage_log.h"

#include "common/log.h"

namespace hsmstek::log {

namespace {
constexpr int64_t kReportInterval = 60;
}  // namespace

void OutageLog::Failed(int64_t now, std::string_view cause, bool count) {
  const int64_t start = now > 0 ? now : 1;
  if (count) without_tickets_.fetch_add(1);
  int64_t expected = 0;
  if (down_since_.compare_exchange_strong(expected, start)) {
    next_report_.store(start + kReportInterval);
    outages_.fetch_add(1);
    Warning("hsmstek: " + subject_ +
            ": token outage: handshakes complete without session tickets (" +
            std::string(cause) + ")");
    return;
  }
  int64_t next = next_report_.load();
  if (now < next ||
      !next_report_.compare_exchange_strong(next, now + kReportInterval)) {
    return;
  }
  Warning("hsmstek: " + subject_ + ": token outage continues (" +
          std::to_string(now - expected) + " s, " +
          std::to_string(without_tickets_.load()) +
          " tickets not issued so far)");
}

void OutageLog::Ended(int64_t now) {
  const int64_t since = down_since_.exchange(0);
  if (since == 0) return;  // another thread logged the end
  const uint64_t count = without_tickets_.exchange(0);
  Warning("hsmstek: " + subject_ + ": token outage over after " +
          std::to_string(now > since ? now - since : 0) + " s; " +
          std::to_string(count) + " tickets were not issued");
}

}  // namespace hsmstek::log
