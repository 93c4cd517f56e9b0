// Opaque key names (version 2) and the forward-secure ratchet against real
// SoftHSM tokens: the vectors of tests/vectors/key_names.json and
// ratchet.json reproduced inside the token, the name table, links derived
// ahead and destroyed behind on a fake clock, the skew grace at the old end
// of the window, and tokens at different links serving the same tickets.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "common/log.h"
#include "keystore/derivation.h"
#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "pkcs11/object.h"
#include "softhsm.h"

namespace hsmstek::keystore {
namespace {

using testing::SoftHsm;

nlohmann::json Load(const char *file) {
  std::ifstream in(std::string(HSMSTEK_VECTOR_DIR) + "/" + file);
  return nlohmann::json::parse(in);
}

Bytes Hex(const std::string &s) { return *HexDecode(s); }

constexpr int64_t kHour = 3600;
constexpr int64_t kDay = 24 * kHour;
// The vectors' activation epoch (493000 hours).
constexpr int64_t kVectorStart = 493000 * kHour;

Policy MakePolicy(int64_t not_before, int64_t window_s, int64_t ratchet_s) {
  Policy p;
  p.period_s = kHour;
  p.decrypt_window_s = window_s;
  p.not_before = not_before;
  p.created_at = not_before;
  p.ratchet_s = ratchet_s;
  return p;
}

StoreId VectorStoreId() {
  Bytes id = Hex(Load("derivation.json")["store_id_hex"]);
  StoreId out{};
  std::copy(id.begin(), id.end(), out.begin());
  return out;
}

// A ticket as the callback seals it: name, IV, ciphertext, tag.
struct Ticket {
  KeyName name;
  Bytes iv, ct, tag;
};

class RatchetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Maintenance reports its errors through the log: show them.
    log::SetSink(
        [](int, const char *msg, void *) { fprintf(stderr, "log: %s\n", msg); },
        nullptr);
    for (const char *t : {"rt-a", "rt-b", "rt-c"}) {
      SoftHsm::Get().CreateToken(t);
    }
  }

  std::shared_ptr<KeyStore> OpenStore(const std::string &token,
                                      const std::string &label) {
    StoreOptions options;
    options.clock = &clock_;
    options.steady_clock = &clock_;
    options.background_maintenance = false;
    options.clock_skew_s = 60;
    options.token.backoff_initial = std::chrono::milliseconds(0);
    Result<std::shared_ptr<KeyStore>> store =
        KeyStore::Open(SoftHsm::Get().Uri(token, label), options);
    EXPECT_TRUE(store.ok()) << store.status().message();
    return *store;
  }

  // Creates a derive-only key of known value (a TEST value) with CKA_ID
  // `id` (8 bytes: a master; 16: a ratchet link) and, when `policy` is
  // given, the policy object of `store_id`.
  static void ImportKey(KeyStore &store, const Bytes &value, const Bytes &id,
                        const StoreId &store_id, const Policy *policy) {
    Result<p11::Session> session = store.token()->Acquire();
    ASSERT_TRUE(session.ok()) << session.status().message();
    p11::Template base = MasterTemplate(store.label(), store_id, false, true);
    p11::Template t;
    for (const CK_ATTRIBUTE &a : base.attributes()) {
      if (a.type == CKA_ID) continue;
      t.Data(a.type,
             ByteSpan(static_cast<const uint8_t *>(a.pValue), a.ulValueLen));
    }
    t.Data(CKA_ID, id);
    t.Data(CKA_VALUE, value);
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(P11_CALL(*session, C_CreateObject, session->handle(), t.data(),
                         t.size(), &h)
                    .ok());
    if (policy == nullptr) return;
    Result<CK_OBJECT_HANDLE> po =
        StorePolicyObject(*session, store.label(), store_id, *policy);
    ASSERT_TRUE(po.ok()) << po.status().message();
  }

  static void ImportVectorMaster(KeyStore &store, const Policy &policy) {
    const StoreId id = VectorStoreId();
    ImportKey(store, Hex(Load("derivation.json")["master_key_hex"]),
              Bytes(id.begin(), id.end()), id, &policy);
  }

  static StoreId Provision(KeyStore &store, const Policy &policy) {
    Result<p11::Session> session = store.token()->Acquire();
    EXPECT_TRUE(session.ok());
    Result<StoreId> id = CreateMaster(*session, store.label(), policy);
    EXPECT_TRUE(id.ok()) << id.status().message();
    return *id;
  }

  // Link objects of `id` with index `index` in the token.
  static size_t CountLinkObjects(KeyStore &store, const StoreId &id,
                                 uint64_t index) {
    Result<p11::Session> s = store.token()->Acquire();
    EXPECT_TRUE(s.ok());
    p11::Template find;
    find.Ulong(CKA_CLASS, CKO_SECRET_KEY).String(CKA_LABEL, store.label());
    if (index == 0) {
      find.Data(CKA_ID, id);
    } else {
      find.Data(CKA_ID, MakeLinkId(id, index));
    }
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*s, find);
    EXPECT_TRUE(found.ok());
    return found.ok() ? found->size() : 0;
  }

  static Ticket Seal(KeyStore &store, const TicketKeys &keys, ByteSpan iv,
                     ByteSpan plaintext) {
    Result<p11::Session> s = store.token()->Acquire();
    EXPECT_TRUE(s.ok());
    CK_MECHANISM cbc{CKM_AES_CBC_PAD, const_cast<uint8_t *>(iv.data()),
                     static_cast<CK_ULONG>(iv.size())};
    Bytes ct(plaintext.size() + 16);
    CK_ULONG ct_len = ct.size();
    EXPECT_TRUE(P11_CALL(*s, C_EncryptInit, s->handle(), &cbc, keys.aes).ok());
    EXPECT_TRUE(P11_CALL(*s, C_Encrypt, s->handle(),
                         const_cast<uint8_t *>(plaintext.data()),
                         plaintext.size(), ct.data(), &ct_len)
                    .ok());
    ct.resize(ct_len);
    Bytes macced(keys.name.bytes.begin(), keys.name.bytes.end());
    macced.insert(macced.end(), iv.begin(), iv.end());
    macced.insert(macced.end(), ct.begin(), ct.end());
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    Bytes tag(32);
    CK_ULONG tag_len = 32;
    EXPECT_TRUE(P11_CALL(*s, C_SignInit, s->handle(), &mac, keys.hmac).ok());
    EXPECT_TRUE(P11_CALL(*s, C_Sign, s->handle(), macced.data(), macced.size(),
                         tag.data(), &tag_len)
                    .ok());
    return Ticket{keys.name, Bytes(iv.begin(), iv.end()), ct, tag};
  }

  // Issues a ticket now (encrypt path), sealing a fixed plaintext.
  static Ticket Issue(KeyStore &store) {
    Result<TicketKeys> keys = store.KeysForEncrypt();
    EXPECT_TRUE(keys.ok()) << keys.status().message();
    if (!keys.ok()) return {};
    static const Bytes kIv(16, 0xa5);
    static const std::string kText = "ratchet test session";
    return Seal(store, *keys, kIv,
                ByteSpan(reinterpret_cast<const uint8_t *>(kText.data()),
                         kText.size()));
  }

  // Whether `store` opens `t`: the name is accepted and the token verifies
  // the tag under the keys it returns.
  static bool Opens(KeyStore &store, const Ticket &t) {
    DecryptLookup l = store.KeysForDecrypt(t.name);
    if (l.verdict != DecryptVerdict::kCurrent &&
        l.verdict != DecryptVerdict::kOld) {
      return false;
    }
    Result<p11::Session> s = store.token()->Acquire();
    EXPECT_TRUE(s.ok());
    Bytes macced(t.name.bytes.begin(), t.name.bytes.end());
    macced.insert(macced.end(), t.iv.begin(), t.iv.end());
    macced.insert(macced.end(), t.ct.begin(), t.ct.end());
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    EXPECT_TRUE(
        P11_CALL(*s, C_VerifyInit, s->handle(), &mac, l.keys.hmac).ok());
    return P11_CALL(*s, C_Verify, s->handle(), macced.data(), macced.size(),
                    const_cast<uint8_t *>(t.tag.data()), t.tag.size())
        .ok();
  }

  FakeClock clock_{kVectorStart + 17};
};

TEST_F(RatchetTest, KeyNameVectorsInsideTheToken) {
  nlohmann::json v = Load("key_names.json");
  clock_.Set(kVectorStart + 17);
  auto store = OpenStore("rt-a", "names-kat");
  ImportVectorMaster(*store, MakePolicy(kVectorStart, kDay, 0));
  store->Maintain();

  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  EXPECT_EQ(HexEncode(keys->name.bytes), v["key_name_hex"]);
  Result<KeyName> next =
      store->NameOf(VectorStoreId(), v["epoch"].get<uint64_t>() + 1);
  ASSERT_TRUE(next.ok()) << next.status().message();
  EXPECT_EQ(HexEncode(next->bytes), v["key_name_next_epoch_hex"]);
  EXPECT_EQ(HexEncode(NameInput(v["epoch"])), v["name_input_hex"]);
  EXPECT_EQ(HexEncode(DerivationData(kPurposeName, kNameKeyEpoch)),
            v["derive_data_N_hex"]);

  Bytes iv = Hex(v["ticket_iv_hex"]);
  std::string pt = Load("derivation.json")["ticket_plaintext_ascii"];
  Ticket t =
      Seal(*store, *keys, iv,
           ByteSpan(reinterpret_cast<const uint8_t *>(pt.data()), pt.size()));
  EXPECT_EQ(HexEncode(t.ct), v["ticket_ciphertext_hex"]);
  EXPECT_EQ(HexEncode(t.tag), v["ticket_hmac_hex"]);
  Bytes ticket(t.name.bytes.begin(), t.name.bytes.end());
  for (const Bytes *b : {&t.iv, &t.ct, &t.tag}) {
    ticket.insert(ticket.end(), b->begin(), b->end());
  }
  EXPECT_EQ(HexEncode(ticket), v["ticket_hex"]);
  EXPECT_TRUE(Opens(*store, t));
}

TEST_F(RatchetTest, RatchetVectorsInsideTheToken) {
  nlohmann::json v = Load("ratchet.json");
  ASSERT_EQ(v["activation_epoch"].get<int64_t>() * kHour, kVectorStart);
  EXPECT_EQ(HexEncode(DerivationData(kPurposeRatchet, 1)),
            v["derive_data_R1_hex"]);
  auto store = OpenStore("rt-a", "ratchet-kat");
  ImportVectorMaster(*store, MakePolicy(kVectorStart, kDay,
                                        v["ratchet_periods"].get<int64_t>() *
                                            v["period_s"].get<int64_t>()));
  clock_.Set(v["epoch"].get<int64_t>() * kHour + 5);
  store->Maintain();
  EXPECT_EQ(CountLinkObjects(*store, VectorStoreId(), 1), 1u);
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  EXPECT_EQ(HexEncode(keys->name.bytes), v["key_name_hex"]);
  uint64_t link = 99;
  Result<std::array<uint8_t, kCheckValueSize>> check =
      store->CheckValue(VectorStoreId(), &link);
  ASSERT_TRUE(check.ok()) << check.status().message();
  EXPECT_EQ(link, v["link_index"].get<uint64_t>());
  EXPECT_EQ(HexEncode(*check), v["link_check_value_hex"]);
}

// Two tokens holding the chain at different links (one got link 1 only, as
// a new fleet member does) issue and open the same tickets.
TEST_F(RatchetTest, TokensAtDifferentLinksServeTheSameTickets) {
  nlohmann::json v = Load("ratchet.json");
  const Policy policy = MakePolicy(kVectorStart, kDay, kDay);
  auto a = OpenStore("rt-a", "two-links");
  ImportVectorMaster(*a, policy);
  auto b = OpenStore("rt-b", "two-links");
  const StoreId id = VectorStoreId();
  const LinkId link1 = MakeLinkId(id, 1);
  ImportKey(*b, Hex(v["link_1_key_hex_reference_only"]),
            Bytes(link1.begin(), link1.end()), id, &policy);
  for (int64_t hour : {30, 47, 48, 60}) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    a->Maintain();
    b->Maintain();
    Ticket from_a = Issue(*a);
    Ticket from_b = Issue(*b);
    EXPECT_EQ(from_a.name, from_b.name) << "hour " << hour;
    EXPECT_EQ(from_a.tag, from_b.tag) << "hour " << hour;
    EXPECT_TRUE(Opens(*b, from_a)) << "hour " << hour;
    EXPECT_TRUE(Opens(*a, from_b)) << "hour " << hour;
  }
  EXPECT_EQ(HexEncode(a->NameOf(id, 493030)->bytes), v["key_name_hex"]);
}

// A PIN holder plants keys of known value under link ids: the next link
// before the store derives it, and a second object with link 0's id. The
// store never adopts them: it keeps deriving the real chain (the vectors),
// a fresh process picks the real link 0, and status lists the planted ones.
TEST_F(RatchetTest, PlantedLinksAreNeverAdopted) {
  nlohmann::json v = Load("ratchet.json");
  const int64_t ratchet_s =
      v["ratchet_periods"].get<int64_t>() * v["period_s"].get<int64_t>();
  clock_.Set(kVectorStart + 5 * kHour);
  auto store = OpenStore("rt-a", "planted");
  ImportVectorMaster(*store, MakePolicy(kVectorStart, kDay, ratchet_s));
  store->Maintain();
  const StoreId id = VectorStoreId();
  ASSERT_EQ(CountLinkObjects(*store, id, 1), 0u);
  const LinkId link1 = MakeLinkId(id, 1);
  ImportKey(*store, Bytes(32, 0x66), Bytes(link1.begin(), link1.end()), id,
            nullptr);
  ImportKey(*store, Bytes(32, 0x77), Bytes(id.begin(), id.end()), id, nullptr);
  clock_.Set(v["epoch"].get<int64_t>() * kHour + 5);
  for (int pass = 0; pass < 2; ++pass) store->Maintain();
  // The real link 1 was derived next to the planted one.
  EXPECT_EQ(CountLinkObjects(*store, id, 1), 2u);
  auto fresh = OpenStore("rt-a", "planted");
  for (KeyStore *s : {store.get(), fresh.get()}) {
    s->Maintain();
    Result<TicketKeys> keys = s->KeysForEncrypt();
    ASSERT_TRUE(keys.ok()) << keys.status().message();
    EXPECT_EQ(HexEncode(keys->name.bytes), v["key_name_hex"]);
    uint64_t link = 99;
    Result<std::array<uint8_t, kCheckValueSize>> check =
        s->CheckValue(id, &link);
    ASSERT_TRUE(check.ok()) << check.status().message();
    EXPECT_EQ(link, 1u);
    EXPECT_EQ(HexEncode(*check), v["link_check_value_hex"]);
    Result<StoreSnapshot> snap = s->Describe();
    ASSERT_TRUE(snap.ok());
    size_t planted = 0;
    for (const SkippedObject &o : snap->skipped) {
      if (o.reason.find("planted") != std::string::npos) ++planted;
    }
    EXPECT_GE(planted, 1u);
  }
}

// The policy text is a data object the user PIN may replace. A PIN holder
// who rewrites a non-replicable store's policy as replicable must not get
// wrappable links from the next ratchet step: a link is extractable only
// if the key it follows from is.
TEST_F(RatchetTest, AnEditedPolicyDoesNotMakeTheNextLinkExtractable) {
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-c", "no-wrap");
  const Policy honest = MakePolicy(kVectorStart, kDay, kHour);
  const StoreId id = Provision(*store, honest);
  store->Maintain();
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    p11::Template find;
    find.Ulong(CKA_CLASS, CKO_DATA)
        .String(CKA_LABEL, store->label())
        .Data(CKA_OBJECT_ID, id);
    Result<std::vector<CK_OBJECT_HANDLE>> policies = p11::FindObjects(*s, find);
    ASSERT_TRUE(policies.ok());
    ASSERT_EQ(policies->size(), 1u);
    ASSERT_TRUE(
        P11_CALL(*s, C_DestroyObject, s->handle(), policies->front()).ok());
    Policy forged = honest;
    forged.replicable = true;
    ASSERT_TRUE(StorePolicyObject(*s, store->label(), id, forged).ok());
  }
  ASSERT_TRUE(store->Load().ok());
  // Two ratchet steps: links 1 and 2 are derived under the forged policy.
  for (int64_t hour = 1; hour <= 2; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
  }
  Result<p11::Session> s = store->token()->Acquire();
  ASSERT_TRUE(s.ok());
  size_t links = 0;
  for (uint64_t j = 1; j <= 3; ++j) {
    const LinkId link = MakeLinkId(id, j);
    p11::Template find;
    find.Ulong(CKA_CLASS, CKO_SECRET_KEY)
        .String(CKA_LABEL, store->label())
        .Data(CKA_ID, link);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*s, find);
    ASSERT_TRUE(found.ok());
    for (CK_OBJECT_HANDLE h : *found) {
      ++links;
      Result<std::vector<std::optional<bool>>> extractable =
          p11::ReadBools(*s, h, std::array{CKA_EXTRACTABLE});
      ASSERT_TRUE(extractable.ok());
      EXPECT_EQ((*extractable)[0], std::optional<bool>(false)) << "link " << j;
    }
  }
  EXPECT_GE(links, 2u) << "the ratchet stopped instead";
}

// The first key of each kind a process creates tries the strongest
// templates first, and the token refuses some (SoftHSM 2.6: CKA_COPYABLE,
// CKA_DERIVE_TEMPLATE). A refused C_DeriveKey or C_GenerateKey must leave
// no object behind, or every server start would add junk to the token.
TEST_F(RatchetTest, RefusedTemplatesLeaveNoObjectsInTheToken) {
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-c", "junk");
  auto token_keys = [&]() -> size_t {
    Result<p11::Session> s = store->token()->Acquire();
    EXPECT_TRUE(s.ok());
    if (!s.ok()) return 0;
    p11::Template find;
    find.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bool(CKA_TOKEN, true);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*s, find);
    EXPECT_TRUE(found.ok());
    return found.ok() ? found->size() : 0;
  };
  const size_t before = token_keys();
  Provision(*store, MakePolicy(kVectorStart, kDay, kHour));
  for (int64_t hour = 0; hour <= 1; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
  }
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_GE(snap->masters[0].links.size(), 2u);
  EXPECT_EQ(token_keys() - before, snap->masters[0].links.size());
}

// A key planted at link index 2^64 - 1 would be the highest link: the
// chain would never derive again. It lies above a gap, so it is not used:
// the store keeps deriving the next links.
TEST_F(RatchetTest, APlantedTopIndexDoesNotFreezeTheChain) {
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-a", "top-index");
  const StoreId id = Provision(*store, MakePolicy(kVectorStart, kDay, kHour));
  store->Maintain();
  const LinkId top = MakeLinkId(id, UINT64_MAX);
  ImportKey(*store, Bytes(32, 0x55), Bytes(top.begin(), top.end()), id,
            nullptr);
  for (int64_t hour = 1; hour <= 3; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
    EXPECT_EQ(CountLinkObjects(*store, id, hour + 1), 1u) << "hour " << hour;
    Result<TicketKeys> keys = store->KeysForEncrypt();
    EXPECT_TRUE(keys.ok()) << keys.status().message();
  }
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].links.back(), 4u);
}

// Two servers (two stores) on one master issue the same names; the names
// change every epoch and never carry the store id.
TEST_F(RatchetTest, ServersShareOpaqueNamesThatChangeEveryEpoch) {
  clock_.Set(kVectorStart + 100);
  auto one = OpenStore("rt-a", "shared-names");
  const StoreId id = Provision(*one, MakePolicy(kVectorStart, kDay, 0));
  auto two = OpenStore("rt-a", "shared-names");
  std::vector<KeyName> seen;
  for (int hour = 0; hour < 5; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 100);
    one->Maintain();
    two->Maintain();
    Ticket t = Issue(*one);
    EXPECT_EQ(t.name, Issue(*two).name);
    EXPECT_TRUE(Opens(*two, t));
    const auto &b = t.name.bytes;
    EXPECT_EQ(std::search(b.begin(), b.end(), id.begin(), id.end()), b.end())
        << "the store id must not appear in " << HexEncode(b);
    EXPECT_NE(t.name, MakeKeyName(id, EpochAt(clock_.NowUnix(), kHour)));
    for (const KeyName &old : seen) EXPECT_NE(old, t.name);
    seen.push_back(t.name);
  }
  // At most window/period + 3 names (window, skew grace, current, next).
  EXPECT_LE(one->known_names(), static_cast<size_t>(kDay / kHour + 3));
}

// A name that is not in the table is refused with no derivation; a
// version-1 name of our own master is just as unknown.
TEST_F(RatchetTest, UnknownAndVersionOneNamesAreRefusedWithoutDerivation) {
  clock_.Set(kVectorStart + 100);
  auto store = OpenStore("rt-a", "unknown-name");
  const StoreId id = Provision(*store, MakePolicy(kVectorStart, kDay, 0));
  store->Maintain();
  const uint64_t derivations = store->derivations();
  KeyName random;
  random.bytes.fill(0x42);
  const uint64_t n = EpochAt(clock_.NowUnix(), kHour);
  for (const KeyName &name : {random, MakeKeyName(id, n)}) {
    EXPECT_EQ(store->KeysForDecrypt(name).verdict, DecryptVerdict::kUnknownKey);
  }
  EXPECT_EQ(store->derivations(), derivations);
}

// Across several ratchet intervals tickets keep resuming within the window;
// once window + interval have passed the old link is gone from the token,
// its tickets are refused and its epochs can no longer be derived.
TEST_F(RatchetTest, LinksAdvanceAndOldOnesAreDestroyed) {
  constexpr int64_t kWindow = 6 * kHour;
  constexpr int64_t kRatchet = 6 * kHour;
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-c", "advance");
  const StoreId id =
      Provision(*store, MakePolicy(kVectorStart, kWindow, kRatchet));
  std::vector<std::pair<int64_t, Ticket>> issued;
  for (int64_t hour = 0; hour < 30; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
    issued.emplace_back(clock_.NowUnix(), Issue(*store));
    for (const auto &[at, t] : issued) {
      // Within the window: resumes, whatever link sealed it.
      if (clock_.NowUnix() - at <= kWindow) {
        EXPECT_TRUE(Opens(*store, t))
            << "hour " << hour << ", issued at " << (at - kVectorStart) / kHour;
      } else if (clock_.NowUnix() - at > kWindow + kHour) {
        EXPECT_FALSE(Opens(*store, t));
      }
    }
    // The next link exists before its first epoch.
    const uint64_t j_next =
        static_cast<uint64_t>((hour + 1) * kHour / kRatchet);
    EXPECT_EQ(CountLinkObjects(*store, id, j_next), 1u) << "hour " << hour;
  }
  // Hour 29: acceptable epochs start at hour 23 (link 3): links 0..2 gone.
  for (uint64_t j : {0, 1, 2}) {
    EXPECT_EQ(CountLinkObjects(*store, id, j), 0u) << "link " << j;
  }
  EXPECT_EQ(CountLinkObjects(*store, id, 3), 1u);
  EXPECT_EQ(CountLinkObjects(*store, id, 4), 1u);
  EXPECT_EQ(CountLinkObjects(*store, id, 5), 1u);  // hour 30's, ahead
  // Old epochs cannot be derived any more: their link is gone.
  Result<KeyName> old = store->NameOf(id, 493000);
  EXPECT_EQ(old.status().code(), ErrorCode::kNotFound)
      << old.status().message();
  // Status shows the chain and the horizon.
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].current_link, std::optional<uint64_t>(4));
  EXPECT_EQ(snap->masters[0].links, (std::vector<uint64_t>{3, 4, 5}));
  EXPECT_EQ(snap->masters[0].horizon,
            std::optional<int64_t>(kVectorStart + 18 * kHour));
  EXPECT_EQ(snap->masters[0].current_name, Issue(*store).name);
  // Every key the store derives still works after reopening.
  auto reopened = OpenStore("rt-c", "advance");
  reopened->Maintain();
  EXPECT_TRUE(Opens(*reopened, issued.back().second));
}

// What status pages read without the token (KeyStore::forward_secrecy):
// set by the maintenance pass, equal to what Describe and CheckValue
// compute, and moving with the ratchet: the link and its check value step,
// the horizon moves forward once old links are destroyed.
TEST_F(RatchetTest, ForwardSecrecySnapshotFollowsTheRatchet) {
  constexpr int64_t kWindow = 6 * kHour;
  constexpr int64_t kRatchet = 6 * kHour;
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-c", "fs-view");
  const StoreId id =
      Provision(*store, MakePolicy(kVectorStart, kWindow, kRatchet));
  // Nothing before a maintenance pass: it is never computed on read.
  EXPECT_FALSE(store->forward_secrecy().has_value());
  std::optional<ForwardSecrecy> first;
  std::set<std::array<uint8_t, kCheckValueSize>> checks;
  for (int64_t hour = 0; hour < 20; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
    std::optional<ForwardSecrecy> fs = store->forward_secrecy();
    ASSERT_TRUE(fs.has_value()) << "hour " << hour;
    if (!first) first = fs;
    Result<StoreSnapshot> snap = store->Describe();
    ASSERT_TRUE(snap.ok());
    ASSERT_EQ(snap->masters.size(), 1u);
    const MasterInfo &m = snap->masters[0];
    EXPECT_EQ(fs->master, id);
    EXPECT_EQ(std::optional<uint64_t>(fs->current_link), m.current_link)
        << "hour " << hour;
    EXPECT_EQ(fs->current_link, static_cast<uint64_t>(hour * kHour / kRatchet));
    EXPECT_EQ(std::optional<int64_t>(fs->horizon), m.horizon)
        << "hour " << hour;
    EXPECT_EQ(fs->links_held, m.links.size());
    EXPECT_EQ(fs->as_of, clock_.NowUnix());
    uint64_t link = 0;
    Result<std::array<uint8_t, kCheckValueSize>> check =
        store->CheckValue(id, &link);
    ASSERT_TRUE(check.ok()) << check.status().message();
    EXPECT_EQ(link, fs->current_link);
    EXPECT_EQ(fs->check, *check) << "hour " << hour;
    checks.insert(fs->check);
  }
  // Hour 19: links 0..3 served; each had its own check value.
  std::optional<ForwardSecrecy> last = store->forward_secrecy();
  EXPECT_EQ(last->current_link, 3u);
  EXPECT_EQ(checks.size(), 4u);
  // Acceptable epochs start at hour 13 (link 2): the horizon moved from
  // activation to link 2's first epoch.
  EXPECT_EQ(first->horizon, kVectorStart);
  EXPECT_EQ(last->horizon, kVectorStart + 12 * kHour);
}

// The horizon is what the token can open, not what the active master
// serves: a superseded master's links open its tickets until they are
// destroyed, and a legacy key (no ratchet) opens tickets of any age.
TEST_F(RatchetTest, HorizonCountsEveryMasterAndLegacyKeys) {
  constexpr int64_t kWindow = 3 * kHour;
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-c", "fs-all");
  const StoreId old_id =
      Provision(*store, MakePolicy(kVectorStart, kWindow, kHour));
  // The successor takes over at hour 4; the old master's links stay for
  // its decrypt window (and the grace) after that.
  const StoreId new_id =
      Provision(*store, MakePolicy(kVectorStart + 4 * kHour, kWindow, kHour));
  for (int64_t hour = 0; hour <= 5; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
  }
  std::optional<ForwardSecrecy> fs = store->forward_secrecy();
  ASSERT_TRUE(fs.has_value());
  EXPECT_EQ(fs->master, new_id);
  EXPECT_EQ(fs->legacy_keys, 0u);
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  std::optional<int64_t> old_horizon, new_horizon;
  size_t new_links = 0;
  for (const MasterInfo &m : snap->masters) {
    (m.id == old_id ? old_horizon : new_horizon) = m.horizon;
    if (m.id == new_id) new_links = m.links.size();
  }
  ASSERT_TRUE(old_horizon.has_value()) << "the old master's links are gone";
  ASSERT_TRUE(new_horizon.has_value());
  ASSERT_LT(*old_horizon, *new_horizon);
  EXPECT_EQ(fs->horizon, *old_horizon);
  EXPECT_EQ(fs->links_held, new_links);

  // A legacy key: no horizon at all while it is in the token.
  std::vector<LegacyKey> keys(1);
  keys[0].name.fill(0x5a);
  keys[0].aes_key = SecretBuffer(32);
  keys[0].hmac_key = SecretBuffer(32);
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(ImportLegacyKeys(*s, store->label(), keys,
                                 clock_.NowUnix() + kDay, LegacyFormat::kNginx)
                    .ok());
  }
  ASSERT_TRUE(store->Load().ok());
  store->Maintain();
  fs = store->forward_secrecy();
  ASSERT_TRUE(fs.has_value());
  EXPECT_EQ(fs->horizon, 0);
  EXPECT_EQ(fs->legacy_keys, 1u);
}

// A server back after a long pause derives forward and forgets the past.
TEST_F(RatchetTest, RestartAfterALongPauseCatchesUp) {
  clock_.Set(kVectorStart + 10);
  auto first = OpenStore("rt-c", "pause");
  const StoreId id = Provision(*first, MakePolicy(kVectorStart, kDay, 0));
  first->Maintain();
  const Ticket before = Issue(*first);
  clock_.Set(kVectorStart + 10 * kDay + 10);
  auto later = OpenStore("rt-c", "pause");
  later->Maintain();
  EXPECT_GE(later->links_derived(), 10u);
  const Ticket now = Issue(*later);
  EXPECT_TRUE(Opens(*later, now));
  EXPECT_FALSE(Opens(*later, before));
  EXPECT_EQ(CountLinkObjects(*later, id, 10), 1u);
  // The token held links up to 1 only: a jump. Nothing is destroyed until
  // one ratchet interval of this process has passed, then one link per
  // interval.
  EXPECT_EQ(CountLinkObjects(*later, id, 0), 1u);
  EXPECT_EQ(later->links_destroyed(), 0u);
  clock_.Advance(kDay);
  later->Maintain();
  EXPECT_EQ(CountLinkObjects(*later, id, 0), 0u);
  EXPECT_EQ(CountLinkObjects(*later, id, 1), 1u);
  clock_.Advance(kHour);
  later->Maintain();
  EXPECT_EQ(CountLinkObjects(*later, id, 1), 1u);
  clock_.Advance(kDay);
  later->Maintain();
  EXPECT_EQ(CountLinkObjects(*later, id, 1), 0u);
}

// One store destroys a link another store (another server) still holds a
// handle of: the other meets CKR_KEY_HANDLE_INVALID when it derives from it,
// which is "gone" for a link, not a lost token: no reconnect, it keeps
// serving.
TEST_F(RatchetTest, ALinkDestroyedElsewhereIsGoneNotALostToken) {
  clock_.Set(kVectorStart + 10);
  auto a = OpenStore("rt-b", "vanish");
  (void)Provision(*a, MakePolicy(kVectorStart, 2 * kHour, kHour));
  a->set_clock_skew(0);
  a->Maintain();
  const Ticket t0 = Issue(*a);  // epoch 0: link 0
  for (int64_t hour : {1, 2}) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    a->Maintain();
  }
  clock_.Set(kVectorStart + 3 * kHour + 10);
  // b accepts epoch 0 one period longer (skew grace): it loads link 0.
  auto b = OpenStore("rt-b", "vanish");
  b->set_clock_skew(kHour);
  b->Maintain();
  const uint64_t generation = b->token()->generation();
  a->Maintain();  // a's window has left link 0: destroyed
  EXPECT_EQ(a->links_destroyed(), 1u);
  EXPECT_FALSE(Opens(*b, t0));  // b derives from its handle of link 0
  EXPECT_EQ(b->token()->generation(), generation);
  EXPECT_TRUE(Opens(*b, Issue(*a)));
  EXPECT_TRUE(Opens(*a, Issue(*b)));
  b->Maintain();
  EXPECT_EQ(b->token()->generation(), generation);
}

// A process whose clock is 30 days ahead (or `hsmstek status` run on such
// a host) maintains the token a normal server uses: it derives forward but
// destroys nothing the normal server needs, which keeps sealing and
// resuming.
TEST_F(RatchetTest, AClockFarAheadDestroysNothingTheFleetNeeds) {
  constexpr int64_t kWindow = 6 * kHour;
  clock_.Set(kVectorStart + 10 * kHour + 10);
  auto normal = OpenStore("rt-c", "far-ahead");
  const StoreId id =
      Provision(*normal, MakePolicy(kVectorStart, kWindow, kHour));
  normal->Maintain();
  const Ticket before = Issue(*normal);
  FakeClock ahead(clock_.NowUnix() + 30 * kDay);
  StoreOptions options = normal->options();
  options.clock = &ahead;
  options.steady_clock = &ahead;
  auto bad = *KeyStore::Open(SoftHsm::Get().Uri("rt-c", "far-ahead"),
                             std::move(options));
  ASSERT_TRUE(bad->Load().ok());
  for (int minute = 0; minute < 50; minute += 5) {
    ahead.Advance(5 * 60);
    clock_.Advance(5 * 60);
    bad->Maintain();
    normal->Maintain();
    EXPECT_TRUE(Opens(*normal, before)) << "minute " << minute;
    EXPECT_TRUE(Opens(*normal, Issue(*normal))) << "minute " << minute;
  }
  EXPECT_EQ(bad->links_destroyed(), 0u);
  EXPECT_GE(bad->links_derived(), 64u);
  // Links 4..11 (window, grace, current, next) are all still there.
  for (uint64_t j = 4; j <= 11; ++j) {
    EXPECT_EQ(CountLinkObjects(*normal, id, j), 1u) << "link " << j;
  }
}

// The old end of the window gets the clock-skew grace: a ticket at the last
// second of its advertised lifetime still resumes on a server whose clock
// is ahead by less than the tolerance.
TEST_F(RatchetTest, SkewGraceAtTheOldEndOfTheWindow) {
  clock_.Set(kVectorStart + 2 * kHour - 1);  // last second of an epoch
  auto store = OpenStore("rt-c", "grace");
  (void)Provision(*store, MakePolicy(kVectorStart, kDay, 0));
  store->Maintain();
  const Ticket t = Issue(*store);
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok());
  const int64_t lifetime = keys->decrypt_window_s;
  // Its last second, seen by a server 30 s ahead (tolerance 60 s).
  clock_.Set(kVectorStart + 2 * kHour - 1 + lifetime + 30);
  store->Maintain();
  EXPECT_TRUE(Opens(*store, t));
  // Without tolerance it is past the window.
  store->set_clock_skew(0);
  store->Maintain();
  EXPECT_FALSE(Opens(*store, t));
}

// Two processes ratcheting and destroying the same store at once leave
// exactly the links that should exist.
TEST_F(RatchetTest, TwoProcessesRatchetTheSameStore) {
  clock_.Set(kVectorStart + 10);
  const std::string label = "concurrent";
  StoreId id;
  {
    auto store = OpenStore("rt-b", label);
    id = Provision(*store, MakePolicy(kVectorStart, 2 * kHour, kHour));
  }
  std::vector<pid_t> children;
  for (int c = 0; c < 2; ++c) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      FakeClock clock(kVectorStart + 10);
      StoreOptions options;
      options.clock = &clock;
      options.steady_clock = &clock;
      options.background_maintenance = false;
      options.token.backoff_initial = std::chrono::milliseconds(0);
      Result<std::shared_ptr<KeyStore>> store =
          KeyStore::Open(SoftHsm::Get().Uri("rt-b", label), options);
      if (!store.ok()) _exit(2);
      // A load that meets an object the other process just destroyed
      // reads as a lost token (a reconnect: no ticket for that handshake,
      // fail-soft); it must stay the exception and recover.
      int steps = 0, failures = 0;
      for (int64_t minute = 0; minute < 12 * 60; minute += 7) {
        clock.Set(kVectorStart + minute * 60 + 10);
        (*store)->Maintain();
        ++steps;
        if (!(*store)->KeysForEncrypt().ok()) ++failures;
      }
      // Recovery: the store's back-offs run on its (fake) clock.
      bool last_ok = false;
      // (SoftHSM re-reading its token directory while the other process
      // writes it may briefly list no such token: retried.)
      for (int i = 0; i < 50 && !last_ok; ++i) {
        if (i > 0) usleep(20 * 1000);
        clock.Advance(5);
        (*store)->Maintain();
        Result<TicketKeys> keys = (*store)->KeysForEncrypt();
        last_ok = keys.ok();
        if (!last_ok) {
          fprintf(stderr, "child: %s\n", keys.status().message().c_str());
          // SoftHSM 2.6 sometimes re-initialises (after the reconnect a
          // vanished object causes) without the token the other process
          // is writing, and never lists it again in this process: an
          // environment failure, not the ratchet's (exit 5, tolerated for
          // one child; the token's links are checked below either way).
          if (keys.status().message().find("no token matches") !=
              std::string::npos) {
            _exit(5);
          }
        }
      }
      if (!last_ok) _exit(3);
      if (failures * 4 > steps) _exit(4);
      _exit(0);
    }
    children.push_back(pid);
  }
  int clean = 0;
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << status;
    EXPECT_TRUE(WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 5)
        << WEXITSTATUS(status);
    clean += WEXITSTATUS(status) == 0 ? 1 : 0;
  }
  EXPECT_GE(clean, 1);
  // The last pass ran at 11:54 (epoch 11): acceptable epochs 9..12 (window
  // 2 h, grace, next epoch), one link per hour: links 9..12 remain (a
  // duplicate of a live link may too: same value), none older.
  auto store = OpenStore("rt-b", label);
  for (uint64_t j = 0; j < 9; ++j) {
    EXPECT_EQ(CountLinkObjects(*store, id, j), 0u) << "link " << j;
  }
  for (uint64_t j = 9; j <= 12; ++j) {
    EXPECT_GE(CountLinkObjects(*store, id, j), 1u) << "link " << j;
  }
  EXPECT_EQ(CountLinkObjects(*store, id, 13), 0u);
  // Duplicates of a live link stay (same value; destroying "the other copy"
  // from two processes at once could destroy both and break the chain),
  // and go with their link: once the window has passed links 9..12, no
  // copy of them is left.
  for (int64_t hour = 12; hour <= 19; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
  }
  for (uint64_t j = 9; j <= 12; ++j) {
    EXPECT_EQ(CountLinkObjects(*store, id, j), 0u) << "link " << j;
  }
}

// A retired master keeps no standing key: once no acceptable epoch (window
// plus skew grace) uses it, every link goes, link 0 too; the policy object
// stays and status shows the master as spent. The same for a superseded
// master out of its window.
TEST_F(RatchetTest, RetiredAndSupersededMastersAreSpent) {
  constexpr int64_t kWindow = 3 * kHour;
  constexpr int64_t kGrace = 60;  // OpenStore's clock_skew_s
  clock_.Set(kVectorStart + 10);
  auto store = OpenStore("rt-c", "spent");
  Policy retiring = MakePolicy(kVectorStart, kWindow, kHour);
  const int64_t retire_at = kVectorStart + 5 * kHour + 30;
  retiring.retire_at = retire_at;
  const StoreId retired = Provision(*store, retiring);
  const StoreId superseded =
      Provision(*store, MakePolicy(kVectorStart - kHour, kWindow, kHour));
  auto links_of = [&](const StoreId &id) {
    size_t n = 0;
    for (uint64_t j = 0; j <= 12; ++j) n += CountLinkObjects(*store, id, j);
    return n;
  };
  for (int64_t hour = 0; hour <= 8; ++hour) {
    clock_.Set(kVectorStart + hour * kHour + 10);
    store->Maintain();
  }
  EXPECT_GE(links_of(retired), 1u);
  // The superseded one: spent once window and grace have passed.
  EXPECT_EQ(links_of(superseded), 0u);
  // The retired one: one second before its end, links remain (another
  // server may still accept its last tickets); at its end, none.
  clock_.Set(retire_at + kWindow + kGrace - 1);
  store->Maintain();
  EXPECT_GE(links_of(retired), 1u);
  clock_.Set(retire_at + kWindow + kGrace);
  store->Maintain();
  EXPECT_EQ(links_of(retired), 0u);
  EXPECT_EQ(CountLinkObjects(*store, retired, 0), 0u);
  // Idempotent, and the same from another process's view.
  store->Maintain();
  auto other = OpenStore("rt-c", "spent");
  other->Maintain();
  EXPECT_EQ(links_of(retired), 0u);
  Result<StoreSnapshot> snap = other->Describe();
  ASSERT_TRUE(snap.ok()) << snap.status().message();
  ASSERT_EQ(snap->masters.size(), 2u);
  for (const MasterInfo &m : snap->masters) {
    EXPECT_TRUE(m.links.empty());
    EXPECT_EQ(m.state, KeyState::kRetired);
  }
}

}  // namespace
}  // namespace hsmstek::keystore
