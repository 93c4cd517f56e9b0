#include "tls/stats.h"

#include <bit>
#include <chrono>

namespace hsmstek::tls {
namespace {

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// The ticket operation in flight on this thread: libssl runs the token steps
// of a ticket synchronously, right after the callback, on the same thread.
enum class Pending : uint8_t { kNone, kSeal, kOpenResume, kOpenRenew };
struct InFlight {
  const TicketStats *stats = nullptr;
  Pending pending = Pending::kNone;
  uint64_t start_ns = 0;
};
thread_local InFlight t_in_flight;

}  // namespace

void LatencyHistogram::Record(uint64_t ns) {
  int bucket = ns == 0 ? 0 : 63 - std::countl_zero(ns);
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  uint64_t prev = max_.load(std::memory_order_relaxed);
  while (ns > prev && !max_.compare_exchange_weak(prev, ns)) {
  }
}

LatencyHistogram::Summary LatencyHistogram::Summarize() const {
  Summary s;
  std::array<uint64_t, 64> counts;
  for (size_t i = 0; i < counts.size(); ++i) {
    counts[i] = buckets_[i].load(std::memory_order_relaxed);
    s.count += counts[i];
  }
  s.max_ns = max_.load(std::memory_order_relaxed);
  if (s.count == 0) return s;
  auto percentile = [&](uint64_t per_mille) {
    uint64_t rank = (s.count * per_mille + 999) / 1000;
    uint64_t seen = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
      seen += counts[i];
      if (seen >= rank) {
        uint64_t upper = i >= 63 ? UINT64_MAX : (uint64_t{2} << i) - 1;
        return upper < s.max_ns ? upper : s.max_ns;
      }
    }
    return s.max_ns;
  };
  s.p50_ns = percentile(500);
  s.p99_ns = percentile(990);
  return s;
}

void TicketStats::BeginSeal() {
  seals_begun_.fetch_add(1, std::memory_order_relaxed);
  t_in_flight = InFlight{this, Pending::kSeal, NowNs()};
}

void TicketStats::BeginOpen(bool renew) {
  opens_begun_.fetch_add(1, std::memory_order_relaxed);
  t_in_flight = InFlight{
      this, renew ? Pending::kOpenRenew : Pending::kOpenResume, NowNs()};
}

void TicketStats::Reject(RejectReason reason) {
  switch (reason) {
    case RejectReason::kUnknownKey:
      unknown_.fetch_add(1);
      break;
    case RejectReason::kExpired:
      expired_.fetch_add(1);
      break;
    case RejectReason::kFuture:
      future_.fetch_add(1);
      break;
    case RejectReason::kNotRouted:
      not_routed_.fetch_add(1);
      break;
    case RejectReason::kPolicy:
      policy_.fetch_add(1);
      break;
    case RejectReason::kBudget:
      budget_.fetch_add(1);
      break;
    default:
      break;
  }
}

void TicketStats::OnTokenOp(provider::TokenOp op, bool ok) {
  InFlight &f = t_in_flight;
  if (!ok) {
    token_errors_.fetch_add(1);
    if (f.stats == this) f = InFlight{};
    return;
  }
  if (f.stats != this) return;
  const uint64_t elapsed = NowNs() - f.start_ns;
  if (op == provider::TokenOp::kSign && f.pending == Pending::kSeal) {
    issued_.fetch_add(1);
    seal_.Record(elapsed);
    f = InFlight{};
  } else if (op == provider::TokenOp::kDecrypt &&
             (f.pending == Pending::kOpenResume ||
              f.pending == Pending::kOpenRenew)) {
    // Opened; whether it resumed is known at the end of the handshake.
    open_.Record(elapsed);
    f = InFlight{};
  }
}

void TicketStats::HandshakeDone(bool reused, bool renew) {
  if (!reused) {
    not_resumed_.fetch_add(1);
  } else {
    (renew ? renewed_ : resumed_).fetch_add(1);
  }
}

void TicketStats::OnTokenCalls(provider::TokenOp op, bool for_open,
                               unsigned calls, uint64_t ns) {
  (for_open ? open_calls_ : seal_calls_)
      .fetch_add(calls, std::memory_order_relaxed);
  size_t index = static_cast<size_t>(op);
  if (index < call_latency_.size()) call_latency_[index].Record(ns);
}

TicketCounters TicketStats::Snapshot() const {
  TicketCounters c;
  c.issued = issued_.load();
  c.resumed = resumed_.load();
  c.renewed = renewed_.load();
  c.rejected_unknown_key = unknown_.load();
  c.rejected_expired = expired_.load();
  c.rejected_future = future_.load();
  c.rejected_not_routed = not_routed_.load();
  c.rejected_policy = policy_.load();
  c.rejected_budget = budget_.load();
  c.not_resumed = not_resumed_.load();
  c.early_data_refused = early_data_refused_.load();
  c.token_errors = token_errors_.load();
  c.exceptions = exceptions_.load();
  c.seal = seal_.Summarize();
  c.open = open_.Summarize();
  c.seals_begun = seals_begun_.load();
  c.opens_begun = opens_begun_.load();
  c.seal_calls = seal_calls_.load();
  c.open_calls = open_calls_.load();
  c.encrypt_calls =
      call_latency_[static_cast<size_t>(provider::TokenOp::kEncrypt)]
          .Summarize();
  c.decrypt_calls =
      call_latency_[static_cast<size_t>(provider::TokenOp::kDecrypt)]
          .Summarize();
  c.sign_calls =
      call_latency_[static_cast<size_t>(provider::TokenOp::kSign)].Summarize();
  return c;
}

}  // namespace hsmstek::tls
