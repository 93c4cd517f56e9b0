// hsmstek_bench: what token custody costs, next to the token's own floor and
// next to in-memory ticket keys (docs/BENCHMARKS.md). Google Benchmark; run
// through scripts/bench.sh, which repeats, interleaves and computes the ratios.
//
// The ratios come from paired benchmarks, where the variants being compared
// alternate inside one loop so that they see the same machine conditions:
//   pair/seal, pair/open        floor and hsmstek alternate in batches of 8:
//                               floor = raw PKCS#11 on one session
//                               (C_EncryptInit + C_Encrypt and C_SignInit +
//                               C_Sign to seal; C_SignInit + C_Sign and
//                               C_DecryptInit + C_Decrypt to open), epoch
//                               keys derived like hsmstek's, a TLS 1.3
//                               ticket's plaintext; hsmstek = one ticket
//                               sealed/opened exactly as libssl 3.0 does it
//                               (contexts created per ticket, the ticket key
//                               callback, one update + final, MAC update +
//                               final)
//   pair/{seal,open}_cold       the same with caches evicted before every
//                               operation (what a handshake does to them)
//   pair/resume/<tls>           in-process resumptions (client and server in
//                               this process, BIO pair), the server variants
//                               rotating handshake by handshake: builtin
//                               (OpenSSL's tickets), nginx_style (raw keys in
//                               a ticket key callback), hsmstek, and
//                               builtin_scoped (routing alone)
//   scaling/resume/<tls>,       1 thread and 2 threads (sharing the server
//   scaling/tickets             SSL_CTX / the token) alternate phase by phase
//   --process-pair=ROUNDS       full handshakes in two processes, one plain
//                               and one with hsmstek_enable_process_wide(),
//                               taking turns (see RunProcessPair)
// Plain Google Benchmark versions (floor/*, evp/*, resume/*, full/*; 1 and
// 2 threads) are kept for profiling (bench/callgrind.sh) and exploration.
//
// Extra flags (before Google Benchmark's own):
//   --process-wide     call hsmstek_enable_process_wide() before anything
//   --process-pair=N   run the process pair for N rounds, print JSON, exit
//   --provision=URI    only create a master in the store URI names (in an
//                      existing token; SOFTHSM2_CONF from the environment),
//                      then exit: scripts/bench.sh uses it for nginx
//   --iterations=N     run every benchmark for exactly N iterations (for
//                      profilers; see bench/callgrind.sh)
//
// Exit status is 1 if any benchmark failed (e.g. a handshake that should
// have resumed did not), so a smoke run catches broken benchmarks.
#include <benchmark/benchmark.h>
#include <hsmstek/hsmstek.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <sched.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
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

// RAII owners of the OpenSSL handles used here.
struct SslFree {
  void operator()(SSL *ssl) const { SSL_free(ssl); }
};
struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX *ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
struct MacCtxFree {
  void operator()(EVP_MAC_CTX *ctx) const { EVP_MAC_CTX_free(ctx); }
};
struct OpensslFree {
  void operator()(unsigned char *p) const { OPENSSL_free(p); }
};
using UniqueSsl = std::unique_ptr<SSL, SslFree>;
using UniqueCipherCtx = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree>;
using UniqueMacCtx = std::unique_ptr<EVP_MAC_CTX, MacCtxFree>;

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
UniqueMacCtx NewTicketMac(const char *propq) {
  EVP_MAC *mac = EVP_MAC_fetch(nullptr, "HMAC", propq);
  UniqueMacCtx ctx(mac == nullptr ? nullptr : EVP_MAC_CTX_new(mac));
  EVP_MAC_free(mac);  // the context holds its own reference
  return ctx;
}

// construct_stateless_ticket() of libssl 3.0, minus the session encoding.
[[gnu::noinline]] bool LibsslSeal(SSL *ssl, TicketCb cb, const char *propq,
                                  const std::vector<unsigned char> &plain,
                                  Ticket *t) {
  UniqueCipherCtx ctx(EVP_CIPHER_CTX_new());
  UniqueMacCtx hctx = NewTicketMac(propq);
  unsigned char *out = t->bytes.data();
  bool ok = ctx != nullptr && hctx != nullptr;
  int len = 0, len_final = 0;
  size_t mac_len = 0;
  ok = ok && cb(ssl, out, out + kNameLen, ctx.get(), hctx.get(), 1) == 1;
  ok = ok && EVP_EncryptUpdate(ctx.get(), out + kHeaderLen, &len, plain.data(),
                               static_cast<int>(plain.size())) == 1;
  ok = ok &&
       EVP_EncryptFinal(ctx.get(), out + kHeaderLen + len, &len_final) == 1;
  const size_t ct_len = static_cast<size_t>(len + len_final);
  ok = ok && EVP_MAC_update(hctx.get(), out, kHeaderLen + ct_len) == 1;
  ok = ok && EVP_MAC_final(hctx.get(), out + kHeaderLen + ct_len, &mac_len,
                           kMacLen) == 1;
  t->len = kHeaderLen + ct_len + mac_len;
  return ok && mac_len == kMacLen;
}

// tls_decrypt_ticket() of libssl 3.0, minus the session decoding.
[[gnu::noinline]] bool LibsslOpen(SSL *ssl, TicketCb cb, const char *propq,
                                  const Ticket &t, size_t expected_plain) {
  UniqueCipherCtx ctx(EVP_CIPHER_CTX_new());
  UniqueMacCtx hctx = NewTicketMac(propq);
  bool ok = ctx != nullptr && hctx != nullptr;
  unsigned char *in = const_cast<unsigned char *>(t.bytes.data());
  int r = ok ? cb(ssl, in, in + kNameLen, ctx.get(), hctx.get(), 0) : 0;
  ok = ok && (r == 1 || r == 2);
  ok = ok && EVP_MAC_CTX_get_mac_size(hctx.get()) == kMacLen;
  unsigned char tag[EVP_MAX_MD_SIZE];
  ok = ok && EVP_MAC_update(hctx.get(), in, t.len - kMacLen) == 1;
  ok = ok && EVP_MAC_final(hctx.get(), tag, nullptr, sizeof(tag)) == 1;
  ok = ok && CRYPTO_memcmp(tag, in + t.len - kMacLen, kMacLen) == 0;
  const int ct_len = static_cast<int>(t.len - kHeaderLen - kMacLen);
  // libssl decrypts into a fresh buffer of the ciphertext's length.
  std::unique_ptr<unsigned char, OpensslFree> sdec(
      ok ? static_cast<unsigned char *>(
               OPENSSL_malloc(static_cast<size_t>(ct_len)))
         : nullptr);
  int slen = 0, declen = 0;
  ok = ok && sdec != nullptr &&
       EVP_DecryptUpdate(ctx.get(), sdec.get(), &slen, in + kHeaderLen,
                         ct_len) == 1;
  ok = ok && EVP_DecryptFinal(ctx.get(), sdec.get() + slen, &declen) == 1;
  return ok && static_cast<size_t>(slen + declen) == expected_plain;
}

void BM_Evp(benchmark::State &state, bool seal, Tickets tickets) {
  Env &env = Env::Get();
  // An SSL of the variant's server context: the callback finds its store
  // through it, as in a handshake.
  SSL_CTX *server = env.ServerCtx(tickets, TLS1_3_VERSION);
  UniqueSsl ssl(SSL_new(server));
  const bool token = tickets == Tickets::kHsmstek;
  TicketCb cb = token ? tls::TicketKeyCallback : NginxStyleCallback;
  // hsmstek_ssl_ctx_new's scoped property query; nginx's contexts have none.
  const char *propq = token ? provider::kPreferProviderQuery : nullptr;
  const std::vector<unsigned char> plain = Plaintext();
  Ticket t;
  t.bytes.assign(MaxTicketLen(plain.size()), 0);
  if (ssl == nullptr || !LibsslSeal(ssl.get(), cb, propq, plain, &t)) {
    return Fail(state, "first seal failed");
  }
  for (auto _ : state) {
    bool ok = seal ? LibsslSeal(ssl.get(), cb, propq, plain, &t)
                   : LibsslOpen(ssl.get(), cb, propq, t, plain.size());
    if (!ok) return Fail(state, seal ? "seal failed" : "open failed");
  }
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

const char *TlsName(int version) {
  return version == TLS1_3_VERSION ? "tls13" : "tls12";
}

// ---- paired measurements -------------------------------------------------

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

// Per-thread ticket workers: the floor on its own PKCS#11 session, hsmstek
// through its own SSL of the hsmstek server context.
struct FloorWorker {
  std::shared_ptr<keystore::KeyStore> store = Env::Get().keystore();
  Result<p11::Session> session = store->token()->Acquire();
  FloorKeys keys{};
  std::vector<unsigned char> plain = Plaintext();
  Ticket ticket;
  std::vector<unsigned char> opened;

  bool Init() {
    Result<keystore::TicketKeys> k = store->KeysForEncrypt();
    if (!k.ok() || !session.ok()) return false;
    keys = FloorKeys{k->aes, k->hmac};
    ticket.bytes.assign(MaxTicketLen(plain.size()), 0x42);
    opened.resize(plain.size() + 16);
    return Seal();
  }
  bool Seal() {
    return FloorSeal(session->fn(), session->handle(), keys, plain, &ticket);
  }
  bool Open() {
    return FloorOpen(session->fn(), session->handle(), keys, ticket, &opened);
  }
};

struct TokenWorker {
  UniqueSsl ssl{
      SSL_new(Env::Get().ServerCtx(Tickets::kHsmstek, TLS1_3_VERSION))};
  const char *propq = provider::kPreferProviderQuery;
  std::vector<unsigned char> plain = Plaintext();
  Ticket ticket;

  bool Init() {
    ticket.bytes.assign(MaxTicketLen(plain.size()), 0);
    return ssl != nullptr && Seal();
  }
  bool Seal() {
    return LibsslSeal(ssl.get(), tls::TicketKeyCallback, propq, plain, &ticket);
  }
  bool Open() {
    return LibsslOpen(ssl.get(), tls::TicketKeyCallback, propq, ticket,
                      plain.size());
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

constexpr int kPairBatch = 8;

// Floor and hsmstek, one ticket operation each (batches of kPairBatch),
// alternating. `cold`: every operation starts with caches evicted.
void BM_PairTicket(benchmark::State &state, bool seal, bool cold) {
  FloorWorker floor_worker;
  TokenWorker token_worker;
  if (!floor_worker.Init() || !token_worker.Init()) {
    return Fail(state, "first seal failed");
  }
  auto floor_op = [&] {
    return seal ? floor_worker.Seal() : floor_worker.Open();
  };
  auto token_op = [&] {
    return seal ? token_worker.Seal() : token_worker.Open();
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
      if (!ok) return Fail(state, "ticket operation failed");
    }
  }
  floor.Report(state, "floor");
  token.Report(state, "hsmstek");
}

// A client that keeps resuming against one server context, always with the
// newest ticket it received (as a real client does).
struct Resumer {
  SSL_CTX *server = nullptr;
  UniqueSslCtx client;
  UniqueSslSession session;
  std::string error;

  bool Init(Tickets tickets, int version) {
    server = Env::Get().ServerCtx(tickets, version);
    client = NewClientCtx(version);
    Outcome first;
    if (!Connect(client.get(), server, nullptr, &first) || !first.newest) {
      error = "initial full handshake failed: " + first.error;
      return false;
    }
    session = std::move(first.newest);
    return true;
  }
  bool Step() {
    Outcome out;
    if (!ResumeOnce(client.get(), server, session.get(), &out)) {
      error = "resumption failed: " + out.error;
      return false;
    }
    if (!out.reused) {
      error = "handshake did not resume (ticket not accepted)";
      return false;
    }
    if (out.newest) session = std::move(out.newest);
    return true;
  }
};

constexpr Tickets kResumeVariants[] = {Tickets::kBuiltin, Tickets::kNginxStyle,
                                       Tickets::kHsmstek,
                                       Tickets::kBuiltinScoped};

// The server variants, one resumption each, rotating.
void BM_PairResume(benchmark::State &state, int version) {
  constexpr size_t kN = std::size(kResumeVariants);
  Resumer resumers[kN];
  PairAcc acc[kN];
  for (size_t v = 0; v < kN; ++v) {
    if (!resumers[v].Init(kResumeVariants[v], version)) {
      return Fail(state, resumers[v].error);
    }
  }
  uint64_t round = 0;
  for (auto _ : state) {
    const uint64_t start = round++;
    for (size_t i = 0; i < kN; ++i) {
      const size_t v = (start + i) % kN;
      if (!acc[v].Time(1, [&] { return resumers[v].Step(); })) {
        return Fail(state, resumers[v].error);
      }
    }
  }
  for (size_t v = 0; v < kN; ++v) {
    acc[v].Report(state, TicketsName(kResumeVariants[v]));
  }
}

// ---- paired scaling: 1 thread, then 2 threads, phase by phase -------------
//
// Every round runs, for each workload in turn, a phase of `ops` operations
// on this thread alone and then a phase of `ops` operations on each of two
// threads at once (a helper thread takes part). The wall-clock throughput of
// the two phases, under the same machine conditions, gives the scaling.

using Op = std::function<bool()>;

// Runs `n` calls of an Op on its own thread when asked.
class Helper {
 public:
  Helper() : thread_([this] { Loop(); }) {}
  ~Helper() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void Start(Op *op, int n) {
    std::lock_guard<std::mutex> lock(mu_);
    op_ = op;
    n_ = n;
    pending_ = true;
    cv_.notify_all();
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !pending_; });
    return ok_;
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return pending_ || quit_; });
      if (quit_) return;
      Op *op = op_;
      const int n = n_;
      lock.unlock();
      bool ok = true;
      for (int i = 0; i < n && ok; ++i) ok = (*op)();
      lock.lock();
      ok_ = ok;
      pending_ = false;
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool pending_ = false, quit_ = false, ok_ = true;
  Op *op_ = nullptr;
  int n_ = 0;
  std::thread thread_;  // last: starts after the members above exist
};

struct ScalingWorkload {
  std::string name;
  int ops = 1;            // per thread and phase
  Op main_op, helper_op;  // each with its own client / session
  uint64_t wall1 = 0, n1 = 0, wall2 = 0, n2 = 0;
};

void RunScaling(benchmark::State &state,
                std::vector<ScalingWorkload> &workloads) {
  Helper helper;
  uint64_t round = 0;
  for (auto _ : state) {
    const uint64_t start = round++;
    for (size_t i = 0; i < workloads.size(); ++i) {
      ScalingWorkload &w = workloads[(start + i) % workloads.size()];
      uint64_t t0 = WallNs();
      bool ok = true;
      for (int k = 0; k < w.ops && ok; ++k) ok = w.main_op();
      w.wall1 += WallNs() - t0;
      w.n1 += static_cast<uint64_t>(w.ops);
      t0 = WallNs();
      helper.Start(&w.helper_op, w.ops);
      for (int k = 0; k < w.ops && ok; ++k) ok = w.main_op();
      ok = helper.Wait() && ok;
      w.wall2 += WallNs() - t0;
      w.n2 += 2 * static_cast<uint64_t>(w.ops);
      if (!ok) return Fail(state, w.name + ": operation failed");
    }
  }
  for (const ScalingWorkload &w : workloads) {
    const double per_s1 = w.n1 * 1e9 / static_cast<double>(w.wall1);
    const double per_s2 = w.n2 * 1e9 / static_cast<double>(w.wall2);
    state.counters[w.name + "_1t_per_s"] = per_s1;
    state.counters[w.name + "_2t_per_s"] = per_s2;
  }
}

// Resumptions of builtin, nginx_style and hsmstek servers (phases of about
// 10 ms).
void BM_ScalingResume(benchmark::State &state, int version) {
  constexpr Tickets kVariants[] = {Tickets::kBuiltin, Tickets::kNginxStyle,
                                   Tickets::kHsmstek};
  std::vector<std::unique_ptr<Resumer>> resumers;
  std::vector<ScalingWorkload> workloads;
  for (Tickets t : kVariants) {
    auto a = std::make_unique<Resumer>();
    auto b = std::make_unique<Resumer>();
    if (!a->Init(t, version) || !b->Init(t, version)) {
      return Fail(state, a->error + b->error);
    }
    ScalingWorkload w;
    w.name = TicketsName(t);
    w.ops = version == TLS1_3_VERSION ? 8 : 40;
    w.main_op = [r = a.get()] { return r->Step(); };
    w.helper_op = [r = b.get()] { return r->Step(); };
    workloads.push_back(std::move(w));
    resumers.push_back(std::move(a));
    resumers.push_back(std::move(b));
  }
  RunScaling(state, workloads);
}

// Ticket seal and open, floor and hsmstek (phases of about 5 ms).
void BM_ScalingTickets(benchmark::State &state) {
  FloorWorker floor_a, floor_b;
  TokenWorker token_a, token_b;
  if (!floor_a.Init() || !floor_b.Init() || !token_a.Init() ||
      !token_b.Init()) {
    return Fail(state, "first seal failed");
  }
  std::vector<ScalingWorkload> workloads(4);
  workloads[0] = {"floor_seal", 200, [&] { return floor_a.Seal(); },
                  [&] { return floor_b.Seal(); }};
  workloads[1] = {"floor_open", 200, [&] { return floor_a.Open(); },
                  [&] { return floor_b.Open(); }};
  workloads[2] = {"hsmstek_seal", 200, [&] { return token_a.Seal(); },
                  [&] { return token_b.Seal(); }};
  workloads[3] = {"hsmstek_open", 200, [&] { return token_a.Open(); },
                  [&] { return token_b.Open(); }};
  RunScaling(state, workloads);
}

// ---- process pair: full handshakes with and without process-wide routing -
//
// hsmstek_enable_process_wide() changes the whole process, so the two kinds
// run in two child processes (forked before either touches OpenSSL or
// SoftHSM), which take turns: each turn one child runs kTurnHandshakes full
// handshakes of every variant while the other waits on a pipe. Both thus
// see the same machine conditions, turn after turn. Both are pinned to the
// CPU the parent runs on when the pair starts: on a shared VM one vCPU can
// be systematically slower (a busy hyperthread sibling), and a child left
// on it for its whole life skews the pair's ratio by up to 20 % (measured:
// pair ratios 0.77-1.16 unpinned). Each child prints one JSON line with its
// per-turn CPU and wall microseconds per handshake.

constexpr int kTurnHandshakes = 6;

bool ReadByte(int fd, char *c) {
  while (true) {
    ssize_t r = read(fd, c, 1);
    if (r == 1) return true;
    if (r < 0 && errno == EINTR) continue;
    return false;
  }
}

bool WriteByte(int fd, char c) { return write(fd, &c, 1) == 1; }

int ProcessPairChild(bool process_wide, int in_fd, int out_fd) {
  if (process_wide && hsmstek_enable_process_wide() != HSMSTEK_OK) {
    std::fprintf(stderr, "hsmstek_enable_process_wide: %s\n",
                 hsmstek_last_error());
    return 1;
  }
  Env::Init();
  struct Variant {
    std::string name;
    SSL_CTX *server;
    UniqueSslCtx client;
    std::vector<double> cpu_us, wall_us;
  };
  std::vector<Variant> variants;
  for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
    for (Tickets t : {Tickets::kBuiltin, Tickets::kHsmstek}) {
      variants.push_back({std::string(TlsName(version)) + "/" + TicketsName(t),
                          Env::Get().ServerCtx(t, version),
                          NewClientCtx(version),
                          {},
                          {}});
    }
  }
  auto turn = [&](bool record) {
    for (Variant &v : variants) {
      PairAcc acc;
      bool ok = acc.Time(kTurnHandshakes, [&] {
        Outcome out;
        return FullOnce(v.client.get(), v.server, &out) && !out.reused;
      });
      if (!ok) return false;
      if (record) {
        v.cpu_us.push_back(acc.cpu_ns / 1e3 / kTurnHandshakes);
        v.wall_us.push_back(acc.wall_ns / 1e3 / kTurnHandshakes);
      }
    }
    return true;
  };
  if (!turn(false)) return 1;             // warm-up
  if (!WriteByte(out_fd, 'r')) return 1;  // ready
  char c;
  while (ReadByte(in_fd, &c)) {
    if (c == 'g') {
      if (!turn(true)) {
        std::fprintf(stderr, "process pair: full handshake failed\n");
        return 1;
      }
    } else if (c == 'p') {
      // Appended piecewise: GCC 12 at -O3 warns (-Wrestrict, a known false
      // positive) on `const char* + std::string` here.
      std::string json = "{\"process_wide\":";
      json += process_wide ? "1" : "0";
      json += ",\"variants\":{";
      auto append_list = [&json](const std::vector<double> &values) {
        json += "[";
        for (size_t k = 0; k < values.size(); ++k) {
          char number[32];
          std::snprintf(number, sizeof(number), "%s%.3f", k ? "," : "",
                        values[k]);
          json += number;
        }
        json += "]";
      };
      for (size_t i = 0; i < variants.size(); ++i) {
        if (i > 0) json += ",";
        json += "\"";
        json += variants[i].name;
        json += "\":{\"cpu_us\":";
        append_list(variants[i].cpu_us);
        json += ",\"wall_us\":";
        append_list(variants[i].wall_us);
        json += "}";
      }
      json += "}}\n";
      std::fputs(json.c_str(), stdout);
      std::fflush(stdout);
    } else {
      break;  // 'q'
    }
    if (!WriteByte(out_fd, 'd')) return 1;
  }
  return 0;
}

// Runs the two children for `rounds` rounds (order alternating: ABBA) and
// lets each print its results. Returns the exit status.
int RunProcessPair(int rounds) {
  int to[2][2], from[2][2];
  pid_t pid[2];
  for (int i = 0; i < 2; ++i) {
    if (pipe(to[i]) != 0 || pipe(from[i]) != 0) return 1;
  }
  std::fflush(stdout);
  const int cpu = sched_getcpu();
  for (int i = 0; i < 2; ++i) {
    pid[i] = fork();
    if (pid[i] < 0) return 1;
    if (pid[i] == 0) {
      if (cpu >= 0) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        if (sched_setaffinity(0, sizeof(one), &one) != 0) _exit(1);
      }
      for (int j = 0; j < 2; ++j) {
        if (j != i) {
          close(to[j][0]);
          close(from[j][1]);
        }
        close(to[j][1]);
        close(from[j][0]);
      }
      _exit(ProcessPairChild(/*process_wide=*/i == 1, to[i][0], from[i][1]));
    }
  }
  bool ok = true;
  char c;
  auto command = [&](int i, char what) {
    ok = ok && WriteByte(to[i][1], what) && ReadByte(from[i][0], &c);
  };
  for (int i = 0; i < 2; ++i) ok = ok && ReadByte(from[i][0], &c);  // ready
  for (int r = 0; r < rounds && ok; ++r) {
    const int first = (r / 2 + r) % 2;  // 0 1 1 0 0 1 1 0 ...
    command(first, 'g');
    command(1 - first, 'g');
  }
  for (int i = 0; i < 2; ++i) command(i, 'p');
  for (int i = 0; i < 2; ++i) {
    WriteByte(to[i][1], 'q');
    close(to[i][1]);
    int status = 0;
    waitpid(pid[i], &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  return ok ? 0 : 1;
}

// ---- registration -----------------------------------------------------------

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
  // The paired benchmarks that scripts/bench.sh runs.
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
    name = std::string("scaling/resume/") + TlsName(version);
    Tune(benchmark::RegisterBenchmark(name.c_str(), BM_ScalingResume, version),
         false);
  }
  Tune(benchmark::RegisterBenchmark("scaling/tickets", BM_ScalingTickets),
       false);

  // Plain benchmarks, 1 and 2 threads (profiling, exploration; bench.sh runs
  // only the in-memory seal/open of these, for reference).
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
    for (Tickets t : {Tickets::kBuiltin, Tickets::kNginxStyle,
                      Tickets::kHsmstek, Tickets::kBuiltinScoped}) {
      std::string name =
          std::string("resume/") + TlsName(version) + "/" + TicketsName(t);
      Tune(benchmark::RegisterBenchmark(name.c_str(), BM_Resume, t, version),
           true);
    }
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
  int process_pair_rounds = 0;
  std::vector<char *> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--process-wide") == 0) {
      process_wide = true;
    } else if (std::strncmp(argv[i], "--process-pair=", 15) == 0) {
      process_pair_rounds = std::atoi(argv[i] + 15);
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
  // Before anything touches OpenSSL or SoftHSM: the children set up their
  // own.
  if (process_pair_rounds > 0) return RunProcessPair(process_pair_rounds);
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
