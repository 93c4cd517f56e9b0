#include "keystore/store_set.h"

#include <algorithm>
#include <map>

#include "common/bytes.h"
#include "common/log.h"
#include "pkcs11/error.h"

namespace hsmstek::keystore {

namespace {

// Failback waits this long after the earlier member's token connected
// without a fault (and its view was read again in the background): a
// token that connects and then fails at once does not make the set flap.
constexpr int64_t kHoldDownMs = 5000;
// The background pass runs this often.
constexpr std::chrono::seconds kVerifyInterval{1};

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
  // The first member is the reference: verified by definition.
  members_[0].verified.store(true);
  if (members_.size() > 1) {
    verifier_ = std::make_unique<p11::Prober>(
        [this]() -> std::optional<p11::Prober::Clock::time_point> {
          VerifyNow();
          return p11::Prober::Clock::now() + kVerifyInterval;
        });
  }
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

StoreSet::Pin StoreSet::PinOf(const KeyStore &store) {
  return Pin{store.token()->generation(), store.reloads()};
}

Result<StoreSet::Content> StoreSet::ReadContent(KeyStore &store) {
  Result<StoreSnapshot> snap = store.Describe();
  if (!snap.ok()) return snap.status();
  Content out;
  for (const MasterInfo &m : snap->masters) {
    MasterView v;
    v.policy = m.policy;
    if (m.state != KeyState::kRetired) {
      Result<std::array<uint8_t, kCheckValueSize>> cv = store.CheckValue(m.id);
      if (!cv.ok()) return cv.status();
      v.check = *cv;
    }
    out.masters[m.id] = v;
    if (m.state == KeyState::kActive) out.active = m.id;
  }
  for (const LegacyInfo &l : snap->legacy) {
    out.legacy.emplace_back(l.name, l.expires);
  }
  std::sort(out.legacy.begin(), out.legacy.end(),
            [](const auto &a, const auto &b) {
              return a.first.bytes < b.first.bytes;
            });
  return out;
}

namespace {

// What differs between `got` and `want`, for the refusal message.
template <typename Content>
std::string Difference(const Content &got, const Content &want) {
  auto cv_of = [](const Content &c) {
    if (!c.active) return std::string("none");
    const auto &v = c.masters.at(*c.active);
    return v.check ? Hex(*v.check) : std::string("none");
  };
  if (got.active != want.active || cv_of(got) != cv_of(want)) {
    return "active master check value " + cv_of(got) + " vs " + cv_of(want);
  }
  for (const auto &[id, v] : got.masters) {
    auto it = want.masters.find(id);
    if (it == want.masters.end()) {
      return "a master the reference lacks (" +
             (v.check ? "check value " + Hex(*v.check)
                      : std::string("retired")) +
             ")";
    }
    if (v.check != it->second.check) {
      return "master check value " +
             (v.check ? Hex(*v.check) : std::string("retired")) + " vs " +
             (it->second.check ? Hex(*it->second.check)
                               : std::string("retired"));
    }
    if (!(v.policy == it->second.policy)) return "a master policy differs";
  }
  if (got.masters.size() != want.masters.size()) {
    return "it lacks a master of the reference";
  }
  return "legacy keys differ";
}

}  // namespace

Status StoreSet::RefreshReference() {
  KeyStore &primary = *members_[0].store;
  const Pin before = PinOf(primary);
  {
    std::lock_guard<std::mutex> lock(verify_mu_);
    if (reference_ && reference_pin_ == before) return Status::Ok();
  }
  Result<Content> content = ReadContent(primary);
  if (!content.ok()) return content.status();
  const Pin after = PinOf(primary);
  if (!(after == before) && after.generation != before.generation) {
    return Unavailable("the reference token reconnected meanwhile");
  }
  std::lock_guard<std::mutex> lock(verify_mu_);
  if (!reference_ || !(*reference_ == *content)) {
    reference_ = std::move(*content);
    reference_version_.fetch_add(1);
  }
  reference_pin_ = after;
  return Status::Ok();
}

bool StoreSet::Pinned(size_t i) const {
  if (i == 0) return true;
  const Member &m = members_[i];
  if (!m.verified.load()) return false;
  const Pin now = PinOf(*m.store);
  return m.pin_generation.load() == now.generation &&
         m.pin_reloads.load() == now.reloads &&
         m.pin_reference.load() == reference_version_.load();
}

Status StoreSet::VerifyMember(size_t i, bool log_refusal) {
  Member &m = members_[i];
  KeyStore &store = *m.store;
  if (reference_version_.load() == 0) {
    return Unavailable(
        "the first token of the store (the reference) has "
        "not answered yet");
  }
  const Pin before = PinOf(store);
  Result<Content> content = ReadContent(store);
  if (!content.ok()) return content.status();  // stays unpinned; retried
  const Pin after = PinOf(store);
  std::lock_guard<std::mutex> lock(verify_mu_);
  const std::string diff = *reference_ == *content
                               ? std::string()
                               : Difference(*content, *reference_);
  if (diff.empty()) {
    if (after.generation != before.generation) {
      return Unavailable("reconnected while verified");
    }
    m.pin_generation.store(after.generation);
    m.pin_reloads.store(after.reloads);
    m.pin_reference.store(reference_version_.load());
    m.verified.store(true);
    if (!m.last_refusal.empty()) {
      log::Warning("hsmstek: store " + QuoteForMessage(store.label()) + ": " +
                   Name(i) + " now holds the same masters as " + Name(0) +
                   "; using it again");
      m.last_refusal.clear();
    }
    return Status::Ok();
  }
  m.verified.store(false);
  Status refused = FailedPrecondition(
      "store " + QuoteForMessage(store.label()) + ": " + Name(i) +
      " holds different masters than " + Name(0) + " (" + diff +
      "); refusing it: tokens of one store must be replicated with "
      "`hsmstek export` / `hsmstek import`, and a new master imported to "
      "every token before it activates");
  if (log_refusal && refused.message() != m.last_refusal) {
    log::Warning("hsmstek: " + refused.message());
  }
  m.last_refusal = refused.message();
  return refused;
}

void StoreSet::VerifyNow() {
  if (members_.size() == 1) return;
  Status ref = RefreshReference();
  (void)ref;  // without a reference nothing is verified; retried next pass
  for (size_t i = 1; i < members_.size(); ++i) {
    if (Pinned(i)) continue;
    members_[i].verified.store(false);
    Status verified = VerifyMember(i, /*log_refusal=*/true);
    (void)verified;  // refusals are logged; other errors are retried
  }
}

Status StoreSet::Load() {
  Status first = members_[0].store->Load();
  if (first.ok()) first = RefreshReference();
  if (!first.ok() && members_.size() > 1) {
    log::Warning("hsmstek: store " +
                 QuoteForMessage(members_[0].store->label()) + ": " + Name(0) +
                 " (the reference) cannot be read, so no other token of the "
                 "store is used until it answers: " +
                 first.message());
  }
  Status refusal;
  for (size_t i = 1; i < members_.size(); ++i) {
    KeyStore &store = *members_[i].store;
    members_[i].verified.store(false);
    Status loaded = store.Load();
    if (!loaded.ok()) {
      log::Warning("hsmstek: store " + QuoteForMessage(store.label()) + ": " +
                   Name(i) +
                   " not verified yet, not used: " + loaded.message());
      continue;
    }
    if (!first.ok()) continue;
    Status verified = VerifyMember(i, /*log_refusal=*/false);
    if (verified.code() == ErrorCode::kFailedPrecondition && refusal.ok()) {
      refusal = verified;
    }
  }
  active_.store(0);
  EnsureVerifier();
  if (!first.ok()) return first;
  return refusal;
}

bool StoreSet::Usable(size_t i) const {
  return Pinned(i) && !members_[i].store->token()->failing();
}

bool StoreSet::Recovered(size_t i) const {
  const p11::Token &token = *members_[i].store->token();
  if (!Usable(i) || token.state() != p11::TokenState::kConnected) return false;
  if (token.connected_for_ms() < kHoldDownMs) return false;
  if (i != 0) return true;
  // The reference was read again (a real operation, in the background)
  // since it reconnected.
  std::unique_lock<std::mutex> lock(verify_mu_, std::try_to_lock);
  return lock.owns_lock() && reference_ &&
         reference_pin_.generation == token.generation();
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

void StoreSet::EnsureVerifier() {
  if (!verifier_) return;
  // Once per process: a forked child has no thread until it schedules.
  const uint64_t forks = atfork::ForkCount() + 1;
  if (verifier_for_.exchange(forks) == forks) return;
  (void)verifier_->Schedule(p11::Prober::Clock::now() + kVerifyInterval);
}

std::shared_ptr<KeyStore> StoreSet::Active() {
  size_t cur = active_.load(std::memory_order_relaxed);
  if (members_.size() == 1) return members_[0].store;
  if (verifier_for_.load(std::memory_order_relaxed) !=
      atfork::ForkCount() + 1) {
    EnsureVerifier();
  }
  for (size_t i = 0; i < cur; ++i) {
    if (Recovered(i)) {
      MoveTo(cur, i, /*failback=*/true);
      return members_[active_.load()].store;
    }
  }
  if (Usable(cur)) return members_[cur].store;
  for (size_t k = 1; k < members_.size(); ++k) {
    const size_t j = (cur + k) % members_.size();
    if (Usable(j)) {
      MoveTo(cur, j, /*failback=*/false);
      break;
    }
  }
  const size_t now = active_.load();
  // Never an unverified member: the reference (failing: no tickets) then.
  if (!Pinned(now)) return members_[0].store;
  return members_[now].store;
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
  h.verified = Pinned(i);
  h.active = active_.load() == i;
  h.health = members_[i].store->token()->Health();
  h.failovers = members_[i].failovers.load();
  return h;
}

}  // namespace hsmstek::keystore
