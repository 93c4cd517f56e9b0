#include "keystore/store_set.h"

#include <map>

#include "common/bytes.h"
#include "common/log.h"
#include "pkcs11/error.h"

namespace hsmstek::keystore {

namespace {

using CheckValues = std::map<StoreId, std::array<uint8_t, kCheckValueSize>>;

struct Masters {
  std::optional<StoreId> active;
  CheckValues check;
};

// Reads the masters of `store` and their check values (token round trips:
// one derivation per master; at load only).
Result<Masters> ReadMasters(KeyStore &store) {
  Result<StoreSnapshot> snap = store.Describe();
  if (!snap.ok()) return snap.status();
  Masters out;
  for (const MasterInfo &m : snap->masters) {
    if (m.state == KeyState::kRetired) continue;
    Result<std::array<uint8_t, kCheckValueSize>> cv = store.CheckValue(m.id);
    if (!cv.ok()) return cv.status();
    out.check[m.id] = *cv;
    if (m.state == KeyState::kActive) out.active = m.id;
  }
  return out;
}

std::string Hex(std::span<const uint8_t> b) {
  return HexEncode(ByteSpan(b.data(), b.size()));
}

}  // namespace

StoreSet::StoreSet(std::vector<std::shared_ptr<KeyStore>> stores)
    : members_(stores.size()),
      outage_("store " + QuoteForMessage(stores[0]->label())) {
  for (size_t i = 0; i < stores.size(); ++i) {
    members_[i].store = std::move(stores[i]);
  }
  // A single member needs no verification against anything.
  if (members_.size() == 1) members_[0].verified.store(true);
}

Result<std::shared_ptr<StoreSet>> StoreSet::Open(
    const std::vector<std::string> &uris, StoreOptions options) {
  if (uris.empty()) return InvalidArgument("a store needs at least one URI");
  std::vector<std::shared_ptr<KeyStore>> stores;
  for (const std::string &uri : uris) {
    Result<std::shared_ptr<KeyStore>> store = KeyStore::Open(uri, options);
    if (!store.ok()) return store.status();
    stores.push_back(std::move(*store));
  }
  return Of(std::move(stores));
}

Result<std::shared_ptr<StoreSet>> StoreSet::Of(
    std::vector<std::shared_ptr<KeyStore>> stores) {
  if (stores.empty())
    return InvalidArgument("a store needs at least one token");
  for (const std::shared_ptr<KeyStore> &s : stores) {
    if (s == nullptr) return InvalidArgument("StoreSet::Of: null store");
    if (s->label() != stores[0]->label()) {
      return InvalidArgument(
          "the tokens of one store must hold the same "
          "store label: " +
          QuoteForMessage(stores[0]->label()) + " vs " +
          QuoteForMessage(s->label()));
    }
  }
  return std::shared_ptr<StoreSet>(new StoreSet(std::move(stores)));
}

std::string StoreSet::Name(size_t i) const {
  const std::shared_ptr<p11::Token> &token = members_[i].store->token();
  std::string label = token->label();
  if (label.empty()) return "token #" + std::to_string(i + 1);
  return "token " + QuoteForMessage(label) + " (serial " +
         QuoteForMessage(token->serial()) + ")";
}

Status StoreSet::Load() {
  std::optional<size_t> reference;
  Masters expected;
  Status first_error;
  for (size_t i = 0; i < members_.size(); ++i) {
    KeyStore &store = *members_[i].store;
    Status loaded = store.Load();
    Result<Masters> masters =
        loaded.ok() ? ReadMasters(store) : Result<Masters>(loaded);
    if (!masters.ok()) {
      if (first_error.ok()) first_error = masters.status();
      if (members_.size() > 1) {
        log::Warning("hsmstek: store " + QuoteForMessage(store.label()) + ": " +
                     Name(i) +
                     " not verified, not used: " + masters.status().message());
      }
      continue;
    }
    if (!reference) {
      reference = i;
      expected = std::move(*masters);
      members_[i].verified.store(true);
      continue;
    }
    // Same active master, and every master both hold has the same value.
    auto differs = [&]() -> std::optional<std::string> {
      auto cv_of = [](const Masters &m) {
        return m.active ? Hex(m.check.at(*m.active)) : std::string("none");
      };
      if (expected.active != masters->active) {
        return cv_of(*masters) + " vs " + cv_of(expected);
      }
      for (const auto &[id, cv] : masters->check) {
        auto it = expected.check.find(id);
        if (it != expected.check.end() && it->second != cv) {
          return Hex(cv) + " vs " + Hex(it->second);
        }
      }
      return std::nullopt;
    }();
    if (differs) {
      return FailedPrecondition(
          "store " + QuoteForMessage(store.label()) + ": " + Name(i) +
          " holds different masters than " + Name(*reference) +
          " (active master check value " + *differs +
          "); refusing it: tokens of one store must be replicated with "
          "`hsmstek export` / `hsmstek import`");
    }
    members_[i].verified.store(true);
  }
  if (!reference) return first_error;
  // Start on the preferred verified member.
  active_.store(*reference);
  return Status::Ok();
}

bool StoreSet::Usable(size_t i) const {
  return members_[i].verified.load() && !members_[i].store->token()->failing();
}

bool StoreSet::Recovered(size_t i) const {
  const p11::Token &token = *members_[i].store->token();
  return members_[i].verified.load() && !token.failing() &&
         token.state() == p11::TokenState::kConnected;
}

bool StoreSet::MoveTo(size_t from, size_t to, bool failback) {
  size_t expected = from;
  if (!active_.compare_exchange_strong(expected, to)) return false;
  if (!failback) {
    members_[from].failovers.fetch_add(1);
    total_failovers_.fetch_add(1);
  }
  log::Warning("hsmstek: store " +
               QuoteForMessage(members_[from].store->label()) + ": " +
               (failback ? "failback from " : "failover from ") + Name(from) +
               " to " + Name(to));
  return true;
}

std::shared_ptr<KeyStore> StoreSet::Active() {
  size_t cur = active_.load(std::memory_order_relaxed);
  if (members_.size() == 1) return members_[0].store;
  for (size_t i = 0; i < cur; ++i) {
    if (Recovered(i)) {
      MoveTo(cur, i, /*failback=*/true);
      return members_[active_.load()].store;
    }
  }
  if (!members_[cur].store->token()->failing()) return members_[cur].store;
  for (size_t k = 1; k < members_.size(); ++k) {
    const size_t j = (cur + k) % members_.size();
    if (Usable(j)) {
      MoveTo(cur, j, /*failback=*/false);
      break;
    }
  }
  return members_[active_.load()].store;
}

void StoreSet::Served(const KeyStore &store, bool token_trouble,
                      std::string_view cause, bool seal) {
  const int64_t now = store.clock().NowUnix();
  if (!token_trouble) {
    outage_.Ok(now);
    return;
  }
  // A failover possible right now is not an outage of the store: only the
  // handshake that met the fault went without a ticket.
  if (members_.size() > 1 && Active().get() != &store &&
      Usable(active_.load())) {
    return;
  }
  outage_.Failed(now, cause, seal);
}

MemberHealth StoreSet::Health(size_t i) const {
  MemberHealth h;
  h.token = Name(i);
  h.verified = members_[i].verified.load();
  h.active = active_.load() == i;
  h.health = members_[i].store->token()->Health();
  h.failovers = members_[i].failovers.load();
  return h;
}

}  // namespace hsmstek::keystore
