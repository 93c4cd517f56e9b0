// OutageLog: what the host's error log says about one store's token outage
// in one process. Handshakes report their outcome; the log gets one line
// when the first handshake is served without tickets because of the token,
// one a minute while that lasts (with the count so far), and one when a
// ticket works again (with the duration and the count). A failing token
// thus costs a bounded number of lines whatever the handshake rate.
//
// Lock-free (atomics only): nothing to hold across fork, and Ok() costs one
// relaxed load on the handshake path while the token is up.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

namespace hsmstek::log {

class OutageLog {
 public:
  // `subject` names what is out in every line (e.g. `store "web"`).
  explicit OutageLog(std::string subject) : subject_(std::move(subject)) {}

  // Failed: a handshake at `now` (Unix seconds of the store's clock) was
  // served without a ticket because of the token; `cause` is logged with
  // the first one of an outage only. `count`: add it to the handshakes
  // served without tickets (false for the second failure of one handshake,
  // e.g. a seal after a failed open).
  void Failed(int64_t now, std::string_view cause, bool count = true);
  // Ok: a ticket was sealed or opened with a token key at `now`.
  void Ok(int64_t now) {
    if (down_since_.load(std::memory_order_relaxed) != 0) Ended(now);
  }

  bool down() const { return down_since_.load() != 0; }
  // Outages seen since construction (for stats and tests).
  uint64_t outages() const { return outages_.load(); }

 private:
  void Ended(int64_t now);

  const std::string subject_;
  // Unix second the outage began (0: no outage). Time 0 is never a real
  // handshake time, so it can mean "up".
  std::atomic<int64_t> down_since_{0};
  std::atomic<int64_t> next_report_{0};
  std::atomic<uint64_t> without_tickets_{0};
  std::atomic<uint64_t> outages_{0};
};

}  // namespace hsmstek::log
