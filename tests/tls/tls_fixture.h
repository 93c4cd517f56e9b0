// Servers whose tickets go through a store in a fresh SoftHSM token, on a
// fake clock.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "softhsm.h"
#include "tls/ticket_callback.h"
#include "tls_harness.h"

namespace hsmstek::testing {

inline constexpr int64_t kHour = 3600;
inline constexpr int64_t kDay = 24 * kHour;
// Ten minutes into epoch 493000 of a one-hour period.
inline constexpr int64_t kStart = 493000 * kHour + 600;

inline keystore::Policy TestPolicy(int64_t window = kDay) {
  keystore::Policy p;
  p.period_s = kHour;
  p.decrypt_window_s = window;
  p.not_before = kStart - 30 * kDay;
  p.created_at = p.not_before;
  return p;
}

class TlsTest : public ::testing::Test {
 protected:
  std::shared_ptr<keystore::KeyStore> OpenStore(const std::string &token,
                                                const std::string &label) {
    keystore::StoreOptions options;
    options.clock = &clock_;
    options.background_maintenance = false;
    options.token.read_write = true;
    options.token.backoff_initial = std::chrono::milliseconds(0);
    auto store =
        keystore::KeyStore::Open(SoftHsm::Get().Uri(token, label), options);
    EXPECT_TRUE(store.ok()) << store.status().message();
    return *store;
  }

  // A store with one active master, freshly provisioned.
  std::shared_ptr<keystore::KeyStore> ProvisionedStore(
      const std::string &token, const std::string &label,
      const keystore::Policy &policy = TestPolicy()) {
    auto store = OpenStore(token, label);
    Result<p11::Session> s = store->token()->Acquire();
    EXPECT_TRUE(s.ok()) << s.status().message();
    Result<keystore::StoreId> id = keystore::CreateMaster(*s, label, policy);
    EXPECT_TRUE(id.ok()) << id.status().message();
    return store;
  }

  std::shared_ptr<tls::TicketContext> ContextFor(
      std::shared_ptr<keystore::KeyStore> store,
      tls::TicketOptions options = {}) {
    auto context = std::make_shared<tls::TicketContext>();
    context->store = std::move(store);
    context->stats = std::make_shared<tls::TicketStats>();
    context->options = options;
    return context;
  }

  // A scoped-routing server context for `version`.
  UniqueSslCtx ServerCtx(std::shared_ptr<tls::TicketContext> context,
                         int version) {
    Result<SSL_CTX *> ctx =
        tls::NewScopedSslCtx(TLS_server_method(), std::move(context));
    EXPECT_TRUE(ctx.ok()) << ctx.status().message();
    PrepareServerCtx(*ctx, version);
    return UniqueSslCtx(*ctx);
  }

  FakeClock clock_{kStart};
};

}  // namespace hsmstek::testing
