// `hsmstek status`: masters (with states and check values) and legacy keys
// of one store, as a table or as one JSON object.
#include <algorithm>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cli/common.h"
#include "keystore/duration.h"
#include "keystore/master.h"
#include "keystore/store_set.h"
#include "keystore/time_format.h"
#include "pkcs11/object.h"

namespace hsmstek::cli {
namespace {

using keystore::FormatDuration;
using keystore::FormatRfc3339;

struct StatusArgs {
  std::string uri;
  bool json = false;
  // More tokens of the same store (--token): verified against the first.
  std::vector<std::string> more_tokens;
};

// Labels of the stores present in the token (for a helpful "not found").
std::string LabelsPresent(keystore::KeyStore &store) {
  Result<p11::Session> session = store.token()->Acquire();
  if (!session.ok()) return "";
  std::set<std::string> labels;
  for (const char *app :
       {keystore::kPolicyApplication, keystore::kLegacyApplication}) {
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_DATA).String(CKA_APPLICATION, app);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*session, t);
    if (!found.ok()) return "";
    for (CK_OBJECT_HANDLE h : *found) {
      Result<Bytes> label = p11::ReadAttribute(*session, h, CKA_LABEL);
      if (label.ok()) labels.emplace(label->begin(), label->end());
    }
  }
  if (labels.empty()) return "the token holds no stores";
  std::string out = "stores present: ";
  bool first = true;
  for (const std::string &l : labels) {
    out += (first ? "" : ", ") + Quote(l);
    first = false;
  }
  return out;
}

// "spent": every ratchet link destroyed (its tickets can never be opened
// again, here or by whoever later holds the token); the policy object is
// all that is left.
std::string StateName(const keystore::MasterInfo &m) {
  if (m.links.empty() && m.state == keystore::KeyState::kRetired) {
    return "spent";
  }
  return std::string(keystore::KeyStateName(m.state));
}

// "3-5" for links 3, 4 and 5; "2,5" when not contiguous; "-" for none.
std::string LinkRange(const std::vector<uint64_t> &links) {
  if (links.empty()) return "-";
  if (links.back() - links.front() + 1 == links.size()) {
    return links.size() == 1 ? std::to_string(links.front())
                             : std::to_string(links.front()) + "-" +
                                   std::to_string(links.back());
  }
  std::string out;
  for (uint64_t j : links) {
    out += (out.empty() ? "" : ",") + std::to_string(j);
  }
  return out;
}

void PrintTable(const keystore::StoreSnapshot &snap, const std::string &token,
                const std::vector<std::string> &checks) {
  std::cout << "store " << Quote(snap.label) << " in token " << Quote(token)
            << " at " << FormatRfc3339(snap.now) << "\n\n";
  const char *kHeader[] = {
      "LABEL",  "STORE ID", "STATE",   "ACTIVATION",   "PERIOD",
      "WINDOW", "CHECK",    "EPOCH",   "KEY NAME NOW", "NEXT ROTATION",
      "LINK",   "LINKS",    "HORIZON", "NOTES"};
  std::vector<std::vector<std::string>> rows;
  rows.emplace_back(std::begin(kHeader), std::end(kHeader));
  for (size_t i = 0; i < snap.masters.size(); ++i) {
    const keystore::MasterInfo &m = snap.masters[i];
    std::string notes;
    if (m.policy.replicable) notes += "replicable";
    if (m.policy.retire_at) {
      notes += std::string(notes.empty() ? "" : ", ") + "retire-at " +
               FormatRfc3339(*m.policy.retire_at);
    }
    rows.push_back(
        {snap.label, HexEncode(m.id), StateName(m),
         FormatRfc3339(m.policy.not_before), FormatDuration(m.policy.period_s),
         FormatDuration(m.policy.decrypt_window_s), checks[i],
         std::to_string(m.current_epoch), HexEncode(m.current_name.bytes),
         FormatRfc3339(m.next_rotation),
         m.current_link ? std::to_string(*m.current_link) : "-",
         LinkRange(m.links), m.horizon ? FormatRfc3339(*m.horizon) : "-",
         notes});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto &r : rows) {
    for (size_t c = 0; c < r.size(); ++c) {
      width[c] = std::max(width[c], r[c].size());
    }
  }
  for (const auto &r : rows) {
    std::string line;
    for (size_t c = 0; c < r.size(); ++c) {
      line += r[c];
      if (c + 1 < r.size())
        line += std::string(width[c] - r[c].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::cout << line << "\n";
  }
  if (snap.masters.empty()) std::cout << "(no masters)\n";
  std::cout << "\nlegacy keys (decrypt only):\n";
  if (snap.legacy.empty()) std::cout << "  (none)\n";
  for (const keystore::LegacyInfo &l : snap.legacy) {
    std::cout << "  " << HexEncode(l.name.bytes) << "  " << std::left
              << std::setw(8) << l.format << "AES-" << l.aes_key_bytes * 8
              << "  expires " << FormatRfc3339(l.expires)
              << (l.expires <= snap.now ? " (expired)" : "") << "\n";
  }
}

// CKA_LOCAL of a master: after a PIN compromise, every master from
// outside is suspect (docs/SECURITY.md 2.3).
std::string OriginName(const keystore::Protections &p) {
  if (!p.generated_in_token) return "unknown";
  return *p.generated_in_token
             ? "generated in the token"
             : "from outside the token (imported, or created by a PIN holder)";
}

std::string OriginJson(const keystore::Protections &p) {
  if (!p.generated_in_token) return "unknown";
  return *p.generated_in_token ? "generated" : "outside";
}

// The key protections section of the table (docs/SECURITY.md, "Key
// attributes"): what each key carries beyond the docs/FORMAT.md flags, and what
// the token refused.
void PrintProtections(const keystore::StoreSnapshot &snap,
                      keystore::Protection derived) {
  using keystore::ProtectionName;
  std::cout << "\nkey protections (CKA_ALLOWED_MECHANISMS, "
               "CKA_DERIVE_TEMPLATE):\n";
  for (const keystore::MasterInfo &m : snap.masters) {
    std::cout << "  master " << HexEncode(m.id) << "  allowed-mechanisms "
              << ProtectionName(m.protections.allowed_mechanisms)
              << ", derive-template "
              << ProtectionName(m.protections.derive_template) << ", origin "
              << OriginName(m.protections) << "\n";
  }
  std::cout << "  derived epoch keys  allowed-mechanisms "
            << ProtectionName(derived) << "\n";
  for (const keystore::LegacyInfo &l : snap.legacy) {
    std::cout << "  legacy " << HexEncode(l.name.bytes)
              << "  allowed-mechanisms "
              << ProtectionName(l.protections.allowed_mechanisms) << "\n";
  }
  if (snap.skipped.empty()) return;
  std::cout << "\nleft out (not serving; the rest of the store serves):\n";
  for (const keystore::SkippedObject &o : snap.skipped) {
    std::cout << "  " << o.what << ": " << o.reason << "\n";
  }
}

std::string ProtectionJson(keystore::Protection p) {
  switch (p) {
    case keystore::Protection::kApplied:
      return "applied";
    case keystore::Protection::kAbsent:
      return "absent";
    case keystore::Protection::kUnsupported:
      return "unsupported";
    case keystore::Protection::kNotApplicable:
    default:
      return "n/a";
  }
}

nlohmann::json ProtectionsJson(const keystore::Protections &p) {
  return {{"allowed_mechanisms", ProtectionJson(p.allowed_mechanisms)},
          {"derive_template", ProtectionJson(p.derive_template)}};
}

nlohmann::json ToJson(const keystore::StoreSnapshot &snap,
                      const std::string &token,
                      const std::vector<std::string> &checks,
                      keystore::Protection derived) {
  nlohmann::json stores = nlohmann::json::array();
  for (size_t i = 0; i < snap.masters.size(); ++i) {
    const keystore::MasterInfo &m = snap.masters[i];
    nlohmann::json s = {
        {"label", snap.label},
        {"id", HexEncode(m.id)},
        {"state", StateName(m)},
        {"check", checks[i]},
        {"period_s", m.policy.period_s},
        {"decrypt_window_s", m.policy.decrypt_window_s},
        {"activation", FormatRfc3339(m.policy.not_before)},
        {"current_key_name", HexEncode(m.current_name.bytes)},
        {"ratchet_periods", m.ratchet_periods},
        {"ratchet_s",
         static_cast<int64_t>(m.ratchet_periods) * m.policy.period_s},
        {"links", m.links},
        {"epoch", m.current_epoch},
        {"next_rotation", FormatRfc3339(m.next_rotation)},
        {"replicable", m.policy.replicable},
        {"created", FormatRfc3339(m.policy.created_at)},
        {"protections", ProtectionsJson(m.protections)},
        {"origin", OriginJson(m.protections)},
    };
    s["current_link"] = m.current_link ? nlohmann::json(*m.current_link)
                                       : nlohmann::json(nullptr);
    s["forward_secrecy_horizon"] =
        m.horizon ? nlohmann::json(FormatRfc3339(*m.horizon))
                  : nlohmann::json(nullptr);
    s["retire_at"] = m.policy.retire_at
                         ? nlohmann::json(FormatRfc3339(*m.policy.retire_at))
                         : nlohmann::json(nullptr);
    s["superseded_at"] = m.superseded_at
                             ? nlohmann::json(FormatRfc3339(*m.superseded_at))
                             : nlohmann::json(nullptr);
    stores.push_back(std::move(s));
  }
  nlohmann::json legacy = nlohmann::json::array();
  for (const keystore::LegacyInfo &l : snap.legacy) {
    legacy.push_back({{"name", HexEncode(l.name.bytes)},
                      {"expires", FormatRfc3339(l.expires)},
                      {"format", l.format},
                      {"aes_bits", l.aes_key_bytes * 8},
                      {"expired", l.expires <= snap.now},
                      {"protections", ProtectionsJson(l.protections)}});
  }
  nlohmann::json skipped = nlohmann::json::array();
  for (const keystore::SkippedObject &o : snap.skipped) {
    skipped.push_back({{"object", o.what}, {"reason", o.reason}});
  }
  return {{"label", snap.label},
          {"token", token},
          {"now", FormatRfc3339(snap.now)},
          {"stores", std::move(stores)},
          {"legacy", std::move(legacy)},
          {"derived_protections",
           {{"allowed_mechanisms", ProtectionJson(derived)}}},
          {"skipped", std::move(skipped)}};
}

Status RunStatus(const StatusArgs &a) {
  Result<std::shared_ptr<keystore::KeyStore>> store = OpenStore(a.uri, false);
  if (!store.ok()) return store.status();
  // One maintenance pass first: the ratchet catches up and destroys links
  // no acceptable epoch uses (idempotent; servers do the same).
  Status loaded = (*store)->Load();
  if (!loaded.ok()) return loaded;
  Result<keystore::StoreSnapshot> snap = (*store)->Describe();
  if (!snap.ok()) return snap.status();
  const std::string token = (*store)->token()->label();
  if (snap->masters.empty() && snap->legacy.empty() && snap->skipped.empty()) {
    return NotFound(
        "no store " + Quote((*store)->label()) + " in token " + Quote(token) +
        ": no master or legacy key has that label; " + LabelsPresent(**store));
  }
  std::vector<std::string> checks;
  for (const keystore::MasterInfo &m : snap->masters) {
    if (m.links.empty()) {  // spent: nothing left to compute it from
      checks.push_back("-");
      continue;
    }
    Result<std::array<uint8_t, keystore::kCheckValueSize>> check =
        (*store)->CheckValue(m.id);
    if (!check.ok()) {
      return check.status().WithContext("check value of " + HexEncode(m.id));
    }
    checks.push_back(HexEncode(*check));
  }
  // After the check values: deriving them showed what derived keys get.
  const keystore::Protection derived = (*store)->derived_allowed_mechanisms();
  // Every token of the store: health as this process sees it, and whether
  // the others hold the same masters (keystore/store_set.h).
  std::vector<std::shared_ptr<keystore::KeyStore>> members{*store};
  for (const std::string &uri : a.more_tokens) {
    Result<std::shared_ptr<keystore::KeyStore>> more = OpenStore(uri, false);
    if (!more.ok()) return more.status();
    members.push_back(std::move(*more));
  }
  Result<std::shared_ptr<keystore::StoreSet>> set =
      keystore::StoreSet::Of(std::move(members));
  if (!set.ok()) return set.status();
  const Status verified = (*set)->Load();
  if (a.json) {
    nlohmann::json out = ToJson(*snap, token, checks, derived);
    nlohmann::json tokens = nlohmann::json::array();
    for (size_t i = 0; i < (*set)->size(); ++i) {
      const keystore::MemberHealth h = (*set)->Health(i);
      tokens.push_back(
          {{"token", h.token},
           {"up", h.health.up},
           {"verified", h.verified},
           {"last_error", h.health.last_error},
           {"seconds_since_success",
            h.health.since_success_ms < 0
                ? nlohmann::json(nullptr)
                : nlohmann::json(h.health.since_success_ms / 1000.0)},
           {"failovers", h.failovers}});
    }
    out["tokens"] = std::move(tokens);
    out["tokens_error"] = verified.ok() ? nlohmann::json(nullptr)
                                        : nlohmann::json(verified.message());
    std::cout << out.dump() << "\n";
  } else {
    PrintTable(*snap, token, checks);
    PrintProtections(*snap, derived);
    if (!verified.ok()) std::cout << "tokens: " << verified.message() << "\n";
  }
  // A token with other masters fails the command (after printing).
  return verified;
}

}  // namespace

void RegisterStatus(CLI::App &app, std::vector<Command> &out) {
  auto a = std::make_shared<StatusArgs>();
  CLI::App *sub = app.add_subcommand(
      "status", "Show the masters and legacy keys of a store");
  sub->add_option("uri", a->uri, "Store URI (object=<label>)")->required();
  sub->add_flag("--json", a->json, "Print one JSON object instead of a table");
  sub->add_option("--token", a->more_tokens,
                  "Another token of the store (URI, same object=); checked "
                  "to hold the same masters (repeatable)");
  out.push_back({sub, [a] { return RunStatus(*a); }});
}

}  // namespace hsmstek::cli
