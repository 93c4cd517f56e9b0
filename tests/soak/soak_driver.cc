// hsmstek_soak: a bounded soak of the ticket path (run by scripts/soak.sh).
// Worker threads run real TLS 1.2 and 1.3 handshakes, each full handshake
// followed by a chain of resumptions with the newest ticket, and the main
// thread samples RSS every few seconds. Two modes:
//
// In-process (default): client and server in one thread over memory BIOs
// (no sockets), against one server SSL_CTX whose tickets the hsmstek
// callback seals and opens in a SoftHSM token of this process. Meanwhile:
//   - a rotator thread adds a master generation every few seconds that
//     activates a little later (like `hsmstek rotate --activate-in 30s`),
//     so masters keep moving pending -> active -> decrypt-only -> retired,
//     and destroys masters retired for longer than the decrypt window
//     (like an operator cleaning up);
//   - the store runs its own background maintenance (refresh, derivation
//     ahead of the boundary, eviction) as in a server;
//   - the store's clock runs `--speed` times faster than real time, so the
//     60 s minimum period still gives an epoch change every few seconds;
//   - once per decrypt window each worker replays a ticket older than the
//     window: it must not resume;
//   - the derived-key session objects alive in the token are counted.
//
// Network (--connect PORT): TCP connections to 127.0.0.1:PORT (nginx with
// the hsmstek module, started, rotated and reloaded by scripts/soak.sh),
// one HTTP/1.0 request per connection; RSS is that of the nginx master
// (--nginx-pidfile) and the mean of its workers.
//
// At the end it prints the counters, the RSS series and a verdict, and
// exits 0 only if: no handshake failed, every resumption of a fresh ticket
// resumed (at least --min-resume-pct), no full handshake went without a
// ticket, the RSS after warm-up and at the end differ by at most
// --rss-tolerance-pct, and (in-process) no expired ticket resumed, the
// token reported no error, the library logged no error, and the token holds
// no more derived keys than the store caches.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/log.h"
#include "keystore/master.h"
#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "pkcs11/object.h"
#include "softhsm.h"
#include "tls/ticket_callback.h"
#include "tls_harness.h"

namespace hsmstek::soak {
namespace {

using Steady = std::chrono::steady_clock;

struct Options {
  int64_t seconds = 180;
  int threads = 4;
  double speed = 10;         // store clock seconds per real second
  int64_t period_s = 60;     // kMinPeriodSeconds
  int64_t window_s = 300;    // decrypt window, store clock
  double rotate_every = 5;   // real seconds between new generations
  int64_t activate_in = 30;  // store clock seconds until one activates
  int resumes_per_full = 4;
  double sample_every = 5;  // real seconds between RSS samples
  double warmup = 60;       // real seconds before the RSS baseline
  double rss_tolerance_pct = 10;
  double min_resume_pct = 100;
  bool destroy = true;
  int connect_port = 0;  // network mode when set
  std::string nginx_pidfile;
};

void Usage(const char *argv0) {
  std::fprintf(
      stderr,
      "usage: %s [--seconds N] [--threads N] [--resumes-per-full N]\n"
      "  [--sample-every S] [--warmup S] [--rss-tolerance-pct P]\n"
      "  [--min-resume-pct P]\n"
      " in-process: [--speed X] [--period S] [--window S] [--rotate-every S]\n"
      "  [--activate-in S] [--no-destroy]\n"
      " network:    --connect PORT [--nginx-pidfile FILE]\n",
      argv0);
}

bool ParseOptions(int argc, char **argv, Options *o) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--no-destroy") {
      o->destroy = false;
      continue;
    }
    if (i + 1 >= argc) return false;
    if (flag == "--nginx-pidfile") {
      o->nginx_pidfile = argv[++i];
      continue;
    }
    char *end = nullptr;
    const double v = std::strtod(argv[++i], &end);
    if (end == argv[i] || *end != '\0' || !(v > 0)) return false;
    if (flag == "--seconds") {
      o->seconds = static_cast<int64_t>(v);
    } else if (flag == "--threads") {
      o->threads = static_cast<int>(v);
    } else if (flag == "--speed") {
      o->speed = v;
    } else if (flag == "--period") {
      o->period_s = static_cast<int64_t>(v);
    } else if (flag == "--window") {
      o->window_s = static_cast<int64_t>(v);
    } else if (flag == "--rotate-every") {
      o->rotate_every = v;
    } else if (flag == "--activate-in") {
      o->activate_in = static_cast<int64_t>(v);
    } else if (flag == "--resumes-per-full") {
      o->resumes_per_full = static_cast<int>(v);
    } else if (flag == "--sample-every") {
      o->sample_every = v;
    } else if (flag == "--warmup") {
      o->warmup = v;
    } else if (flag == "--rss-tolerance-pct") {
      o->rss_tolerance_pct = v;
    } else if (flag == "--min-resume-pct") {
      o->min_resume_pct = v;
    } else if (flag == "--connect") {
      o->connect_port = static_cast<int>(v);
    } else {
      return false;
    }
  }
  return o->threads > 0 && o->seconds > 0 && o->connect_port < 65536;
}

// A store clock that runs `speed` times faster than real time, starting at
// the current Unix time. Thread-safe.
class ScaledClock final : public Clock {
 public:
  explicit ScaledClock(double speed)
      : start_(SystemClock::Instance().NowUnix()),
        speed_(speed),
        origin_(Steady::now()) {}
  int64_t NowUnix() const override {
    const double real =
        std::chrono::duration<double>(Steady::now() - origin_).count();
    return start_ + static_cast<int64_t>(real * speed_);
  }

 private:
  const int64_t start_;
  const double speed_;
  const Steady::time_point origin_;
};

// Counts messages of one kind and keeps the first few distinct ones.
class Notes {
 public:
  void Add(const std::string &what) {
    count_.fetch_add(1);
    std::lock_guard<std::mutex> lock(mu_);
    if (notes_.size() < 8 &&
        std::find(notes_.begin(), notes_.end(), what) == notes_.end()) {
      notes_.push_back(what);
    }
  }
  uint64_t count() const { return count_.load(); }
  void Print(const char *title) const {
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string &n : notes_) {
      std::printf("  %s: %s\n", title, n.c_str());
    }
  }

 private:
  std::atomic<uint64_t> count_{0};
  mutable std::mutex mu_;
  std::vector<std::string> notes_;
};

Notes g_log_errors, g_log_warnings;

void LogSink(int level, const char *msg, void * /*arg*/) {
  if (level == static_cast<int>(log::Level::kError)) g_log_errors.Add(msg);
  if (level == static_cast<int>(log::Level::kWarning)) g_log_warnings.Add(msg);
}

struct Counters {
  std::atomic<uint64_t> full{0}, attempts{0}, resumed{0}, not_resumed{0};
  std::atomic<uint64_t> no_ticket{0}, probes{0}, probe_resumed{0};
  std::atomic<uint64_t> rotations{0}, destroyed{0}, live_masters{0};
  Notes failures, misses, rotator_errors;
  uint64_t handshakes() const { return full + attempts + probes; }
};

// VmRSS of process `pid` ("self" for this one) in KiB, or -1.
long RssKb(const std::string &pid) {
  std::ifstream in("/proc/" + pid + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::strtol(line.c_str() + 6, nullptr, 10);
    }
  }
  return -1;
}

// The pids whose parent is `parent`.
std::vector<std::string> Children(const std::string &parent) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto &entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string name = entry.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != name.npos) {
      continue;
    }
    std::ifstream in("/proc/" + name + "/stat");
    std::string stat;
    std::getline(in, stat);
    // pid (comm) state ppid ...: comm may hold spaces, so parse after ')'.
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    long ppid = -1;
    if (std::sscanf(stat.c_str() + close + 1, " %c %ld", &state, &ppid) == 2 &&
        std::to_string(ppid) == parent) {
      out.push_back(name);
    }
  }
  return out;
}

// Secret-key session objects (the derived per-epoch keys) alive in the
// token, as seen by a session of this process; -1 if it cannot be read.
long SessionKeysInToken(keystore::KeyStore &store) {
  Result<p11::Session> session = store.token()->Acquire();
  if (!session.ok()) return -1;
  p11::Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bool(CKA_TOKEN, false);
  Result<std::vector<CK_OBJECT_HANDLE>> found =
      p11::FindObjects(*session, t, size_t{1} << 20);
  return found.ok() ? static_cast<long>(found->size()) : -1;
}

// One handshake as the workers see it.
struct Attempt {
  bool ok = false;
  bool reused = false;
  std::string error;
  testing::UniqueSslSession session;  // the newest with a ticket, if any
};
using HandshakeFn = std::function<Attempt(SSL_SESSION *resume)>;

// --- network mode ----------------------------------------------------------

int g_net_slot = -1;

int OnNetSession(SSL *ssl, SSL_SESSION *session) {
  auto *slot = static_cast<testing::UniqueSslSession *>(
      SSL_get_ex_data(ssl, g_net_slot));
  if (slot == nullptr) return 0;
  slot->reset(session);  // we take the reference
  return 1;
}

testing::UniqueSslCtx NewNetClientCtx(int version) {
  testing::UniqueSslCtx ctx(SSL_CTX_new(TLS_client_method()));
  SSL_CTX_set_min_proto_version(ctx.get(), version);
  SSL_CTX_set_max_proto_version(ctx.get(), version);
  SSL_CTX_set_session_cache_mode(
      ctx.get(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx.get(), OnNetSession);
  return ctx;
}

// A TLS connection to 127.0.0.1:port that sends one HTTP/1.0 request and
// reads the answer to the end (TLS 1.3 tickets arrive on the way).
Attempt NetHandshake(SSL_CTX *ctx, int port, SSL_SESSION *resume) {
  Attempt a;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) {
    a.error = std::string("socket: ") + std::strerror(errno);
    return a;
  }
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0) {
    a.error = std::string("connect: ") + std::strerror(errno);
    close(fd);
    return a;
  }
  testing::UniqueSslSession newest;
  SSL *ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  SSL_set_ex_data(ssl, g_net_slot, &newest);
  SSL_set_tlsext_host_name(ssl, "localhost");
  if (resume != nullptr) SSL_set_session(ssl, resume);
  if (SSL_connect(ssl) != 1) {
    a.error = "handshake failed (SSL_connect)";
  } else {
    static constexpr char kRequest[] =
        "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
    std::string answer;
    if (SSL_write(ssl, kRequest, sizeof(kRequest) - 1) > 0) {
      char buf[4096];
      int n;
      while ((n = SSL_read(ssl, buf, sizeof(buf))) > 0) answer.append(buf, n);
    }
    if (answer.rfind("HTTP/1.", 0) != 0) {
      a.error = "no HTTP answer";
    } else {
      a.ok = true;
      a.reused = SSL_session_reused(ssl) == 1;
      // A connection freed without a shutdown marks its session
      // non-resumable: close it properly (the server closed first).
      (void)SSL_shutdown(ssl);
      SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
      if (SSL_version(ssl) != TLS1_3_VERSION) {
        newest.reset(SSL_get1_session(ssl));
      }
    }
  }
  SSL_set_ex_data(ssl, g_net_slot, nullptr);
  SSL_free(ssl);
  close(fd);
  a.session = std::move(newest);
  return a;
}

// --- workers -----------------------------------------------------------------

bool HasTicket(const testing::UniqueSslSession &s) {
  return s && !testing::TicketOf(s.get()).empty();
}

// Full handshake, then resumptions with the newest ticket; in-process also
// an expired-ticket probe once per `probe_delay`.
void Worker(int version, const HandshakeFn &handshake, const Options &o,
            std::optional<Steady::duration> probe_delay,
            const std::atomic<bool> &stop, Counters &c) {
  const std::string tls = version == TLS1_3_VERSION ? "TLS 1.3" : "TLS 1.2";
  testing::UniqueSslSession probe;
  Steady::time_point probe_due{};
  while (!stop.load()) {
    Attempt full = handshake(nullptr);
    c.full++;
    if (!full.ok) {
      c.failures.Add(tls + " full handshake: " + full.error);
      continue;
    }
    if (!HasTicket(full.session)) {
      c.no_ticket++;
      continue;
    }
    if (probe_delay && !probe) {
      probe = testing::WithTicket(full.session.get(),
                                  testing::TicketOf(full.session.get()));
      probe_due = Steady::now() + *probe_delay;
    }
    testing::UniqueSslSession session = std::move(full.session);
    for (int k = 0; k < o.resumes_per_full && !stop.load(); ++k) {
      Attempt r = handshake(session.get());
      c.attempts++;
      if (!r.ok) {
        c.failures.Add(tls + " resumption: " + r.error);
        break;
      }
      if (r.reused) {
        c.resumed++;
      } else {
        c.not_resumed++;
        c.misses.Add(tls);
      }
      if (!HasTicket(r.session)) break;
      session = std::move(r.session);
    }
    if (probe && Steady::now() >= probe_due) {
      Attempt r = handshake(probe.get());
      c.probes++;
      if (!r.ok) {
        c.failures.Add(tls + " expired-ticket probe: " + r.error);
      } else if (r.reused) {
        c.probe_resumed++;
      }
      probe.reset();
    }
  }
}

// The operator's side: a generation every `rotate_every` seconds, through
// its own sessions of the token.
void Rotator(keystore::KeyStore &admin, const Clock &clock, const Options &o,
             const std::atomic<bool> &stop, Counters &c) {
  const std::string &label = admin.label();
  auto next = Steady::now();
  while (!stop.load()) {
    next += std::chrono::duration_cast<Steady::duration>(
        std::chrono::duration<double>(o.rotate_every));
    while (!stop.load() && Steady::now() < next) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (stop.load()) break;
    Result<p11::Session> session = admin.token()->Acquire();
    if (!session.ok()) {
      c.rotator_errors.Add(session.status().message());
      continue;
    }
    Result<std::vector<keystore::Master>> masters =
        keystore::LoadMasters(*session, label);
    if (!masters.ok() || masters->empty()) {
      c.rotator_errors.Add(masters.ok() ? "no master"
                                        : masters.status().message());
      continue;
    }
    const int64_t now = clock.NowUnix();
    auto newest = std::max_element(
        masters->begin(), masters->end(), [](const auto &a, const auto &b) {
          return a.policy.created_at < b.policy.created_at;
        });
    keystore::Policy policy = newest->policy;
    policy.not_before = now + o.activate_in;
    policy.created_at = now;
    policy.retire_at.reset();
    Result<keystore::StoreId> id =
        keystore::CreateMaster(*session, label, policy);
    if (!id.ok()) {
      c.rotator_errors.Add("rotate: " + id.status().message());
      continue;
    }
    c.rotations++;
    uint64_t live = masters->size() + 1;
    if (o.destroy) {
      // Retired for a whole window more, plus a margin of two refreshes:
      // no server can still hold a ticket or a derivation from it.
      const int64_t margin = 2 * admin.options().refresh_interval_s;
      std::vector<keystore::MasterState> states =
          keystore::ComputeStates(*masters, now);
      for (size_t i = 0; i < masters->size(); ++i) {
        const keystore::MasterState &s = states[i];
        if (s.state != keystore::KeyState::kRetired || !s.superseded_at) {
          continue;
        }
        const int64_t gone =
            *s.superseded_at + (*masters)[i].policy.decrypt_window_s + margin;
        if (gone > now) continue;
        Status d = keystore::DestroyMaster(*session, (*masters)[i]);
        if (!d.ok()) {
          c.rotator_errors.Add("destroy: " + d.message());
        } else {
          c.destroyed++;
          --live;
        }
      }
    }
    c.live_masters = live;
  }
}

// RSS series: this process, or the nginx master and its workers' mean.
struct RssReading {
  long main_kb = -1;
  long workers_kb = -1;  // network mode
  int workers = 0;
};

struct Sample {
  double t = 0;
  RssReading rss;
  long token_keys = -1;  // in-process
  size_t cached = 0;
};

RssReading ReadRss(const Options &o) {
  RssReading r;
  if (o.connect_port == 0) {
    r.main_kb = RssKb("self");
    return r;
  }
  std::ifstream in(o.nginx_pidfile);
  std::string master;
  in >> master;
  if (master.empty()) return r;
  r.main_kb = RssKb(master);
  long sum = 0;
  for (const std::string &pid : Children(master)) {
    const long kb = RssKb(pid);
    if (kb <= 0) continue;
    sum += kb;
    r.workers++;
  }
  if (r.workers > 0) r.workers_kb = sum / r.workers;
  return r;
}

// Growth of one RSS series from the first sample after warm-up to the
// last; false (and a problem) if beyond tolerance.
bool JudgeRss(const char *what, const std::vector<Sample> &samples,
              long RssReading::*field, const Options &o,
              std::vector<std::string> *problems) {
  long baseline = -1, final_kb = -1, peak = 0;
  for (const Sample &x : samples) {
    const long v = x.rss.*field;
    if (v <= 0) continue;
    if (baseline < 0 && x.t >= o.warmup) baseline = v;
    final_kb = v;
    peak = std::max(peak, v);
  }
  if (baseline <= 0) {
    problems->push_back(std::string("no ") + what +
                        " RSS sample after warm-up (run longer)");
    return false;
  }
  const double growth = 100.0 * (final_kb - baseline) / baseline;
  std::printf(
      "  RSS %-14s after warm-up (%.0f s) %ld KiB, final %ld KiB, "
      "peak %ld KiB: %+.1f%% (tolerance %.0f%%)\n",
      what, o.warmup, baseline, final_kb, peak, growth, o.rss_tolerance_pct);
  if (growth > o.rss_tolerance_pct) {
    problems->push_back(std::string(what) + " RSS grew beyond tolerance");
    return false;
  }
  return true;
}

int Run(const Options &o) {
  log::SetSink(LogSink, nullptr);
  const bool network = o.connect_port != 0;
  Counters c;
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  std::vector<std::unique_ptr<HandshakeFn>> handshakes;
  std::vector<testing::UniqueSslCtx> client_ctxs;

  // In-process only.
  std::unique_ptr<ScaledClock> clock;
  std::shared_ptr<keystore::KeyStore> admin, store;
  std::shared_ptr<tls::TicketContext> context;
  testing::UniqueSslCtx server;

  if (network) {
    // A peer that closed first must not kill us on the next write.
    std::signal(SIGPIPE, SIG_IGN);
    g_net_slot = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
    std::printf("soak: %" PRId64
                " s, %d threads (TLS 1.3 and 1.2) against "
                "127.0.0.1:%d, %d resumptions per full handshake\n",
                o.seconds, o.threads, o.connect_port, o.resumes_per_full);
  } else {
    testing::SoftHsm &hsm = testing::SoftHsm::Get();
    hsm.CreateToken("soak");
    const std::string uri = hsm.Uri("soak", "soak");
    clock = std::make_unique<ScaledClock>(o.speed);
    keystore::StoreOptions server_options;
    server_options.clock = clock.get();
    // About one real second between refreshes.
    server_options.refresh_interval_s =
        std::max<int64_t>(1, static_cast<int64_t>(std::ceil(o.speed)));
    server_options.token.backoff_initial = std::chrono::milliseconds(10);
    keystore::StoreOptions admin_options = server_options;
    admin_options.background_maintenance = false;
    admin_options.token.read_write = true;
    Result<std::shared_ptr<keystore::KeyStore>> a =
        keystore::KeyStore::Open(uri, admin_options);
    Result<std::shared_ptr<keystore::KeyStore>> s =
        keystore::KeyStore::Open(uri, server_options);
    if (!a.ok() || !s.ok()) {
      std::fprintf(stderr, "open: %s\n",
                   (a.ok() ? s.status() : a.status()).message().c_str());
      return 2;
    }
    admin = *a;
    store = *s;
    keystore::Policy policy;
    policy.period_s = o.period_s;
    policy.decrypt_window_s = o.window_s;
    policy.not_before = clock->NowUnix() - o.period_s;
    policy.created_at = policy.not_before;
    Result<p11::Session> session = admin->token()->Acquire();
    Result<keystore::StoreId> id =
        session.ok() ? keystore::CreateMaster(*session, "soak", policy)
                     : Result<keystore::StoreId>(session.status());
    if (!id.ok()) {
      std::fprintf(stderr, "provision: %s\n", id.status().message().c_str());
      return 2;
    }
    Status loaded = store->Load();
    if (!loaded.ok()) {
      std::fprintf(stderr, "load: %s\n", loaded.message().c_str());
      return 2;
    }
    context = std::make_shared<tls::TicketContext>();
    context->store = store;
    context->stats = std::make_shared<tls::TicketStats>();
    Result<SSL_CTX *> made = tls::NewScopedSslCtx(TLS_server_method(), context);
    if (!made.ok()) {
      std::fprintf(stderr, "server: %s\n", made.status().message().c_str());
      return 2;
    }
    server.reset(*made);
    SSL_CTX_set_min_proto_version(server.get(), TLS1_2_VERSION);
    testing::UseTestCertificate(server.get());
    // Tickets only: no server-side session cache to resume from.
    SSL_CTX_set_session_cache_mode(server.get(), SSL_SESS_CACHE_OFF);
    std::printf("soak: %" PRId64
                " s, %d threads (TLS 1.3 and 1.2) in-process, "
                "clock x%.0f, period %" PRId64 " s, window %" PRId64
                " s (store clock), a generation every %.1f s (real) activating "
                "%" PRId64 " s later, %d resumptions per full handshake\n",
                o.seconds, o.threads, o.speed, o.period_s, o.window_s,
                o.rotate_every, o.activate_in, o.resumes_per_full);
  }
  std::fflush(stdout);

  c.live_masters = 1;
  // A ticket is replayed once the store has certainly left its window.
  const std::optional<Steady::duration> probe_delay =
      network ? std::nullopt
              : std::optional<Steady::duration>(
                    std::chrono::duration_cast<Steady::duration>(
                        std::chrono::duration<double>(
                            (o.window_s + 2 * o.period_s) / o.speed)));
  for (int i = 0; i < o.threads; ++i) {
    const int version = i % 2 == 0 ? TLS1_3_VERSION : TLS1_2_VERSION;
    client_ctxs.push_back(network ? NewNetClientCtx(version)
                                  : testing::NewClientCtx(version));
    SSL_CTX *client = client_ctxs.back().get();
    if (network) {
      const int port = o.connect_port;
      handshakes.push_back(
          std::make_unique<HandshakeFn>([client, port](SSL_SESSION *resume) {
            return NetHandshake(client, port, resume);
          }));
    } else {
      SSL_CTX *srv = server.get();
      handshakes.push_back(
          std::make_unique<HandshakeFn>([client, srv](SSL_SESSION *resume) {
            testing::HandshakeResult r =
                testing::Handshake(client, srv, resume);
            Attempt a;
            a.ok = r.ok;
            a.reused = r.reused;
            a.error = r.error;
            a.session = std::move(r.session);
            return a;
          }));
    }
    threads.emplace_back(Worker, version, std::cref(*handshakes.back()),
                         std::cref(o), probe_delay, std::cref(stop),
                         std::ref(c));
  }
  if (!network) {
    threads.emplace_back(Rotator, std::ref(*admin), std::cref(*clock),
                         std::cref(o), std::cref(stop), std::ref(c));
  }

  std::vector<Sample> samples;
  const auto start = Steady::now();
  const auto deadline = start + std::chrono::seconds(o.seconds);
  uint64_t last_handshakes = 0;
  double last_t = 0;
  if (network) {
    std::printf("%7s %12s %9s %11s %8s %8s %6s\n", "t(s)", "master(KiB)",
                "worker", "handshakes", "hs/s", "resumed%", "fails");
  } else {
    std::printf("%7s %9s %11s %8s %8s %10s %7s %9s %6s\n", "t(s)", "rss(KiB)",
                "handshakes", "hs/s", "resumed%", "epoch", "masters",
                "tok-keys", "fails");
  }
  while (Steady::now() < deadline) {
    const auto wake = std::min(
        deadline,
        Steady::now() + std::chrono::duration_cast<Steady::duration>(
                            std::chrono::duration<double>(o.sample_every)));
    std::this_thread::sleep_until(wake);
    Sample x;
    x.t = std::chrono::duration<double>(Steady::now() - start).count();
    x.rss = ReadRss(o);
    if (!network) {
      x.token_keys = SessionKeysInToken(*admin);
      x.cached = store->cached_keys();
    }
    const uint64_t hs = c.handshakes();
    const uint64_t attempts = c.attempts.load();
    const double rate = (hs - last_handshakes) / std::max(x.t - last_t, 1e-3);
    const double resumed = attempts ? 100.0 * c.resumed.load() / attempts : 0.0;
    if (network) {
      std::printf("%7.1f %12ld %9ld %11" PRIu64 " %8.0f %8.2f %6" PRIu64 "\n",
                  x.t, x.rss.main_kb, x.rss.workers_kb, hs, rate, resumed,
                  c.failures.count());
    } else {
      std::printf("%7.1f %9ld %11" PRIu64 " %8.0f %8.2f %10" PRId64 " %7" PRIu64
                  " %9ld %6" PRIu64 "\n",
                  x.t, x.rss.main_kb, hs, rate, resumed,
                  clock->NowUnix() / o.period_s, c.live_masters.load(),
                  x.token_keys, c.failures.count());
    }
    std::fflush(stdout);
    samples.push_back(x);
    last_handshakes = hs;
    last_t = x.t;
  }
  stop = true;
  for (std::thread &t : threads) t.join();
  const double elapsed =
      std::chrono::duration<double>(Steady::now() - start).count();

  // Results and verdict.
  std::vector<std::string> problems;
  const uint64_t attempts = c.attempts.load();
  const double resume_pct =
      attempts ? 100.0 * c.resumed.load() / attempts : 0.0;
  std::printf("\nsoak results after %.0f s:\n", elapsed);
  std::printf("  handshakes         %" PRIu64 " (%.0f/s): %" PRIu64
              " full, %" PRIu64 " resumption attempts, %" PRIu64
              " expired-ticket probes\n",
              c.handshakes(), c.handshakes() / elapsed, c.full.load(), attempts,
              c.probes.load());
  std::printf("  failed handshakes  %" PRIu64 "\n", c.failures.count());
  std::printf("  resumed            %" PRIu64 " of %" PRIu64
              " (%.3f%%; expected 100%%: every ticket is seconds old)\n",
              c.resumed.load(), attempts, resume_pct);
  std::printf("  full without ticket %" PRIu64 "\n", c.no_ticket.load());
  if (c.failures.count() != 0) problems.push_back("failed handshakes");
  if (attempts == 0 || resume_pct < o.min_resume_pct) {
    problems.push_back("resumption rate below expectation");
  }
  if (c.no_ticket.load() != 0) {
    problems.push_back("full handshakes without a ticket");
  }
  if (!network) {
    const tls::TicketCounters s = context->stats->Snapshot();
    std::printf("  expired probes that resumed %" PRIu64 " of %" PRIu64
                " (expected 0)\n",
                c.probe_resumed.load(), c.probes.load());
    std::printf("  rotations          %" PRIu64 " generations added, %" PRIu64
                " destroyed, %" PRIu64 " live at the end, %" PRIu64
                " rotator errors\n",
                c.rotations.load(), c.destroyed.load(), c.live_masters.load(),
                c.rotator_errors.count());
    std::printf("  store              %" PRIu64 " derivations, %" PRIu64
                " reloads, %zu cached key pairs at the end\n",
                store->derivations(), store->reloads(), store->cached_keys());
    std::printf("  callback counters  issued %" PRIu64 ", resumed %" PRIu64
                ", renewed %" PRIu64 ", rejected unknown %" PRIu64
                " / expired %" PRIu64 " / future %" PRIu64
                " / not-routed %" PRIu64 ", token errors %" PRIu64 "\n",
                s.issued, s.resumed, s.renewed, s.rejected_unknown_key,
                s.rejected_expired, s.rejected_future, s.rejected_not_routed,
                s.token_errors);
    std::printf("  seal latency       p50 %" PRIu64 " us, p99 %" PRIu64
                " us, max %" PRIu64 " us\n",
                s.seal.p50_ns / 1000, s.seal.p99_ns / 1000,
                s.seal.max_ns / 1000);
    std::printf("  open latency       p50 %" PRIu64 " us, p99 %" PRIu64
                " us, max %" PRIu64 " us\n",
                s.open.p50_ns / 1000, s.open.p99_ns / 1000,
                s.open.max_ns / 1000);
    std::printf("  library log        %" PRIu64 " errors, %" PRIu64
                " warnings\n",
                g_log_errors.count(), g_log_warnings.count());
    const long final_keys = samples.empty() ? -1 : samples.back().token_keys;
    const size_t cached = samples.empty() ? 0 : samples.back().cached;
    std::printf(
        "  token session keys %ld derived-key objects at the last "
        "sample, %zu cached pairs (expected <= 2 x cached + 4)\n",
        final_keys, cached);
    if (c.probe_resumed.load() != 0) {
      problems.push_back("an expired ticket resumed");
    }
    if (c.probes.load() == 0) problems.push_back("no expired-ticket probe ran");
    if (c.rotations.load() == 0 || c.rotator_errors.count() != 0) {
      problems.push_back("rotation did not run cleanly");
    }
    if (s.token_errors != 0) problems.push_back("token errors");
    if (g_log_errors.count() != 0) problems.push_back("library errors logged");
    if (final_keys < 0 || final_keys > 2 * static_cast<long>(cached) + 4) {
      problems.push_back("derived keys left in the token beyond the cache");
    }
    JudgeRss("process", samples, &RssReading::main_kb, o, &problems);
  } else {
    JudgeRss("nginx master", samples, &RssReading::main_kb, o, &problems);
    JudgeRss("nginx worker", samples, &RssReading::workers_kb, o, &problems);
  }
  c.failures.Print("failure");
  c.misses.Print("not resumed");
  c.rotator_errors.Print("rotator error");
  g_log_errors.Print("log error");
  g_log_warnings.Print("log warning");

  if (problems.empty()) {
    std::printf("soak: PASS\n");
    return 0;
  }
  std::printf("soak: FAIL:");
  for (const std::string &p : problems) std::printf(" [%s]", p.c_str());
  std::printf("\n");
  return 1;
}

}  // namespace
}  // namespace hsmstek::soak

int main(int argc, char **argv) {
  hsmstek::soak::Options options;
  if (!hsmstek::soak::ParseOptions(argc, argv, &options)) {
    hsmstek::soak::Usage(argv[0]);
    return 2;
  }
  return hsmstek::soak::Run(options);
}
