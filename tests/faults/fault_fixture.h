// Fixture of the fault tests: stores in one SoftHSM token reached through
// the fault-injecting module (fault_env.h), servers with ticket resumption
// only (no server-side session cache, so every resumption is a ticket the
// token opened), and fault rules that are cleared after every test.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "fault_env.h"
#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "softhsm.h"
#include "tls/ticket_callback.h"
#include "tls_harness.h"

namespace hsmstek::testing {

inline constexpr char kFaultToken[] = "faults";
inline constexpr int64_t kHour = 3600;
inline constexpr int64_t kDay = 24 * kHour;
// Ten minutes into epoch 493000 of a one-hour period: no epoch boundary is
// crossed during a test, so a derivation happens only after a reconnect.
inline constexpr int64_t kStart = 493000 * kHour + 600;

// EnsureFaultStore creates the token (once per process) and a store `label`
// with one active master in it (once per label), with no faults active.
void EnsureFaultStore(const std::string &label);

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override { SetRules(""); }
  void TearDown() override { SetRules(""); }

  // A fresh KeyStore (its own Token: own sessions and login) on `label`,
  // with no back-off between reconnects and no background thread: recovery
  // is driven by handshakes alone, never by time.
  std::shared_ptr<keystore::KeyStore> OpenStore(const std::string &label);

  std::shared_ptr<tls::TicketContext> ContextFor(
      std::shared_ptr<keystore::KeyStore> store);

  // A scoped-routing server for `version` whose only resumption mechanism
  // is the ticket (server session cache off).
  UniqueSslCtx ServerCtx(std::shared_ptr<tls::TicketContext> context,
                         int version);

  FakeClock clock_{kStart};
};

// A copy of `session` to offer again (a TLS 1.3 client does not offer the
// same session object twice). Null in, null out.
UniqueSslSession Reoffer(const SSL_SESSION *session);

// The ticket bytes `r` left in the client (empty if none).
Bytes TicketOfResult(const HandshakeResult &r);

}  // namespace hsmstek::testing
