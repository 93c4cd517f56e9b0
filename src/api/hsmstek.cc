// The exported C API: a thin layer over the internal C++ (BoringSSL style).
// Every entry point checks its handle's magic, catches every exception, and
// turns a Status into an HSMSTEK_* code plus a thread-local message.
#include "hsmstek/hsmstek.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "common/bytes.h"
#include "common/log.h"
#include "keystore/store.h"
#include "keystore/store_set.h"
#include "provider/provider.h"
#include "tls/ticket_callback.h"

struct hsmstek_store {
  static constexpr uint64_t kMagic = 0x6873746b73746f72;  // "hstkstor"
  uint64_t magic = kMagic;
  std::shared_ptr<hsmstek::keystore::KeyStore> store;  // the preferred one
  // Every token of the store (one member for hsmstek_store_open).
  std::shared_ptr<hsmstek::keystore::StoreSet> set;
  std::shared_ptr<hsmstek::tls::TicketStats> stats;
  hsmstek::tls::TicketOptions options;
  // One pool of pre-armed token operations for every SSL_CTX of the store.
  std::shared_ptr<hsmstek::provider::ArmedPool> armed;
};

namespace hsmstek {
namespace {

thread_local std::string t_last_error;

int CodeOf(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return HSMSTEK_OK;
    case ErrorCode::kInvalidArgument:
      return HSMSTEK_ERR_INVALID_ARGUMENT;
    case ErrorCode::kNotFound:
      return HSMSTEK_ERR_NOT_FOUND;
    case ErrorCode::kPermissionDenied:
      return HSMSTEK_ERR_PERMISSION_DENIED;
    case ErrorCode::kUnavailable:
      return HSMSTEK_ERR_UNAVAILABLE;
    case ErrorCode::kUnsupported:
      return HSMSTEK_ERR_UNSUPPORTED;
    case ErrorCode::kFailedPrecondition:
    case ErrorCode::kAlreadyExists:
      return HSMSTEK_ERR_FAILED_PRECONDITION;
    case ErrorCode::kInternal:
    default:
      return HSMSTEK_ERR_INTERNAL;
  }
}

int Fail(const Status &status) {
  t_last_error = status.message();
  return CodeOf(status.code());
}

int Succeed() {
  t_last_error.clear();
  return HSMSTEK_OK;
}

bool Valid(const hsmstek_store *store) {
  return store != nullptr && store->magic == hsmstek_store::kMagic;
}

// Runs `fn` so that no exception crosses the C boundary.
template <typename Fn>
int Guard(Fn &&fn) {
  try {
    return fn();
  } catch (const std::bad_alloc &) {
    return Fail(Internal("out of memory"));
  } catch (...) {
    return Fail(Internal("unexpected internal error"));
  }
}

std::shared_ptr<tls::TicketContext> ContextFor(const hsmstek_store *store) {
  auto context = std::make_shared<tls::TicketContext>();
  context->store = store->store;
  context->stores = store->set;
  context->stats = store->stats;
  context->options = store->options;
  if (context->options.prearm) context->armed = store->armed;
  return context;
}

hsmstek_latency ToLatency(const tls::LatencyHistogram::Summary &s) {
  return hsmstek_latency{s.count, s.p50_ns, s.p99_ns, s.max_ns};
}

}  // namespace
}  // namespace hsmstek

using hsmstek::Fail;
using hsmstek::Guard;
using hsmstek::InvalidArgument;
using hsmstek::Succeed;
using hsmstek::Valid;

extern "C" {

int hsmstek_store_open(const char *pkcs11_uri, hsmstek_store **out) {
  return hsmstek_store_open_tokens(&pkcs11_uri, 1, out);
}

int hsmstek_store_open_tokens(const char *const *pkcs11_uris, size_t count,
                              hsmstek_store **out) {
  return Guard([&] {
    if (out != nullptr) *out = nullptr;
    if (pkcs11_uris == nullptr || out == nullptr || count == 0 || count > 8) {
      return Fail(InvalidArgument("hsmstek_store_open: invalid argument"));
    }
    std::vector<std::string> uris;
    for (size_t i = 0; i < count; ++i) {
      if (pkcs11_uris[i] == nullptr) {
        return Fail(InvalidArgument("hsmstek_store_open: null URI"));
      }
      uris.emplace_back(pkcs11_uris[i]);
    }
    hsmstek::Result<std::shared_ptr<hsmstek::keystore::StoreSet>> set =
        hsmstek::keystore::StoreSet::Open(uris);
    if (!set.ok()) return Fail(set.status());
    auto handle = std::make_unique<hsmstek_store>();
    handle->set = std::move(*set);
    handle->store = handle->set->primary();
    handle->stats = std::make_shared<hsmstek::tls::TicketStats>();
    handle->armed =
        std::make_shared<hsmstek::provider::ArmedPool>(handle->store->token());
    *out = handle.release();
    return Succeed();
  });
}

int hsmstek_store_check(hsmstek_store *store) {
  return Guard([&] {
    if (!Valid(store)) return Fail(InvalidArgument("invalid store handle"));
    // Verifies that every reachable token holds the same masters.
    hsmstek::Status loaded = store->set->Load();
    if (!loaded.ok()) return Fail(loaded);
    hsmstek::Result<hsmstek::keystore::TicketKeys> keys =
        store->set->Active()->KeysForEncrypt();
    if (!keys.ok()) return Fail(keys.status());
    return Succeed();
  });
}

void hsmstek_store_close(hsmstek_store *store) {
  if (!Valid(store)) return;
  store->magic = 0;
  delete store;
}

const char *hsmstek_last_error(void) { return hsmstek::t_last_error.c_str(); }

int hsmstek_store_set_option(hsmstek_store *store, int option, long value) {
  return Guard([&] {
    if (!Valid(store)) return Fail(InvalidArgument("invalid store handle"));
    switch (option) {
      case HSMSTEK_OPT_CLOCK_SKEW_SECONDS:
        if (value < 0 || value > 3600) {
          return Fail(InvalidArgument("clock skew must be 0..3600 seconds"));
        }
        for (size_t i = 0; i < store->set->size(); ++i) {
          store->set->member(i)->set_clock_skew(value);
        }
        return Succeed();
      case HSMSTEK_OPT_TLS13_RENEW:
        if (value != 0 && value != 1) {
          return Fail(InvalidArgument("HSMSTEK_OPT_TLS13_RENEW takes 0 or 1"));
        }
        store->options.tls13_renew = value == 1;
        return Succeed();
      case HSMSTEK_OPT_EARLY_DATA:
        if (value != 0 && value != 1) {
          return Fail(InvalidArgument("HSMSTEK_OPT_EARLY_DATA takes 0 or 1"));
        }
        store->options.allow_early_data = value == 1;
        return Succeed();
      default:
        return Fail(
            InvalidArgument("unknown option " + std::to_string(option)));
    }
  });
}

SSL_CTX *hsmstek_ssl_ctx_new(hsmstek_store *store, const SSL_METHOD *method) {
  SSL_CTX *out = nullptr;
  Guard([&] {
    if (!Valid(store) || method == nullptr) {
      return Fail(InvalidArgument("hsmstek_ssl_ctx_new: invalid argument"));
    }
    hsmstek::Result<SSL_CTX *> ctx =
        hsmstek::tls::NewScopedSslCtx(method, hsmstek::ContextFor(store));
    if (!ctx.ok()) return Fail(ctx.status());
    out = *ctx;
    return Succeed();
  });
  return out;
}

int hsmstek_ssl_ctx_install(hsmstek_store *store, SSL_CTX *ctx) {
  return Guard([&] {
    if (!Valid(store) || ctx == nullptr) {
      return Fail(InvalidArgument("hsmstek_ssl_ctx_install: invalid argument"));
    }
    hsmstek::Status s =
        hsmstek::tls::InstallTicketCallback(ctx, hsmstek::ContextFor(store));
    return s.ok() ? Succeed() : Fail(s);
  });
}

int hsmstek_ssl_ctx_set_policy(SSL_CTX *ctx, const void *declared,
                               size_t declared_len) {
  return Guard([&] {
    if (ctx == nullptr || (declared == nullptr && declared_len != 0)) {
      return Fail(
          InvalidArgument("hsmstek_ssl_ctx_set_policy: invalid argument"));
    }
    std::span<const uint8_t> bytes(static_cast<const uint8_t *>(declared),
                                   declared_len);
    hsmstek::Status s = hsmstek::tls::SetDeclaredPolicy(ctx, bytes);
    return s.ok() ? Succeed() : Fail(s);
  });
}

int hsmstek_enable_process_wide(void) {
  return Guard([&] {
    hsmstek::Status s = hsmstek::provider::EnableProcessWide();
    return s.ok() ? Succeed() : Fail(s);
  });
}

int hsmstek_store_stats(hsmstek_store *store, hsmstek_stats *out) {
  return Guard([&] {
    if (out != nullptr) *out = hsmstek_stats{};
    if (!Valid(store) || out == nullptr) {
      return Fail(InvalidArgument("hsmstek_store_stats: invalid argument"));
    }
    hsmstek::tls::TicketCounters c = store->stats->Snapshot();
    out->tickets_issued = c.issued;
    out->tickets_resumed = c.resumed;
    out->tickets_renewed = c.renewed;
    out->rejected_unknown_key = c.rejected_unknown_key;
    out->rejected_expired = c.rejected_expired;
    out->rejected_future = c.rejected_future;
    out->rejected_not_routed = c.rejected_not_routed;
    out->token_errors = c.token_errors;
    out->derivations = store->store->derivations();
    out->reconnects = store->store->token()->generation();
    out->seal = hsmstek::ToLatency(c.seal);
    out->open = hsmstek::ToLatency(c.open);
    return Succeed();
  });
}

int hsmstek_store_token_stats(hsmstek_store *store, hsmstek_token_stats *out,
                              size_t out_size) {
  return Guard([&] {
    if (!Valid(store) || out == nullptr) {
      return Fail(
          InvalidArgument("hsmstek_store_token_stats: invalid argument"));
    }
    hsmstek::tls::TicketCounters c = store->stats->Snapshot();
    hsmstek_token_stats full{};
    full.seals = c.seals_begun;
    full.opens = c.opens_begun;
    full.seal_round_trips = c.seal_calls;
    full.open_round_trips = c.open_calls;
    full.round_trips_per_seal_milli =
        c.seals_begun == 0 ? 0 : c.seal_calls * 1000 / c.seals_begun;
    full.round_trips_per_open_milli =
        c.opens_begun == 0 ? 0 : c.open_calls * 1000 / c.opens_begun;
    full.encrypt = hsmstek::ToLatency(c.encrypt_calls);
    full.decrypt = hsmstek::ToLatency(c.decrypt_calls);
    full.sign = hsmstek::ToLatency(c.sign_calls);
    if (store->armed != nullptr) {
      hsmstek::provider::ArmedCounters a = store->armed->Snapshot();
      for (size_t k = 0; k < hsmstek::provider::kArmedKinds; ++k) {
        full.armed_hits += a.hits[k];
        full.armed_misses += a.misses[k];
        full.armed_failures += a.failed[k];
      }
    }
    // Older callers pass a smaller struct: fill only what they have.
    std::memcpy(out, &full, std::min(out_size, sizeof(full)));
    return Succeed();
  });
}

int hsmstek_store_resumption_stats(hsmstek_store *store,
                                   hsmstek_resumption_stats *out,
                                   size_t out_size) {
  return Guard([&] {
    if (!Valid(store) || out == nullptr) {
      return Fail(
          InvalidArgument("hsmstek_store_resumption_stats: invalid argument"));
    }
    hsmstek::tls::TicketCounters c = store->stats->Snapshot();
    hsmstek_resumption_stats full{};
    full.opened_not_resumed = c.not_resumed;
    full.rejected_policy = c.rejected_policy;
    full.early_data_refused = c.early_data_refused;
    full.rejected_budget = c.rejected_budget;
    std::memcpy(out, &full, std::min(out_size, sizeof(full)));
    return Succeed();
  });
}

void hsmstek_set_log_callback(void (*cb)(int level, const char *msg, void *arg),
                              void *arg) {
  hsmstek::log::SetSink(cb, arg);
}

}  // extern "C"

extern "C" {

size_t hsmstek_store_token_count(hsmstek_store *store) {
  return Valid(store) ? store->set->size() : 0;
}

int hsmstek_store_token_health(hsmstek_store *store, size_t index,
                               hsmstek_token_health *out, size_t out_size) {
  return Guard([&] {
    if (!Valid(store) || out == nullptr || out_size == 0 ||
        out_size > sizeof(hsmstek_token_health) ||
        index >= store->set->size()) {
      return Fail(
          InvalidArgument("hsmstek_store_token_health: invalid argument"));
    }
    const hsmstek::keystore::MemberHealth h = store->set->Health(index);
    hsmstek_token_health full{};
    full.up = h.health.up ? 1 : 0;
    full.active = h.active ? 1 : 0;
    full.verified = h.verified ? 1 : 0;
    full.ms_since_success = h.health.since_success_ms;
    full.failovers = h.failovers;
    full.faults = h.health.faults;
    auto copy = [](char *dst, size_t n, const std::string &src) {
      const size_t len = std::min(n - 1, src.size());
      std::memcpy(dst, src.data(), len);
      dst[len] = '\0';
    };
    copy(full.token, sizeof(full.token), h.token);
    copy(full.last_error, sizeof(full.last_error), h.health.last_error);
    std::memcpy(out, &full, out_size);
    // A size that cuts a string still leaves it NUL-terminated.
    auto terminate = [&](size_t offset, size_t size) {
      if (out_size > offset && out_size < offset + size) {
        reinterpret_cast<char *>(out)[out_size - 1] = '\0';
      }
    };
    terminate(offsetof(hsmstek_token_health, token), sizeof(full.token));
    terminate(offsetof(hsmstek_token_health, last_error),
              sizeof(full.last_error));
    return Succeed();
  });
}

int hsmstek_store_forward_secrecy(hsmstek_store *store,
                                  hsmstek_forward_secrecy *out,
                                  size_t out_size) {
  return Guard([&] {
    if (!Valid(store) || out == nullptr || out_size == 0 ||
        out_size > sizeof(hsmstek_forward_secrecy)) {
      return Fail(
          InvalidArgument("hsmstek_store_forward_secrecy: invalid argument"));
    }
    // The member handshakes use now, found without a token call (Active()
    // may fail over).
    std::shared_ptr<hsmstek::keystore::KeyStore> member = store->store;
    for (size_t i = 0; i < store->set->size(); ++i) {
      if (store->set->Health(i).active) member = store->set->member(i);
    }
    std::optional<hsmstek::keystore::ForwardSecrecy> fs =
        member->forward_secrecy();
    // A standby token opens tickets too: the horizon is the oldest of all.
    for (size_t i = 0; fs && i < store->set->size(); ++i) {
      std::optional<hsmstek::keystore::ForwardSecrecy> other =
          store->set->member(i)->forward_secrecy();
      if (!other) continue;
      fs->horizon = std::min(fs->horizon, other->horizon);
      fs->as_of = std::min(fs->as_of, other->as_of);
      fs->legacy_keys = std::max(fs->legacy_keys, other->legacy_keys);
    }
    if (!fs) {
      return Fail(hsmstek::FailedPrecondition(
          "store " + hsmstek::QuoteForMessage(member->label()) +
          ": no active master seen by the last maintenance pass"));
    }
    hsmstek_forward_secrecy full{};
    static_assert(sizeof(full.master) == sizeof(fs->master));
    static_assert(sizeof(full.current_link_check) == sizeof(fs->check));
    std::memcpy(full.master, fs->master.data(), sizeof(full.master));
    full.current_link = fs->current_link;
    std::memcpy(full.current_link_check, fs->check.data(),
                sizeof(full.current_link_check));
    full.horizon = fs->horizon;
    full.links_held = fs->links_held;
    full.as_of = fs->as_of;
    full.legacy_keys = fs->legacy_keys;
    std::memcpy(out, &full, out_size);
    return Succeed();
  });
}

}  // extern "C"
