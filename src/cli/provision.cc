// The life of a master: provision, rotate, retire, destroy.
#include <algorithm>
#include <iostream>
#include <memory>

#include "cli/common.h"
#include "keystore/derivation.h"
#include "keystore/duration.h"
#include "keystore/master.h"
#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "keystore/time_format.h"
#include "pkcs11/object.h"

namespace hsmstek::cli {
namespace {

using keystore::FormatDuration;
using keystore::FormatRfc3339;
using keystore::Master;
using keystore::Policy;
using keystore::StoreId;

// Default delay between `rotate` and the new master's activation: time for
// every server (refresh 30 s) and every replica (export/import) to hold it
// before anyone issues tickets under it.
constexpr int64_t kDefaultRotateDelay = 3600;

struct MasterArgs {
  std::string uri;
  std::string period;
  std::string window;
  std::string ratchet;  // "" = the default (provision: one day; rotate: the
                        // newest master's)
  std::string activate_in;
  std::string activate_at;
  std::string id;
  bool replicable = false;
  bool yes = false;
  bool force = false;
};

int64_t Now() { return SystemClock::Instance().NowUnix(); }

std::string When(int64_t t, int64_t now) {
  std::string s = FormatRfc3339(t);
  if (t > now) return s + " (in " + FormatDuration(t - now) + ")";
  return s + " (now)";
}

Result<int64_t> ParseOptionalDuration(const std::string &text,
                                      const char *option, int64_t fallback) {
  if (text.empty()) return fallback;
  Result<int64_t> d = keystore::ParseDuration(text);
  if (!d.ok()) return d.status().WithContext(option);
  return *d;
}

Result<p11::Session> WriteSession(keystore::KeyStore &store) {
  return store.token()->Acquire();
}

void PrintNewMaster(std::string_view verb, keystore::KeyStore &store,
                    const StoreId &id, const Policy &policy,
                    const std::array<uint8_t, keystore::kCheckValueSize> &check,
                    int64_t now) {
  std::cout << verb << " master of store " << Quote(store.label())
            << " in token " << Quote(store.token()->label()) << "\n"
            << "  store id:        " << HexEncode(id) << "\n"
            << "  check value:     " << HexEncode(check) << "\n"
            << "  activation:      " << When(policy.not_before, now) << "\n"
            << "  period:          " << FormatDuration(policy.period_s) << "\n"
            << "  decrypt window:  " << FormatDuration(policy.decrypt_window_s)
            << "\n"
            << "  replicable:      " << (policy.replicable ? "yes" : "no")
            << "\n";
}

Status CreateAndReport(std::string_view verb, keystore::KeyStore &store,
                       p11::Session &session, const Policy &policy,
                       int64_t now) {
  Result<StoreId> id = keystore::CreateMaster(session, store.label(), policy);
  if (!id.ok()) return id.status();
  Result<std::array<uint8_t, keystore::kCheckValueSize>> check =
      store.CheckValue(*id);
  if (!check.ok()) return check.status().WithContext("check value");
  PrintNewMaster(verb, store, *id, policy, *check, now);
  return Status::Ok();
}

Status RunProvision(const MasterArgs &a) {
  const int64_t now = Now();
  Result<int64_t> period = ParseOptionalDuration(a.period, "--period", 3600);
  if (!period.ok()) return period.status();
  Result<int64_t> window =
      ParseOptionalDuration(a.window, "--decrypt-window", 24 * 3600);
  if (!window.ok()) return window.status();
  Result<int64_t> ratchet = ParseOptionalDuration(a.ratchet, "--ratchet", 0);
  if (!ratchet.ok()) return ratchet.status();
  Result<int64_t> activation =
      ParseActivation(a.activate_in, a.activate_at, now, 0);
  if (!activation.ok()) return activation.status();
  Policy policy;
  policy.period_s = *period;
  policy.decrypt_window_s = *window;
  policy.ratchet_s = *ratchet;
  policy.not_before = *activation;
  policy.replicable = a.replicable;
  policy.created_at = now;
  // Checked before the token is touched: a bad policy creates nothing.
  Status valid = keystore::ValidatePolicy(policy);
  if (!valid.ok()) return valid;

  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, true);
  if (!store.ok()) return store.status();
  Result<p11::Session> session = WriteSession(**store);
  if (!session.ok()) return session.status();
  Result<std::vector<Master>> masters =
      keystore::LoadMasters(*session, (*store)->label());
  if (!masters.ok()) return masters.status();
  if (!masters->empty()) {
    return AlreadyExists("store " + Quote((*store)->label()) +
                         " already has a master (" +
                         HexEncode(masters->front().id) +
                         "); use `hsmstek rotate` to add a generation");
  }
  return CreateAndReport("provisioned", **store, *session, policy, now);
}

Status RunRotate(const MasterArgs &a) {
  const int64_t now = Now();
  Result<int64_t> activation =
      ParseActivation(a.activate_in, a.activate_at, now, kDefaultRotateDelay);
  if (!activation.ok()) return activation.status();
  Result<int64_t> period = ParseOptionalDuration(a.period, "--period", 0);
  if (!period.ok()) return period.status();
  Result<int64_t> window =
      ParseOptionalDuration(a.window, "--decrypt-window", 0);
  if (!window.ok()) return window.status();
  Result<int64_t> ratchet = ParseOptionalDuration(a.ratchet, "--ratchet", 0);
  if (!ratchet.ok()) return ratchet.status();

  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, true);
  if (!store.ok()) return store.status();
  const std::string &label = (*store)->label();
  Result<p11::Session> session = WriteSession(**store);
  if (!session.ok()) return session.status();
  Result<std::vector<Master>> masters = keystore::LoadMasters(*session, label);
  if (!masters.ok()) return masters.status();
  if (masters->empty()) {
    return NotFound("store " + Quote(label) + " in token " +
                    Quote((*store)->token()->label()) +
                    " has no master to rotate; use `hsmstek provision`");
  }
  auto newest = std::max_element(
      masters->begin(), masters->end(), [](const Master &x, const Master &y) {
        if (x.policy.created_at != y.policy.created_at) {
          return x.policy.created_at < y.policy.created_at;
        }
        return x.policy.not_before < y.policy.not_before;
      });
  Policy policy = newest->policy;
  if (*period != 0) policy.period_s = *period;
  if (*window != 0) policy.decrypt_window_s = *window;
  if (*ratchet != 0) policy.ratchet_s = *ratchet;
  policy.not_before = *activation;
  policy.retire_at.reset();
  policy.created_at = now;
  Status valid = keystore::ValidatePolicy(policy);
  if (!valid.ok()) return valid;
  // The newest master wins at its activation unless that lies in the past
  // and another master activated since: then it would never encrypt.
  const int64_t at = std::max(now, policy.not_before);
  for (const Master &m : *masters) {
    bool live = !m.policy.retire_at || *m.policy.retire_at > at;
    if (live && m.policy.not_before > policy.not_before &&
        m.policy.not_before <= at) {
      return FailedPrecondition(
          "the new master would activate at " +
          FormatRfc3339(policy.not_before) + ", before master " +
          HexEncode(m.id) + " (activated " +
          FormatRfc3339(m.policy.not_before) +
          "), so it would never encrypt; use a later --activate-in or "
          "--activate-at");
    }
  }
  Status created =
      CreateAndReport("rotated: new", **store, *session, policy, now);
  if (!created.ok()) return created;
  // Servers pick up a new master at their next refresh; until then they
  // refuse tickets other servers already seal under it (full handshakes).
  const int64_t refresh_s = keystore::StoreOptions().refresh_interval_s;
  if (policy.not_before - now < refresh_s) {
    std::cerr << "hsmstek: warning: the new master activates in less than "
                 "the servers' "
              << refresh_s
              << " s refresh; servers that have not loaded it yet refuse "
                 "its tickets (full handshakes) until they do. Stage "
                 "rotations with --activate-in of at least "
              << refresh_s << "s (default 1h)\n";
  }
  return created;
}

const Master *FindMaster(const std::vector<Master> &masters,
                         const StoreId &id) {
  for (const Master &m : masters) {
    if (m.id == id) return &m;
  }
  return nullptr;
}

Status NoSuchMaster(const std::string &label, const StoreId &id,
                    const std::vector<Master> &masters) {
  std::string ids;
  for (const Master &m : masters) {
    ids += (ids.empty() ? "" : ", ") + HexEncode(m.id);
  }
  return NotFound("no master " + HexEncode(id) + " in store " + Quote(label) +
                  " (masters: " + (ids.empty() ? "none" : ids) + ")");
}

Status RunRetire(const MasterArgs &a) {
  Result<StoreId> id = ParseStoreId(a.id);
  if (!id.ok()) return id.status();
  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, true);
  if (!store.ok()) return store.status();
  const std::string &label = (*store)->label();
  Result<p11::Session> session = WriteSession(**store);
  if (!session.ok()) return session.status();
  Result<std::vector<Master>> masters = keystore::LoadMasters(*session, label);
  if (!masters.ok()) return masters.status();
  const Master *master = FindMaster(*masters, *id);
  if (master == nullptr) return NoSuchMaster(label, *id, *masters);
  const int64_t now = Now();
  if (master->policy.retire_at && *master->policy.retire_at <= now) {
    std::cout << "master " << HexEncode(*id) << " of store " << Quote(label)
              << " was already retired at "
              << FormatRfc3339(*master->policy.retire_at)
              << "; nothing changed\n";
    return Status::Ok();
  }
  Policy policy = master->policy;
  policy.retire_at = now;
  Status updated = keystore::UpdatePolicy(*session, *master, label, policy);
  if (!updated.ok()) return updated;

  std::vector<Master> after = *masters;
  for (Master &m : after) {
    if (m.id == *id) m.policy = policy;
  }
  std::vector<keystore::MasterState> states =
      keystore::ComputeStates(after, now);
  bool any_active = std::any_of(states.begin(), states.end(), [](auto &s) {
    return s.state == keystore::KeyState::kActive;
  });
  std::cout << "retired master " << HexEncode(*id) << " of store "
            << Quote(label) << " (retire-at " << FormatRfc3339(now) << ")\n"
            << "Its tickets are no longer accepted and no new ones are issued "
               "under it. Running servers pick this up at their next refresh "
               "(within 30 s by default).\n";
  if (!any_active) {
    std::cout << "WARNING: store " << Quote(label)
              << " now has no active master: servers issue no tickets until "
                 "a master activates (`hsmstek rotate --activate-in 0s`).\n";
  }
  return Status::Ok();
}

// Destroys a master whose store cannot be loaded (e.g. its policy is
// missing or unreadable): the key and any policy object with its id.
Status DestroyUnloadable(p11::Session &session, const std::string &label,
                         const StoreId &id, const Status &load_error) {
  p11::Template keys;
  keys.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .String(CKA_LABEL, label)
      .Data(CKA_ID, id);
  p11::Template policies;
  policies.Ulong(CKA_CLASS, CKO_DATA)
      .String(CKA_APPLICATION, keystore::kPolicyApplication)
      .String(CKA_LABEL, label)
      .Data(keystore::kDataIdAttribute, id);
  Result<std::vector<CK_OBJECT_HANDLE>> k = p11::FindObjects(session, keys);
  if (!k.ok()) return k.status();
  Result<std::vector<CK_OBJECT_HANDLE>> p = p11::FindObjects(session, policies);
  if (!p.ok()) return p.status();
  if (k->empty() && p->empty()) {
    return load_error.WithContext("no master " + HexEncode(id) + " in store " +
                                  Quote(label) + "; the store does not load");
  }
  for (const auto *list : {&*k, &*p}) {
    for (CK_OBJECT_HANDLE h : *list) {
      Status s = P11_CALL(session, C_DestroyObject, session.handle(), h);
      if (!s.ok()) return s.WithContext("destroying master " + HexEncode(id));
    }
  }
  std::cout << "destroyed master " << HexEncode(id) << " of store "
            << Quote(label) << " (" << k->size() << " key, " << p->size()
            << " policy object; the store did not load: "
            << load_error.message() << ")\n";
  return Status::Ok();
}

Status RunDestroy(const MasterArgs &a) {
  if (!a.yes) {
    return FailedPrecondition(
        "refusing to destroy without --yes: destroying a key cannot be "
        "undone, and tickets under it stop resuming at once");
  }
  Result<Bytes> raw = HexDecode(a.id);
  if (!raw.ok() || (raw->size() != sizeof(StoreId) &&
                    raw->size() != keystore::kKeyNameSize)) {
    return InvalidArgument(
        "--id " + Quote(a.id) +
        " is neither a store id (16 hex digits) nor a legacy key name (32)");
  }
  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, true);
  if (!store.ok()) return store.status();
  const std::string &label = (*store)->label();
  Result<p11::Session> session = WriteSession(**store);
  if (!session.ok()) return session.status();

  if (raw->size() == keystore::kKeyNameSize) {
    Result<std::vector<keystore::LegacyKeyObjects>> legacy =
        keystore::LoadLegacyKeys(*session, label);
    if (!legacy.ok()) return legacy.status();
    for (const keystore::LegacyKeyObjects &l : *legacy) {
      if (!std::equal(l.name.bytes.begin(), l.name.bytes.end(), raw->begin())) {
        continue;
      }
      Status s = keystore::DestroyLegacyKey(*session, l);
      if (!s.ok()) return s;
      std::cout << "destroyed legacy key " << HexEncode(l.name.bytes)
                << " of store " << Quote(label) << "\n";
      return Status::Ok();
    }
    return NotFound("no legacy key " + HexEncode(*raw) + " in store " +
                    Quote(label));
  }

  StoreId id;
  std::copy(raw->begin(), raw->end(), id.begin());
  Result<std::vector<Master>> masters = keystore::LoadMasters(*session, label);
  if (!masters.ok()) {
    return DestroyUnloadable(*session, label, id, masters.status());
  }
  const Master *master = FindMaster(*masters, id);
  if (master == nullptr) return NoSuchMaster(label, id, *masters);
  std::vector<keystore::MasterState> states =
      keystore::ComputeStates(*masters, Now());
  const keystore::KeyState state = states[master - masters->data()].state;
  if (state == keystore::KeyState::kActive && !a.force) {
    return FailedPrecondition(
        "master " + HexEncode(id) + " is the active master of store " +
        Quote(label) +
        ": servers would issue no tickets; rotate first, or pass --force");
  }
  Status s = keystore::DestroyMaster(*session, *master);
  if (!s.ok()) return s;
  std::cout << "destroyed master " << HexEncode(id) << " (was "
            << keystore::KeyStateName(state) << ") of store " << Quote(label)
            << "\n";
  return Status::Ok();
}

void AddActivation(CLI::App *sub, MasterArgs &a, const char *in_help) {
  CLI::Option *in = sub->add_option("--activate-in", a.activate_in, in_help);
  CLI::Option *at =
      sub->add_option("--activate-at", a.activate_at,
                      "Activation time, RFC 3339 (e.g. 2026-05-01T12:00:00Z)");
  in->excludes(at);
}

}  // namespace

void RegisterProvision(CLI::App &app, std::vector<Command> &out) {
  {
    auto a = std::make_shared<MasterArgs>();
    a->period = "1h";
    a->window = "24h";
    CLI::App *sub = app.add_subcommand(
        "provision",
        "Create the first master of a store (refuses a label "
        "that already has one)");
    sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
    sub->add_option("--period", a->period,
                    "Rotation period: 90s, 15m, 1h, 7d (default 1h)");
    sub->add_option("--decrypt-window", a->window,
                    "How long tickets stay decryptable; a multiple of the "
                    "period, at most 7d (default 24h)");
    sub->add_option("--ratchet", a->ratchet,
                    "How long one forward-secure ratchet link serves; a "
                    "multiple of the period, at most 7d (default 1d, or one "
                    "period when longer)");
    AddActivation(sub, *a, "Activate after this delay (default: now)");
    sub->add_flag("--replicable", a->replicable,
                  "Allow export to other tokens, wrapped under a trusted key "
                  "only");
    out.push_back({sub, [a] { return RunProvision(*a); }});
  }
  {
    auto a = std::make_shared<MasterArgs>();
    CLI::App *sub = app.add_subcommand(
        "rotate", "Add a new master generation, staged: it activates later");
    sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
    AddActivation(sub, *a, "Activate after this delay (default 1h)");
    sub->add_option("--period", a->period,
                    "Rotation period (default: the newest master's)");
    sub->add_option("--decrypt-window", a->window,
                    "Decrypt window (default: the newest master's)");
    sub->add_option("--ratchet", a->ratchet,
                    "How long one ratchet link serves (default: the newest "
                    "master's)");
    out.push_back({sub, [a] { return RunRotate(*a); }});
  }
  {
    auto a = std::make_shared<MasterArgs>();
    CLI::App *sub = app.add_subcommand(
        "retire", "Retire a master now: its tickets stop being accepted");
    sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
    sub->add_option("--id", a->id, "Store id of the master (16 hex digits)")
        ->required();
    out.push_back({sub, [a] { return RunRetire(*a); }});
  }
  {
    auto a = std::make_shared<MasterArgs>();
    CLI::App *sub = app.add_subcommand(
        "destroy", "Destroy a master and its policy, or a legacy key");
    sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
    sub->add_option("--id", a->id,
                    "Store id (16 hex digits) or legacy key name (32)")
        ->required();
    sub->add_flag("--yes", a->yes, "Confirm: this cannot be undone");
    sub->add_flag("--force", a->force, "Allow destroying the active master");
    out.push_back({sub, [a] { return RunDestroy(*a); }});
  }
}

}  // namespace hsmstek::cli
