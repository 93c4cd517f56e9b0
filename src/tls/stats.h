// Per-store ticket counters and seal/open latency, fed by the ticket
// callback and by the provider's token-operation observer. Lock-free.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

#include "provider/key_ref.h"

namespace hsmstek::tls {

// Log2 histogram of nanoseconds: bucket i holds values in [2^i, 2^(i+1)).
class LatencyHistogram {
 public:
  void Record(uint64_t ns);
  struct Summary {
    uint64_t count = 0, p50_ns = 0, p99_ns = 0, max_ns = 0;
  };
  // Percentiles are the upper bound of the bucket holding them (at most 2x
  // the true value), clamped to the observed maximum.
  Summary Summarize() const;

 private:
  std::array<std::atomic<uint64_t>, 64> buckets_{};
  std::atomic<uint64_t> max_{0};
};

enum class RejectReason : uint8_t {
  kUnknownKey,
  kExpired,
  kFuture,
  kNotRouted,
  // Opened, but issued under another security policy (tls/policy_digest.h).
  kPolicy,
  // An old epoch past the store's derivation budget (a flood of old names).
  kBudget
};

struct TicketCounters {
  uint64_t issued = 0, resumed = 0, renewed = 0;
  uint64_t rejected_unknown_key = 0, rejected_expired = 0, rejected_future = 0,
           rejected_not_routed = 0, rejected_policy = 0, rejected_budget = 0;
  // Tickets we opened and handed to OpenSSL that still ended in a full
  // handshake (session id context, version, cipher, 0-RTT checks).
  uint64_t not_resumed = 0;
  // Server handshakes in which early data was switched off because the
  // connection's SSL_CTX enables it without the early-data option.
  uint64_t early_data_refused = 0;
  uint64_t token_errors = 0;
  // Exceptions stopped at a barrier (the ticket callback, a token
  // operation) while working for this store: each also counts as a token
  // error and ended as a full handshake (common/barrier.h).
  uint64_t exceptions = 0;
  LatencyHistogram::Summary seal, open;
  // Token round trips made on the handshake thread (a pre-armed step is
  // one, an on-demand step two) and the ticket operations they served.
  uint64_t seals_begun = 0, opens_begun = 0, seal_calls = 0, open_calls = 0;
  // Time of each step's token calls on the handshake thread.
  LatencyHistogram::Summary encrypt_calls, decrypt_calls, sign_calls;
};

// TicketStats counts what the callback decides and what the token then
// does. A seal counts as issued when its last token step (the HMAC) has
// succeeded. An opened ticket counts as resumed/renewed only when the
// handshake it was presented in completed as a resumption (HandshakeDone),
// and as not_resumed when OpenSSL completed a full handshake instead.
// Latency runs from the callback's entry to the last token step.
class TicketStats final : public provider::TokenOpObserver {
 public:
  // Called by the callback on the handshake thread before it returns.
  void BeginSeal();
  void BeginOpen(bool renew);
  void Reject(RejectReason reason);
  void TokenError() { token_errors_.fetch_add(1); }
  // A handshake in which we accepted a ticket has completed.
  void HandshakeDone(bool reused, bool renew);
  void EarlyDataRefused() { early_data_refused_.fetch_add(1); }

  void OnTokenOp(provider::TokenOp op, bool ok) override;
  void OnException() noexcept override { exceptions_.fetch_add(1); }
  void OnTokenCalls(provider::TokenOp op, bool for_open, unsigned calls,
                    uint64_t ns) override;

  TicketCounters Snapshot() const;

 private:
  std::atomic<uint64_t> issued_{0}, resumed_{0}, renewed_{0};
  std::atomic<uint64_t> unknown_{0}, expired_{0}, future_{0}, not_routed_{0},
      policy_{0}, budget_{0};
  std::atomic<uint64_t> not_resumed_{0}, early_data_refused_{0};
  std::atomic<uint64_t> token_errors_{0};
  std::atomic<uint64_t> exceptions_{0};
  std::atomic<uint64_t> seals_begun_{0}, opens_begun_{0}, seal_calls_{0},
      open_calls_{0};
  LatencyHistogram seal_, open_;
  std::array<LatencyHistogram, 3> call_latency_;  // by provider::TokenOp
};

}  // namespace hsmstek::tls
