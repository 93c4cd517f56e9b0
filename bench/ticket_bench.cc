// hsmstek_bench: what token custody costs, next to the token's own floor and
// next to in-memory ticket keys (issue 6). Google Benchmark; run through
// scripts/bench.sh, which interleaves, repeats and computes the ratios.
//
// Benchmarks (all wall-clock time):
//   floor/seal, floor/open      raw PKCS#11 on one session: C_EncryptInit +
//                               C_Encrypt and C_SignInit + C_Sign (seal);
//                               C_SignInit + C_Sign and C_DecryptInit +
//                               C_Decrypt (open), epoch keys derived like
//                               hsmstek's, a TLS 1.3 ticket's plaintext size.
//   evp/{seal,open}/<variant>   one ticket sealed/opened exactly as libssl
//                               3.0 does it (contexts created per ticket, the
//                               ticket key callback, one update + final, MAC
//                               update + final), variant hsmstek (token) or
//                               nginx_style (raw keys in memory).
//   resume/<tls>/<variant>      in-process resumption handshakes (client and
//                               server in this process, BIO pair), 1 and 2
//                               threads sharing the server SSL_CTX.
//   full/<tls>/<variant>        full handshakes (run in a separate process
//                               with --process-wide to price the delegated
//                               HMAC).
//
// Extra flags (before Google Benchmark's own):
//   --process-wide   call hsmstek_enable_process_wide() before anything else
//   --provision=URI  only create a master in the store URI names (in an
//                    existing token; SOFTHSM2_CONF from the environment),
//                    then exit: scripts/bench.sh uses it for nginx
//   --iterations=N   run every benchmark for exactly N iterations (for
//                    profilers; see bench/callgrind.sh)
//
// Exit status is 1 if any benchmark failed (e.g. a handshake that should
// have resumed did not), so a smoke run catches broken benchmarks.
#include <benchmark/benchmark.h>
#include <hsmstek/hsmstek.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "bench_env.h"
#include "pkcs11/token.h"
#include "provider/key_ref.h"
#include "tls/ticket_callback.h"

namespace hsmstek::bench {
namespace {

std::atomic<bool> g_failed{false};

void Fail(benchmark::State &state, const std::string &why) {
  g_failed.store(true);
  state.SkipWithError(why.c_str());
}

constexpr size_t kNameLen = 16;
constexpr size_t kIvLen = 16;
constexpr size_t kMacLen = 32;
constexpr size_t kHeaderLen = kNameLen + kIvLen;

// Ticket bytes: name || iv || ciphertext || mac.
struct Ticket {
  std::vector<unsigned char> bytes;
  size_t len = 0;
};

std::vector<unsigned char> Plaintext() {
  std::vector<unsigned char> p(TicketPlaintextSize(TLS1_3_VERSION));
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<unsigned char>(i);
  return p;
}

size_t MaxTicketLen(size_t plaintext) {
  return kHeaderLen + plaintext + 16 + kMacLen;
}

// ---- 1. the floor: raw PKCS#11
// ------------------------------------------------

struct FloorKeys {
  CK_OBJECT_HANDLE aes, hmac;
};

[[gnu::noinline]] bool FloorSeal(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE h,
                                 const FloorKeys &k,
                                 const std::vector<unsigned char> &plain,
                                 Ticket *t) {
  unsigned char *out = t->bytes.data();
  CK_MECHANISM aes{CKM_AES_CBC_PAD, out + kNameLen, kIvLen};
  CK_ULONG ct_len = static_cast<CK_ULONG>(t->bytes.size() - kHeaderLen);
  if (f->C_EncryptInit(h, &aes, k.aes) != CKR_OK) return false;
  if (f->C_Encrypt(h, const_cast<unsigned char *>(plain.data()),
                   static_cast<CK_ULONG>(plain.size()), out + kHeaderLen,
                   &ct_len) != CKR_OK) {
    return false;
  }
  CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
  CK_ULONG mac_len = kMacLen;
  if (f->C_SignInit(h, &mac, k.hmac) != CKR_OK) return false;
  if (f->C_Sign(h, out, kHeaderLen + ct_len, out + kHeaderLen + ct_len,
                &mac_len) != CKR_OK) {
    return false;
  }
  t->len = kHeaderLen + ct_len + mac_len;
  return true;
}

[[gnu::noinline]] bool FloorOpen(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE h,
                                 const FloorKeys &k, const Ticket &t,
                                 std::vector<unsigned char> *plain) {
  unsigned char *in = const_cast<unsigned char *>(t.bytes.data());
  CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
  unsigned char tag[kMacLen];
  CK_ULONG tag_len = kMacLen;
  if (f->C_SignInit(h, &mac, k.hmac) != CKR_OK) return false;
  if (f->C_Sign(h, in, t.len - kMacLen, tag, &tag_len) != CKR_OK) return false;
  CK_MECHANISM aes{CKM_AES_CBC_PAD, in + kNameLen, kIvLen};
  CK_ULONG out_len = static_cast<CK_ULONG>(plain->size());
  if (f->C_DecryptInit(h, &aes, k.aes) != CKR_OK) return false;
  if (f->C_Decrypt(h, in + kHeaderLen, t.len - kHeaderLen - kMacLen,
                   plain->data(), &out_len) != CKR_OK) {
    return false;
  }
  return out_len + 16 == plain->size();  // `plain` has a block to spare
}

void BM_Floor(benchmark::State &state, bool seal) {
  Env &env = Env::Get();
  Result<keystore::TicketKeys> keys = env.keystore()->KeysForEncrypt();
  if (!keys.ok()) return Fail(state, keys.status().message());
  Result<p11::Session> session = env.keystore()->token()->Acquire();
  if (!session.ok()) return Fail(state, session.status().message());
  CK_FUNCTION_LIST *f = session->fn();
  const CK_SESSION_HANDLE h = session->handle();
  const FloorKeys k{keys->aes, keys->hmac};
  const std::vector<unsigned char> plain = Plaintext();
  Ticket t;
  t.bytes.assign(MaxTicketLen(plain.size()), 0x42);
  std::vector<unsigned char> opened(plain.size() + 16);
  if (!FloorSeal(f, h, k, plain, &t)) return Fail(state, "floor seal failed");
  for (auto _ : state) {
    bool ok =
        seal ? FloorSeal(f, h, k, plain, &t) : FloorOpen(f, h, k, t, &opened);
    if (!ok) return Fail(state, "PKCS#11 call failed");
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["ticket_bytes"] = benchmark::Counter(
      static_cast<double>(t.len), benchmark::Counter::kAvgThreads);
}

// ---- 2. one ticket through EVP, as libssl 3.0 drives it
// ----------------------

using TicketCb = int (*)(SSL *, unsigned char *, unsigned char *,
                         EVP_CIPHER_CTX *, EVP_MAC_CTX *, int);

// libssl's ssl_hmac_new: fetch "HMAC" with the SSL_CTX's library context and
// property query, one context per ticket.
EVP_MAC_CTX *NewTicketMac(const char *propq) {
  EVP_MAC *mac = EVP_MAC_fetch(nullptr, "HMAC", propq);
  EVP_MAC_CTX *ctx = mac == nullptr ? nullptr : EVP_MAC_CTX_new(mac);
  EVP_MAC_free(mac);
  return ctx;
}

// construct_stateless_ticket() of libssl 3.0, minus the session encoding.
[[gnu::noinline]] bool LibsslSeal(SSL *ssl, TicketCb cb, const char *propq,
                                  const std::vector<unsigned char> &plain,
                                  Ticket *t) {
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  EVP_MAC_CTX *hctx = NewTicketMac(propq);
  unsigned char *out = t->bytes.data();
  bool ok = ctx != nullptr && hctx != nullptr;
  int len = 0, len_final = 0;
  size_t mac_len = 0;
  ok = ok && cb(ssl, out, out + kNameLen, ctx, hctx, 1) == 1;
  ok = ok && EVP_EncryptUpdate(ctx, out + kHeaderLen, &len, plain.data(),
                               static_cast<int>(plain.size())) == 1;
  ok = ok && EVP_EncryptFinal(ctx, out + kHeaderLen + len, &len_final) == 1;
  const size_t ct_len = static_cast<size_t>(len + len_final);
  ok = ok && EVP_MAC_update(hctx, out, kHeaderLen + ct_len) == 1;
  ok = ok &&
       EVP_MAC_final(hctx, out + kHeaderLen + ct_len, &mac_len, kMacLen) == 1;
  t->len = kHeaderLen + ct_len + mac_len;
  EVP_CIPHER_CTX_free(ctx);
  EVP_MAC_CTX_free(hctx);
  return ok && mac_len == kMacLen;
}

// tls_decrypt_ticket() of libssl 3.0, minus the session decoding.
[[gnu::noinline]] bool LibsslOpen(SSL *ssl, TicketCb cb, const char *propq,
                                  const Ticket &t, size_t expected_plain) {
  EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
  EVP_MAC_CTX *hctx = NewTicketMac(propq);
  bool ok = ctx != nullptr && hctx != nullptr;
  unsigned char *in = const_cast<unsigned char *>(t.bytes.data());
  int r = ok ? cb(ssl, in, in + kNameLen, ctx, hctx, 0) : 0;
  ok = ok && (r == 1 || r == 2);
  ok = ok && EVP_MAC_CTX_get_mac_size(hctx) == kMacLen;
  unsigned char tag[EVP_MAX_MD_SIZE];
  ok = ok && EVP_MAC_update(hctx, in, t.len - kMacLen) == 1;
  ok = ok && EVP_MAC_final(hctx, tag, nullptr, sizeof(tag)) == 1;
  ok = ok && CRYPTO_memcmp(tag, in + t.len - kMacLen, kMacLen) == 0;
  const int ct_len = static_cast<int>(t.len - kHeaderLen - kMacLen);
  unsigned char *sdec = ok ? static_cast<unsigned char *>(
                                 OPENSSL_malloc(static_cast<size_t>(ct_len)))
                           : nullptr;
  int slen = 0, declen = 0;
  ok = ok && sdec != nullptr &&
       EVP_DecryptUpdate(ctx, sdec, &slen, in + kHeaderLen, ct_len) == 1;
  ok = ok && EVP_DecryptFinal(ctx, sdec + slen, &declen) == 1;
  ok = ok && static_cast<size_t>(slen + declen) == expected_plain;
  OPENSSL_free(sdec);
  EVP_CIPHER_CTX_free(ctx);
  EVP_MAC_CTX_free(hctx);
  return ok;
}

void BM_Evp(benchmark::State &state, bool seal, Tickets tickets) {
  Env &env = Env::Get();
  // An SSL of the variant's server context: the callback finds its store
  // through it, as in a handshake.
  SSL_CTX *server = env.ServerCtx(tickets, TLS1_3_VERSION);
  SSL *ssl = SSL_new(server);
  const bool token = tickets == Tickets::kHsmstek;
  TicketCb cb = token ? tls::TicketKeyCallback : NginxStyleCallback;
  // hsmstek_ssl_ctx_new's scoped property query; nginx's contexts have none.
  const char *propq = token ? provider::kPreferProviderQuery : nullptr;
  const std::vector<unsigned char> plain = Plaintext();
  Ticket t;
  t.bytes.assign(MaxTicketLen(plain.size()), 0);
  if (ssl == nullptr || !LibsslSeal(ssl, cb, propq, plain, &t)) {
    SSL_free(ssl);
    return Fail(state, "first seal failed");
  }
  for (auto _ : state) {
    bool ok = seal ? LibsslSeal(ssl, cb, propq, plain, &t)
                   : LibsslOpen(ssl, cb, propq, t, plain.size());
    if (!ok) {
      SSL_free(ssl);
      return Fail(state, seal ? "seal failed" : "open failed");
    }
  }
  SSL_free(ssl);
  state.SetItemsProcessed(state.iterations());
  state.counters["ticket_bytes"] = benchmark::Counter(
      static_cast<double>(t.len), benchmark::Counter::kAvgThreads);
}

// ---- 3-5. handshakes --------------------------------------------------------

// One resumption handshake; a separate function so that profilers
// (valgrind --toggle-collect='*ResumeOnce*') see only the measured loop.
[[gnu::noinline]] bool ResumeOnce(SSL_CTX *client, SSL_CTX *server,
                                  SSL_SESSION *session, Outcome *out) {
  return Connect(client, server, session, out);
}

[[gnu::noinline]] bool FullOnce(SSL_CTX *client, SSL_CTX *server,
                                Outcome *out) {
  return Connect(client, server, nullptr, out);
}

void BM_Resume(benchmark::State &state, Tickets tickets, int version) {
  SSL_CTX *server = Env::Get().ServerCtx(tickets, version);
  UniqueSslCtx client = NewClientCtx(version);
  Outcome first;
  if (!Connect(client.get(), server, nullptr, &first) || !first.newest) {
    return Fail(state, "initial full handshake failed: " + first.error);
  }
  UniqueSslSession session = std::move(first.newest);
  for (auto _ : state) {
    Outcome out;
    if (!ResumeOnce(client.get(), server, session.get(), &out)) {
      return Fail(state, "resumption failed: " + out.error);
    }
    if (!out.reused) {
      return Fail(state, "handshake did not resume (ticket not accepted)");
    }
    // Like a real client, resume next time with the newest ticket.
    if (out.newest) session = std::move(out.newest);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Full(benchmark::State &state, Tickets tickets, int version) {
  SSL_CTX *server = Env::Get().ServerCtx(tickets, version);
  UniqueSslCtx client = NewClientCtx(version);
  for (auto _ : state) {
    Outcome out;
    if (!FullOnce(client.get(), server, &out)) {
      return Fail(state, "full handshake failed: " + out.error);
    }
    if (out.reused) return Fail(state, "full handshake resumed");
  }
  state.SetItemsProcessed(state.iterations());
}

// ---- paired measurements -------------------------------------------------
//
// The ratios come from these: the variants run alternately inside one loop
// (tickets in batches of kPairBatch, handshakes one by one, the order
// rotating every iteration), each timed with the thread's CPU clock and the
// wall clock, so all variants see the same machine conditions. On a shared
// machine this is far less noisy than comparing separate runs.

constexpr int kPairBatch = 8;

uint64_t ThreadCpuNs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u +
         static_cast<uint64_t>(ts.tv_nsec);
}

uint64_t WallNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// Accumulated time of one variant.
struct PairAcc {
  uint64_t cpu_ns = 0, wall_ns = 0, ops = 0;

  template <typename Fn>
  bool Time(int n, Fn &&fn) {
    const uint64_t c0 = ThreadCpuNs(), w0 = WallNs();
    for (int i = 0; i < n; ++i) {
      if (!fn()) return false;
    }
    wall_ns += WallNs() - w0;
    cpu_ns += ThreadCpuNs() - c0;
    ops += static_cast<uint64_t>(n);
    return true;
  }
  // Publishes "<name>_cpu_us" and "<name>_wall_us" (per operation).
  void Report(benchmark::State &state, const std::string &name) const {
    if (ops == 0) return;
    state.counters[name + "_cpu_us"] = cpu_ns / 1e3 / static_cast<double>(ops);
    state.counters[name + "_wall_us"] =
        wall_ns / 1e3 / static_cast<double>(ops);
  }
};

// Writes over a buffer larger than this machine's L2 cache (not timed):
// what a handshake does to the token's working set between two tickets.
void EvictCaches() {
  static std::vector<unsigned char> junk(8 << 20);
  static unsigned char value = 0;
  ++value;
  for (size_t i = 0; i < junk.size(); i += 64) junk[i] = value;
  benchmark::DoNotOptimize(junk.data());
}

// Floor and hsmstek, one ticket operation each, alternating. `cold`: every
// operation starts with caches evicted (EvictCaches), as inside handshakes.
void BM_PairTicket(benchmark::State &state, bool seal, bool cold) {
  Env &env = Env::Get();
  Result<keystore::TicketKeys> keys = env.keystore()->KeysForEncrypt();
  if (!keys.ok()) return Fail(state, keys.status().message());
  Result<p11::Session> session = env.keystore()->token()->Acquire();
  if (!session.ok()) return Fail(state, session.status().message());
  CK_FUNCTION_LIST *f = session->fn();
  const CK_SESSION_HANDLE h = session->handle();
  const FloorKeys k{keys->aes, keys->hmac};
  SSL *ssl = SSL_new(env.ServerCtx(Tickets::kHsmstek, TLS1_3_VERSION));
  const char *propq = provider::kPreferProviderQuery;
  const std::vector<unsigned char> plain = Plaintext();
  Ticket floor_ticket, token_ticket;
  floor_ticket.bytes.assign(MaxTicketLen(plain.size()), 0x42);
  token_ticket.bytes.assign(MaxTicketLen(plain.size()), 0);
  std::vector<unsigned char> opened(plain.size() + 16);
  if (ssl == nullptr || !FloorSeal(f, h, k, plain, &floor_ticket) ||
      !LibsslSeal(ssl, tls::TicketKeyCallback, propq, plain, &token_ticket)) {
    SSL_free(ssl);
    return Fail(state, "first seal failed");
  }
  auto floor_op = [&] {
    return seal ? FloorSeal(f, h, k, plain, &floor_ticket)
                : FloorOpen(f, h, k, floor_ticket, &opened);
  };
  auto token_op = [&] {
    return seal ? LibsslSeal(ssl, tls::TicketKeyCallback, propq, plain,
                             &token_ticket)
                : LibsslOpen(ssl, tls::TicketKeyCallback, propq, token_ticket,
                             plain.size());
  };
  PairAcc floor, token;
  uint64_t round = 0;
  const int batch = cold ? 1 : kPairBatch;
  for (auto _ : state) {
    const bool floor_first = (round++ & 1) == 0;
    for (int i = 0; i < 2; ++i) {
      if (cold) EvictCaches();
      const bool ok = (i == 0) == floor_first ? floor.Time(batch, floor_op)
                                              : token.Time(batch, token_op);
      if (!ok) {
        SSL_free(ssl);
        return Fail(state, "ticket operation failed");
      }
    }
  }
  SSL_free(ssl);
  floor.Report(state, "floor");
  token.Report(state, "hsmstek");
}

// The three server variants, one resumption each, rotating.
void BM_PairResume(benchmark::State &state, int version) {
  constexpr Tickets kVariants[] = {Tickets::kBuiltin, Tickets::kNginxStyle,
                                   Tickets::kHsmstek, Tickets::kBuiltinScoped};
  constexpr uint64_t kN = std::size(kVariants);
  struct Side {
    SSL_CTX *server;
    UniqueSslCtx client;
    UniqueSslSession session;
    PairAcc acc;
  } sides[kN];
  for (uint64_t v = 0; v < kN; ++v) {
    sides[v].server = Env::Get().ServerCtx(kVariants[v], version);
    sides[v].client = NewClientCtx(version);
    Outcome first;
    if (!Connect(sides[v].client.get(), sides[v].server, nullptr, &first) ||
        !first.newest) {
      return Fail(state, "initial full handshake failed: " + first.error);
    }
    sides[v].session = std::move(first.newest);
  }
  uint64_t round = 0;
  for (auto _ : state) {
    const uint64_t start = round++;
    for (uint64_t i = 0; i < kN; ++i) {
      Side &side = sides[(start + i) % kN];
      Outcome out;
      bool ok = side.acc.Time(1, [&] {
        return ResumeOnce(side.client.get(), side.server, side.session.get(),
                          &out);
      });
      if (!ok) return Fail(state, "resumption failed: " + out.error);
      if (!out.reused) {
        return Fail(state, "handshake did not resume (ticket not accepted)");
      }
      if (out.newest) side.session = std::move(out.newest);
    }
  }
  for (uint64_t v = 0; v < kN; ++v) {
    sides[v].acc.Report(state, TicketsName(kVariants[v]));
  }
}

const char *TlsName(int version) {
  return version == TLS1_3_VERSION ? "tls13" : "tls12";
}

// Common settings: wall-clock time (the thread CPU time is reported too);
// with --iterations=N a fixed iteration count, for profilers.
int g_iterations = 0;

benchmark::internal::Benchmark *Tune(benchmark::internal::Benchmark *b,
                                     bool two_threads) {
  b->UseRealTime()->Threads(1);
  if (two_threads) b->Threads(2);
  if (g_iterations > 0) b->Iterations(g_iterations);
  return b;
}

void RegisterAll() {
  // The paired ratio benchmarks (1 thread).
  for (bool cold : {false, true}) {
    for (bool seal : {true, false}) {
      std::string name = std::string("pair/") + (seal ? "seal" : "open") +
                         (cold ? "_cold" : "");
      Tune(
          benchmark::RegisterBenchmark(name.c_str(), BM_PairTicket, seal, cold),
          false);
    }
  }
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    std::string name = std::string("pair/resume/") + TlsName(version);
    Tune(benchmark::RegisterBenchmark(name.c_str(), BM_PairResume, version),
         false);
  }
  // 2 threads too: SoftHSM's own scaling, next to hsmstek's.
  Tune(benchmark::RegisterBenchmark("floor/seal", BM_Floor, true), true);
  Tune(benchmark::RegisterBenchmark("floor/open", BM_Floor, false), true);
  for (Tickets t : {Tickets::kHsmstek, Tickets::kNginxStyle}) {
    for (bool seal : {true, false}) {
      std::string name =
          std::string("evp/") + (seal ? "seal/" : "open/") + TicketsName(t);
      Tune(benchmark::RegisterBenchmark(name.c_str(), BM_Evp, seal, t), true);
    }
  }
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    for (Tickets t :
         {Tickets::kBuiltin, Tickets::kNginxStyle, Tickets::kHsmstek}) {
      std::string name =
          std::string("resume/") + TlsName(version) + "/" + TicketsName(t);
      Tune(benchmark::RegisterBenchmark(name.c_str(), BM_Resume, t, version),
           true);
    }
  }
  // Not run by scripts/bench.sh (its filters skip "extra/"): for profiling
  // the scoped routing alone (bench/callgrind.sh).
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    std::string name =
        std::string("extra/resume/") + TlsName(version) + "/builtin_scoped";
    Tune(benchmark::RegisterBenchmark(name.c_str(), BM_Resume,
                                      Tickets::kBuiltinScoped, version),
         false);
  }
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    for (Tickets t : {Tickets::kBuiltin, Tickets::kHsmstek}) {
      std::string name =
          std::string("full/") + TlsName(version) + "/" + TicketsName(t);
      Tune(benchmark::RegisterBenchmark(name.c_str(), BM_Full, t, version),
           false);
    }
  }
}

}  // namespace
}  // namespace hsmstek::bench

int main(int argc, char **argv) {
  using namespace hsmstek::bench;
  bool process_wide = false;
  std::vector<char *> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--process-wide") == 0) {
      process_wide = true;
    } else if (std::strncmp(argv[i], "--iterations=", 13) == 0) {
      g_iterations = std::atoi(argv[i] + 13);
    } else if (std::strncmp(argv[i], "--provision=", 12) == 0) {
      hsmstek::Result<std::shared_ptr<hsmstek::keystore::KeyStore>> store =
          Provision(argv[i] + 12);
      if (!store.ok()) {
        std::fprintf(stderr, "provision: %s\n",
                     store.status().message().c_str());
        return 1;
      }
      return 0;
    } else {
      args.push_back(argv[i]);
    }
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 2;
  // Process-wide routing must be set before any SSL_CTX exists.
  if (process_wide && hsmstek_enable_process_wide() != HSMSTEK_OK) {
    std::fprintf(stderr, "hsmstek_enable_process_wide: %s\n",
                 hsmstek_last_error());
    return 1;
  }
  Env::Init();
  benchmark::AddCustomContext("process_wide", process_wide ? "1" : "0");
  benchmark::AddCustomContext(
      "ticket_plaintext_tls13",
      std::to_string(TicketPlaintextSize(TLS1_3_VERSION)));
  benchmark::AddCustomContext(
      "ticket_plaintext_tls12",
      std::to_string(TicketPlaintextSize(TLS1_2_VERSION)));
  benchmark::AddCustomContext("openssl", OpenSSL_version(OPENSSL_VERSION));
  RegisterAll();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return g_failed.load() ? 1 : 0;
}
