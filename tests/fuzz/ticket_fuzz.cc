#include "ticket_fuzz.h"

#include <openssl/ssl.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/bytes.h"
#include "common/clock.h"
#include "common/log.h"
#include "keystore/policy.h"
#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "softhsm.h"
#include "tls/ticket_callback.h"
#include "tls_harness.h"

namespace hsmstek::fuzz {
namespace {

constexpr size_t kMaxTicket = 8192;
constexpr int64_t kDay = 24 * 3600;
constexpr int64_t kNow = static_cast<int64_t>(kFuzzEpoch) * kFuzzPeriod + 600;

[[noreturn]] void Fail(int version, const std::string &what) {
  std::fprintf(stderr, "fuzz_ticket_tls1%d invariant failed: %s\n",
               version == TLS1_3_VERSION ? 3 : 2, what.c_str());
  std::abort();
}

// Library errors (never expected here) are counted and the last one kept.
std::atomic<uint64_t> g_logged_errors{0};
std::mutex g_log_mu;
std::string g_last_error;

std::string g_last_warning;  // names the token's error in a failure

void LogSink(int level, const char *msg, void * /*arg*/) {
  if (level == static_cast<int>(log::Level::kWarning)) {
    std::lock_guard<std::mutex> lock(g_log_mu);
    g_last_warning = msg;
  }
  if (level != static_cast<int>(log::Level::kError)) return;
  g_logged_errors.fetch_add(1);
  std::lock_guard<std::mutex> lock(g_log_mu);
  g_last_error = msg;
}

struct Rig {
  int version = 0;
  FakeClock clock{kNow};  // outlives the store: the rig is never freed
  std::shared_ptr<tls::TicketContext> context;
  testing::UniqueSslCtx server;
  testing::UniqueSslCtx client;
  testing::UniqueSslSession base;
  Bytes genuine;
  keystore::StoreId store_id{};
};

void CheckInput(Rig &rig, ByteSpan input);

// Variants of the genuine ticket a live server sees: an in-window name
// whose MAC cannot match. Placeholder-prefixed, so they stay meaningful in
// another process.
std::vector<std::pair<std::string, Bytes>> LiveVariants(const Rig &rig) {
  Bytes g = rig.genuine;
  std::memcpy(g.data(), kStoreIdPlaceholder, 8);
  std::vector<std::pair<std::string, Bytes>> out;
  out.emplace_back("genuine", g);
  auto flipped = [&](const char *what, size_t offset) {
    Bytes t = g;
    t[offset] ^= 0x01;
    out.emplace_back(what, t);
  };
  flipped("flip-epoch", 15);
  flipped("flip-iv", 16);
  flipped("flip-ciphertext", 40);
  flipped("flip-last-block", g.size() - 33);
  flipped("flip-mac", g.size() - 1);
  out.emplace_back("truncated", Bytes(g.begin(), g.end() - 1));
  Bytes longer = g;
  longer.push_back(0);
  out.emplace_back("longer", longer);
  out.emplace_back("name-only", Bytes(g.begin(), g.begin() + 16));
  // The same body under the previous epoch: kOld, so a derivation, then a
  // MAC mismatch.
  Bytes previous = g;
  StoreBigEndian64(kFuzzEpoch - 1, previous.data() + 8);
  out.emplace_back("previous-epoch", previous);
  return out;
}

Rig *MakeRig(int version) {
  auto *rig = new Rig;
  rig->version = version;
  log::SetSink(LogSink, nullptr);
  testing::SoftHsm &hsm = testing::SoftHsm::Get();
  const std::string token =
      version == TLS1_3_VERSION ? "fuzz-tls13" : "fuzz-tls12";
  hsm.CreateToken(token);

  keystore::StoreOptions options;
  options.clock = &rig->clock;
  options.background_maintenance = false;
  options.token.read_write = true;
  options.token.backoff_initial = std::chrono::milliseconds(0);
  Result<std::shared_ptr<keystore::KeyStore>> store =
      keystore::KeyStore::Open(hsm.Uri(token, "fuzz"), options);
  if (!store.ok()) Fail(version, "open store: " + store.status().message());
  {
    keystore::Policy policy;
    policy.period_s = kFuzzPeriod;
    // The widest window: the most epochs a forged name can make us derive.
    policy.decrypt_window_s = keystore::kMaxWindowEpochs * kFuzzPeriod;
    policy.not_before = kNow - 30 * kDay;
    policy.created_at = policy.not_before;
    Result<p11::Session> session = (*store)->token()->Acquire();
    if (!session.ok()) Fail(version, "session: " + session.status().message());
    Result<keystore::StoreId> id =
        keystore::CreateMaster(*session, "fuzz", policy);
    if (!id.ok()) Fail(version, "create master: " + id.status().message());
    rig->store_id = *id;
  }
  Status loaded = (*store)->Load();
  if (!loaded.ok()) Fail(version, "load: " + loaded.message());

  rig->context = std::make_shared<tls::TicketContext>();
  rig->context->store = *store;
  rig->context->stats = std::make_shared<tls::TicketStats>();
  Result<SSL_CTX *> server =
      tls::NewScopedSslCtx(TLS_server_method(), rig->context);
  if (!server.ok()) Fail(version, "server ctx: " + server.status().message());
  rig->server.reset(*server);
  testing::PrepareServerCtx(rig->server.get(), version);
  // Resumption only through tickets (an empty or absent ticket would
  // otherwise let the base session resume from the cache by session id).
  SSL_CTX_set_session_cache_mode(rig->server.get(), SSL_SESS_CACHE_OFF);
  // One TLS 1.3 ticket per handshake: the harness keeps only the newest.
  SSL_CTX_set_num_tickets(rig->server.get(), 1);
  rig->client = testing::NewClientCtx(version);

  testing::HandshakeResult full =
      testing::Handshake(rig->client.get(), rig->server.get());
  if (!full.ok || full.reused || !full.session) {
    Fail(version, "first handshake: " + full.error);
  }
  rig->genuine = testing::TicketOf(full.session.get());
  // Names are opaque (version 2): the store's name of the current epoch.
  Result<keystore::KeyName> name = (*store)->NameOf(
      rig->store_id, keystore::EpochAt(rig->clock.NowUnix(), kFuzzPeriod));
  if (rig->genuine.size() < 16 + 16 + 16 + 32 || !name.ok() ||
      std::memcmp(rig->genuine.data(), name->bytes.data(), 16) != 0) {
    Fail(version, "first handshake issued no ticket of the store");
  }
  rig->base = std::move(full.session);

  // Self-check, in every process (also the gcc replay): the genuine
  // ticket resumes, its near misses do not.
  for (const auto &[name, bytes] : LiveVariants(*rig)) CheckInput(*rig, bytes);
  return rig;
}

Rig &GetRig(int version) {
  static Rig *tls12 = nullptr;
  static Rig *tls13 = nullptr;
  Rig *&slot = version == TLS1_3_VERSION ? tls13 : tls12;
  if (slot == nullptr) slot = MakeRig(version);
  return *slot;
}

void CheckInput(Rig &rig, ByteSpan input) {
  Bytes ticket(input.begin(), input.end());
  if (ticket.size() >= 8 &&
      std::memcmp(ticket.data(), kStoreIdPlaceholder, 8) == 0) {
    // The placeholder stood for the store id, the first half of a
    // version-1 name; names are opaque now: the first half of ours.
    std::memcpy(ticket.data(), rig.genuine.data(), 8);
  }
  testing::UniqueSslSession offer = testing::WithTicket(rig.base.get(), ticket);
  if (!offer) Fail(rig.version, "WithTicket could not encode the session");

  const uint64_t errors_before = g_logged_errors.load();
  testing::HandshakeResult r =
      testing::Handshake(rig.client.get(), rig.server.get(), offer.get());
  if (!r.ok) {
    Fail(rig.version, "handshake failed with a " +
                          std::to_string(ticket.size()) +
                          "-byte ticket: " + r.error);
  }
  const bool genuine = ticket == rig.genuine;
  if (r.reused != genuine) {
    Fail(rig.version, genuine ? "the genuine ticket did not resume"
                              : "a forged ticket resumed: " +
                                    HexEncode(ByteSpan(
                                        ticket.data(),
                                        std::min<size_t>(ticket.size(), 64))));
  }
  const tls::TicketCounters c = rig.context->stats->Snapshot();
  if (c.token_errors != 0) {
    std::lock_guard<std::mutex> lock(g_log_mu);
    Fail(rig.version,
         "the token reported an error (last warning: " + g_last_warning + ")");
  }
  if (g_logged_errors.load() != errors_before) {
    std::lock_guard<std::mutex> lock(g_log_mu);
    Fail(rig.version, "library error logged: " + g_last_error);
  }
}

}  // namespace

int FuzzTicket(int version, const uint8_t *data, size_t size) {
  Rig &rig = GetRig(version);
  if (size > kMaxTicket) return 0;
  CheckInput(rig, ByteSpan(data, size));
  return 0;
}

int WriteLiveSeeds(int version, const std::string &dir) {
  Rig &rig = GetRig(version);
  if (dir.empty()) return 0;
  int written = 0;
  for (const auto &[name, bytes] : LiveVariants(rig)) {
    std::ofstream out(dir + "/live-" + name,
                      std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char *>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    if (out.good()) ++written;
  }
  std::fprintf(stderr, "fuzz_ticket_tls1%d: wrote %d live seeds to %s\n",
               version == TLS1_3_VERSION ? 3 : 2, written, dir.c_str());
  return written;
}

std::string FirstCorpusDir(int argc, char **argv) {
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] == '-') continue;
    std::error_code ec;
    if (std::filesystem::is_directory(argv[i], ec)) return argv[i];
  }
  return "";
}

}  // namespace hsmstek::fuzz
