// The key store against real SoftHSM tokens: docs/FORMAT.md layout and vectors,
// key states on a fake clock, docs/FORMAT.md, "Accepting a ticket" verdicts,
// cache bound, recovery, legacy keys.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "keystore/derivation.h"
#include "keystore/provisioning.h"
#include "keystore/store.h"
#include "pkcs11/object.h"
#include "softhsm.h"

namespace hsmstek::keystore {
namespace {

using testing::SoftHsm;

nlohmann::json Vectors() {
  std::ifstream in(HSMSTEK_VECTORS);
  return nlohmann::json::parse(in);
}

Bytes Hex(const std::string &s) { return *HexDecode(s); }

constexpr int64_t kHour = 3600;
constexpr int64_t kDay = 24 * kHour;
// Activation of the vector master (epoch 493000): its link 0 serves the
// vectors' epoch.
constexpr int64_t kVectorStart = 493000 * kHour;
// An activation a month before the fixture's clock (30 ratchet links).
constexpr int64_t kLongAgo = kVectorStart - 30 * kDay;

Policy HourlyPolicy(int64_t not_before, bool replicable = false) {
  Policy p;
  p.period_s = kHour;
  p.decrypt_window_s = kDay;
  p.not_before = not_before;
  p.created_at = not_before;
  p.replicable = replicable;
  return p;
}

class KeyStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    for (const char *t : {"ks-a", "ks-b", "ks-c", "ks-d"}) {
      SoftHsm::Get().CreateToken(t);
    }
  }

  std::shared_ptr<KeyStore> OpenStore(const std::string &token,
                                      const std::string &label,
                                      bool read_write = true) {
    StoreOptions options;
    options.clock = &clock_;
    options.background_maintenance = false;
    options.token.read_write = read_write;
    options.token.backoff_initial = std::chrono::milliseconds(0);
    Result<std::shared_ptr<KeyStore>> store =
        KeyStore::Open(SoftHsm::Get().Uri(token, label), options);
    EXPECT_TRUE(store.ok()) << store.status().message();
    return *store;
  }

  // Imports the vector master (a TEST value) with the docs/FORMAT.md
  // attributes.
  static void ImportVectorMaster(KeyStore &store, const Policy &policy) {
    nlohmann::json v = Vectors();
    Bytes value = Hex(v["master_key_hex"]);
    Bytes id_bytes = Hex(v["store_id_hex"]);
    StoreId id;
    std::copy(id_bytes.begin(), id_bytes.end(), id.begin());
    Result<p11::Session> session = store.token()->Acquire();
    ASSERT_TRUE(session.ok()) << session.status().message();
    p11::Template t = MasterTemplate(store.label(), id, false, true);
    t.Data(CKA_VALUE, value);
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(P11_CALL(*session, C_CreateObject, session->handle(), t.data(),
                         t.size(), &h)
                    .ok());
    Result<CK_OBJECT_HANDLE> po =
        StorePolicyObject(*session, store.label(), id, policy);
    ASSERT_TRUE(po.ok()) << po.status().message();
  }

  static StoreId Provision(KeyStore &store, const Policy &policy) {
    Result<p11::Session> session = store.token()->Acquire();
    EXPECT_TRUE(session.ok());
    Result<StoreId> id = CreateMaster(*session, store.label(), policy);
    EXPECT_TRUE(id.ok()) << id.status().message();
    return *id;
  }

  // Encrypts and MACs like a ticket seal, inside the token.
  static std::pair<Bytes, Bytes> Seal(KeyStore &store, const TicketKeys &keys,
                                      ByteSpan iv, ByteSpan plaintext) {
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
    return {ct, tag};
  }

  static Bytes Decrypt(KeyStore &store, const TicketKeys &keys, ByteSpan iv,
                       ByteSpan ct) {
    Result<p11::Session> s = store.token()->Acquire();
    EXPECT_TRUE(s.ok());
    CK_MECHANISM cbc{CKM_AES_CBC_PAD, const_cast<uint8_t *>(iv.data()),
                     static_cast<CK_ULONG>(iv.size())};
    Bytes pt(ct.size());
    CK_ULONG pt_len = pt.size();
    EXPECT_TRUE(P11_CALL(*s, C_DecryptInit, s->handle(), &cbc, keys.aes).ok());
    Status st =
        P11_CALL(*s, C_Decrypt, s->handle(), const_cast<uint8_t *>(ct.data()),
                 ct.size(), pt.data(), &pt_len);
    EXPECT_TRUE(st.ok()) << st.message();
    pt.resize(pt_len);
    return pt;
  }

  // The version-2 name of `epoch` of master `id` (computed in the token
  // when not in the store's table).
  static KeyName NameFor(KeyStore &store, const StoreId &id, uint64_t epoch) {
    Result<KeyName> name = store.NameOf(id, epoch);
    EXPECT_TRUE(name.ok()) << name.status().message();
    return name.ok() ? *name : KeyName{};
  }

  FakeClock clock_{1774800017};
};

// Refused: expired, or (no longer in the name table) unknown; both mean a
// full handshake.
bool Refused(DecryptVerdict v) {
  return v == DecryptVerdict::kExpired || v == DecryptVerdict::kUnknownKey;
}

TEST_F(KeyStoreTest, KnownAnswerVectorsInsideTheToken) {
  nlohmann::json v = Vectors();
  clock_.Set(v["unix_time"]);
  auto store = OpenStore("ks-a", "kat");
  ImportVectorMaster(*store, HourlyPolicy(kVectorStart));
  ASSERT_TRUE(store->Load().ok());

  // The version-1 name, MAC and ticket of derivation.json are history: the
  // version-2 ones are checked in ratchet_test (key_names.json).
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok()) << keys.status().message();

  Bytes iv = Hex(v["ticket_iv_hex"]);
  std::string pt = v["ticket_plaintext_ascii"];
  auto [ct, tag] =
      Seal(*store, *keys, iv,
           ByteSpan(reinterpret_cast<const uint8_t *>(pt.data()), pt.size()));
  EXPECT_EQ(HexEncode(ct), v["ticket_ciphertext_hex"]);
  (void)tag;

  Bytes id = Hex(v["store_id_hex"]);
  StoreId sid;
  std::copy(id.begin(), id.end(), sid.begin());
  Result<std::array<uint8_t, 8>> check = store->CheckValue(sid);
  ASSERT_TRUE(check.ok()) << check.status().message();
  EXPECT_EQ(HexEncode(*check), v["check_value_hex"]);
}

TEST_F(KeyStoreTest, ProvisionedMasterHasExactlyTheSpecAttributes) {
  auto store = OpenStore("ks-a", "attrs");
  StoreId id = Provision(*store, HourlyPolicy(clock_.NowUnix()));
  Result<p11::Session> s = store->token()->Acquire();
  ASSERT_TRUE(s.ok());
  p11::Template find;
  find.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .String(CKA_LABEL, "attrs")
      .Data(CKA_ID, id);
  Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*s, find);
  ASSERT_TRUE(found.ok());
  ASSERT_EQ(found->size(), 1u);
  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {CKA_TOKEN,
                                                 CKA_PRIVATE,
                                                 CKA_SENSITIVE,
                                                 CKA_EXTRACTABLE,
                                                 CKA_DERIVE,
                                                 CKA_ENCRYPT,
                                                 CKA_DECRYPT,
                                                 CKA_SIGN,
                                                 CKA_VERIFY,
                                                 CKA_WRAP,
                                                 CKA_UNWRAP,
                                                 CKA_ALWAYS_SENSITIVE,
                                                 CKA_NEVER_EXTRACTABLE};
  auto bools = p11::ReadBools(*s, (*found)[0], kTypes);
  ASSERT_TRUE(bools.ok());
  std::vector<std::optional<bool>> expected = {
      true,  true,  true,  false, true, false, false,
      false, false, false, false, true, true};
  EXPECT_EQ(*bools, expected);
  EXPECT_EQ(*p11::ReadUlong(*s, (*found)[0], CKA_KEY_TYPE), CKK_AES);
  EXPECT_EQ(*p11::ReadUlong(*s, (*found)[0], CKA_VALUE_LEN), 32u);
  // The policy object sits next to it, same label and id.
  p11::Template pol;
  pol.Ulong(CKA_CLASS, CKO_DATA)
      .String(CKA_APPLICATION, "hsmstek")
      .String(CKA_LABEL, "attrs")
      .Data(kDataIdAttribute, id);
  Result<std::vector<CK_OBJECT_HANDLE>> policies = p11::FindObjects(*s, pol);
  ASSERT_TRUE(policies.ok());
  ASSERT_EQ(policies->size(), 1u);
  Result<Bytes> text = p11::ReadDataValue(*s, (*policies)[0]);
  ASSERT_TRUE(text.ok());
  Result<Policy> parsed = ParsePolicy(std::string(text->begin(), text->end()));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->period_s, kHour);
  // The token refuses a master's value too (it is sensitive); the access
  // layer's own guard is tested in pkcs11_test
  // (CkaValueOfASecretKeyIsRefusedByTheLayerItself).
  EXPECT_FALSE(p11::ReadDataValue(*s, (*found)[0]).ok());
}

TEST_F(KeyStoreTest, ReplicableMasterIsExtractableOnlyUnderTrustedWrap) {
  auto store = OpenStore("ks-a", "repl");
  StoreId id = Provision(*store, HourlyPolicy(clock_.NowUnix(), true));
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].id, id);
  EXPECT_TRUE(snap->masters[0].extractable);
  EXPECT_TRUE(snap->masters[0].policy.replicable);
}

TEST_F(KeyStoreTest, RefusesAMasterWeakerThanTheSpec) {
  auto store = OpenStore("ks-b", "weak");
  Result<p11::Session> s = store->token()->Acquire();
  ASSERT_TRUE(s.ok());
  StoreId id = {9, 9, 9, 9, 9, 9, 9, 9};
  // A derive key that can also encrypt: one usage too many.
  p11::Template bad;
  bad.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_DERIVE, true)
      .Bool(CKA_ENCRYPT, true)
      .String(CKA_LABEL, "weak")
      .Data(CKA_ID, id);
  CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE h;
  ASSERT_TRUE(
      P11_CALL(*s, C_GenerateKey, s->handle(), &gen, bad.data(), bad.size(), &h)
          .ok());
  ASSERT_TRUE(StorePolicyObject(*s, "weak", id, HourlyPolicy(kLongAgo)).ok());
  // Refused: left out with the reason, never used; the load itself works.
  ASSERT_TRUE(store->Load().ok());
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->masters.empty());
  ASSERT_EQ(snap->skipped.size(), 1u);
  EXPECT_NE(snap->skipped[0].what.find("0909090909090909"), std::string::npos);
  EXPECT_NE(snap->skipped[0].reason.find("CKA_ENCRYPT is TRUE"),
            std::string::npos)
      << snap->skipped[0].reason;
  EXPECT_EQ(store->KeysForEncrypt().status().code(),
            ErrorCode::kFailedPrecondition);
}

// Creates a token object of `label` that looks like a master (8-byte id)
// with `extra` usage, and optionally a policy object with `policy_text`.
void PlantMaster(p11::Session &s, const std::string &label, const StoreId &id,
                 const char *policy_text) {
  p11::Template t = MasterTemplate(label, id, false, false);
  CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE h;
  ASSERT_TRUE(
      P11_CALL(s, C_GenerateKey, s.handle(), &gen, t.data(), t.size(), &h)
          .ok());
  if (policy_text == nullptr) return;
  p11::Template d;
  d.Ulong(CKA_CLASS, CKO_DATA)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .String(CKA_APPLICATION, kPolicyApplication)
      .String(CKA_LABEL, label)
      .Data(kDataIdAttribute, id)
      .String(CKA_VALUE, policy_text);
  ASSERT_TRUE(
      P11_CALL(s, C_CreateObject, s.handle(), d.data(), d.size(), &h).ok());
}

// One bad object must not take the store down: an orphan master (a
// provision killed half-way), a policy of a future version and a stray key
// with the store's label are left out, reported once each, and the good
// master keeps serving.
TEST_F(KeyStoreTest, BadObjectsAreLeftOutAndTheRestServes) {
  auto store = OpenStore("ks-a", "degrade");
  StoreId good = Provision(*store, HourlyPolicy(kLongAgo));
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    PlantMaster(*s, "degrade", {1, 1, 1, 1, 1, 1, 1, 1}, nullptr);
    PlantMaster(*s, "degrade", {2, 2, 2, 2, 2, 2, 2, 2},
                "hsmstek-policy 2\nperiod 1h\n");
    // A stray AES key with the label and an id of another size.
    p11::Template t =
        MasterTemplate("degrade", {3, 3, 3, 3, 3, 3, 3, 3}, false, false);
    p11::Template stray;
    for (const CK_ATTRIBUTE &a : t.attributes()) {
      if (a.type == CKA_ID) continue;
      stray.Data(a.type, ByteSpan(static_cast<const uint8_t *>(a.pValue),
                                  a.ulValueLen));
    }
    stray.Data(CKA_ID, Bytes{7, 7, 7});
    CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h;
    ASSERT_TRUE(P11_CALL(*s, C_GenerateKey, s->handle(), &gen, stray.data(),
                         stray.size(), &h)
                    .ok());
  }
  ASSERT_TRUE(store->Load().ok());
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok()) << keys.status().message();
  EXPECT_EQ(keys->name,
            NameFor(*store, good, EpochAt(clock_.NowUnix(), kHour)));
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  std::string reasons;
  for (const SkippedObject &o : snap->skipped) {
    reasons += o.what + ": " + o.reason + "\n";
  }
  EXPECT_EQ(snap->skipped.size(), 3u) << reasons;
  EXPECT_NE(reasons.find("master 0101010101010101: no policy object"),
            std::string::npos)
      << reasons;
  EXPECT_NE(reasons.find("master 0202020202020202: unreadable policy"),
            std::string::npos)
      << reasons;
  EXPECT_NE(reasons.find("key 070707"), std::string::npos) << reasons;
}

// A policy update that failed half-way leaves two policy objects: the most
// restrictive wins, so a retirement takes effect whichever the token lists
// first.
TEST_F(KeyStoreTest, DuplicatePoliciesResolveToTheMostRestrictive) {
  auto store = OpenStore("ks-a", "dupes");
  Policy p = HourlyPolicy(kLongAgo);
  StoreId id = Provision(*store, p);
  Policy retired = p;
  retired.retire_at = clock_.NowUnix() - 1;
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(StorePolicyObject(*s, "dupes", id, retired).ok());
  }
  ASSERT_TRUE(store->Load().ok());
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].state, KeyState::kRetired);
  // Retired masters do not ratchet: the name of the current epoch may not
  // even be computable; when it is, it is refused.
  Result<KeyName> name = store->NameOf(id, EpochAt(clock_.NowUnix(), kHour));
  EXPECT_TRUE(!name.ok() || Refused(store->KeysForDecrypt(*name).verdict));
  // Retiring again cleans up: one policy object left.
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    Result<std::vector<Master>> masters = LoadMasters(*s, "dupes");
    ASSERT_TRUE(masters.ok());
    ASSERT_EQ(masters->size(), 1u);
    EXPECT_EQ((*masters)[0].extra_policy_objects.size(), 1u);
    ASSERT_TRUE(UpdatePolicy(*s, (*masters)[0], "dupes", retired).ok());
    masters = LoadMasters(*s, "dupes");
    ASSERT_TRUE(masters.ok());
    EXPECT_TRUE((*masters)[0].extra_policy_objects.empty());
  }
}

// Most restrictive field by field: a second policy object with a (distant)
// retire-at must not bring a week-long window with it. Picking one whole
// policy by retire-at first did: tickets six days old were accepted by a
// master whose own policy says one day.
TEST_F(KeyStoreTest, DuplicatePoliciesMergeFieldByField) {
  auto store = OpenStore("ks-a", "dupes-merge");
  Policy p = HourlyPolicy(kLongAgo);
  StoreId id = Provision(*store, p);
  Policy planted = p;
  planted.retire_at = clock_.NowUnix() + 365 * kDay;
  planted.decrypt_window_s = 7 * kDay;
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(StorePolicyObject(*s, "dupes-merge", id, planted).ok());
  }
  ASSERT_TRUE(store->Load().ok());
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].policy.decrypt_window_s, kDay);
  EXPECT_EQ(snap->masters[0].policy.retire_at, planted.retire_at);
  // The name table spans the merged (one-day) window, not the planted week.
  EXPECT_LE(store->known_names(), static_cast<size_t>(24 + 3));
  // Another period cannot be merged: the master is left out, with the reason.
  Policy other = p;
  other.period_s = 2 * kHour;
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(StorePolicyObject(*s, "dupes-merge", id, other).ok());
  }
  ASSERT_TRUE(store->Load().ok());
  snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->masters.empty());
  ASSERT_EQ(snap->skipped.size(), 1u);
  EXPECT_NE(snap->skipped[0].reason.find("disagree on the period"),
            std::string::npos)
      << snap->skipped[0].reason;
}

// What SoftHSM 2.6 gives: CKA_ALLOWED_MECHANISMS on every key, no
// CKA_DERIVE_TEMPLATE (it answers CKR_ATTRIBUTE_TYPE_INVALID): the master
// is created without it, and the read-back says so.
TEST_F(KeyStoreTest, KeysCarryTheLockdownTheTokenAllows) {
  auto store = OpenStore("ks-a", "locked");
  Provision(*store, HourlyPolicy(kLongAgo));
  ASSERT_TRUE(store->Load().ok());
  ASSERT_TRUE(store->KeysForEncrypt().ok());
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->masters.size(), 1u);
  EXPECT_EQ(snap->masters[0].protections.allowed_mechanisms,
            Protection::kApplied);
  EXPECT_EQ(snap->masters[0].protections.derive_template,
            Protection::kUnsupported);
  EXPECT_EQ(store->derived_allowed_mechanisms(), Protection::kApplied);
  // The derived keys run only their mechanism: the token refuses another.
  Result<TicketKeys> keys = store->KeysForEncrypt();
  ASSERT_TRUE(keys.ok());
  Result<p11::Session> s = store->token()->Acquire();
  ASSERT_TRUE(s.ok());
  CK_MECHANISM cbc{CKM_AES_CBC, nullptr, 0};
  uint8_t iv[16] = {};
  cbc.pParameter = iv;
  cbc.ulParameterLen = sizeof(iv);
  Status refused = P11_CALL(*s, C_EncryptInit, s->handle(), &cbc, keys->aes);
  EXPECT_EQ(refused.ckr(), static_cast<CK_RV>(CKR_MECHANISM_INVALID));
}

// Forged key names for every epoch of a week-long window cost derivations
// but never more than the fixed bound of session objects in the token.
TEST_F(KeyStoreTest, ForgedNamesForEveryInWindowEpochStayUnderTheBound) {
  auto store = OpenStore("ks-d", "forged");
  Policy p = HourlyPolicy(kLongAgo);
  p.decrypt_window_s = 7 * kDay;
  StoreId id = Provision(*store, p);
  ASSERT_TRUE(store->Load().ok());
  auto session_keys = [&]() -> size_t {
    Result<p11::Session> s = store->token()->Acquire();
    EXPECT_TRUE(s.ok());
    if (!s.ok()) return 0;
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bool(CKA_TOKEN, false);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*s, t);
    EXPECT_TRUE(found.ok()) << found.status().message();
    return found.ok() ? found->size() : 0;
  };
  const size_t before = session_keys();
  store->Maintain();
  const uint64_t n = EpochAt(clock_.NowUnix(), kHour);
  size_t peak = 0;
  size_t declined = 0;
  for (uint64_t e = n - 168; e <= n; ++e) {
    clock_.Advance(1);  // one a second: under the old-epoch budget
    store->Maintain();  // the background pass, once a second
    DecryptLookup l = store->KeysForDecrypt(NameFor(*store, id, e));
    // Declined (the derivation budget, not token trouble: kDeclined since
    // budget declines stopped counting as token errors) while evicted
    // pairs wait out their maintenance pass.
    ASSERT_TRUE(l.verdict == DecryptVerdict::kOld ||
                l.verdict == DecryptVerdict::kCurrent ||
                l.verdict == DecryptVerdict::kDeclined)
        << e;
    declined += l.verdict == DecryptVerdict::kDeclined ? 1 : 0;
    peak = std::max(peak, session_keys() - before);
  }
  EXPECT_GE(store->derivations(), 168u - declined);
  EXPECT_LT(declined, 168u / 2);
  static_assert(kMaxDerivedPairs <= 16, "a small bound, whatever the window");
  EXPECT_LE(peak, 2 * kMaxDerivedPairs);
  // The current and next epoch stayed: no derivation to seal.
  const uint64_t derived = store->derivations();
  ASSERT_TRUE(store->KeysForEncrypt().ok());
  EXPECT_EQ(store->derivations(), derived);
}

// The attack the bound invites: forged names cycling through more old
// epochs than the bound keeps, each evicting the next one asked for. Without
// a budget every lookup derives (and destroys) a pair on the event loop;
// with it, at most kMaxOldDerivationsPerSecond a second, and the current
// epoch keeps serving without a derivation.
TEST_F(KeyStoreTest, ForgedOldNamesCannotForceADerivationPerHandshake) {
  auto store = OpenStore("ks-d", "thrash");
  Policy p = HourlyPolicy(kLongAgo);
  p.decrypt_window_s = 7 * kDay;
  StoreId id = Provision(*store, p);
  ASSERT_TRUE(store->Load().ok());
  store->Maintain();
  const uint64_t n = EpochAt(clock_.NowUnix(), kHour);
  const uint64_t before = store->derivations();
  size_t declined = 0;
  for (int round = 0; round < 5; ++round) {
    for (uint64_t e = n - 40; e < n; ++e) {
      DecryptLookup l = store->KeysForDecrypt(NameFor(*store, id, e));
      EXPECT_NE(l.verdict, DecryptVerdict::kUnavailable) << "not token trouble";
      if (l.verdict == DecryptVerdict::kDeclined) ++declined;
    }
  }
  EXPECT_LE(store->derivations() - before, kMaxOldDerivationsPerSecond);
  EXPECT_GT(declined, 0u);
  const uint64_t derived = store->derivations();
  ASSERT_TRUE(store->KeysForEncrypt().ok());
  EXPECT_EQ(store->KeysForDecrypt(NameFor(*store, id, n)).verdict,
            DecryptVerdict::kCurrent);
  EXPECT_EQ(store->derivations(), derived);
  // The next second has a fresh budget: old tickets resume again.
  clock_.Advance(1);
  EXPECT_EQ(store->KeysForDecrypt(NameFor(*store, id, n - 1)).verdict,
            DecryptVerdict::kOld);
}

// Making room must not destroy a pair another thread may be using: its
// handle would fail with CKR_KEY_HANDLE_INVALID, which the token layer
// takes for a lost token (every session dropped, every derived key gone).
// Here the "other thread" holds the oldest epoch's keys while forged names
// for newer old epochs push it out of the cache.
TEST_F(KeyStoreTest, EvictionKeepsHandlesInUseAlive) {
  auto store = OpenStore("ks-d", "inuse");
  Policy p = HourlyPolicy(kLongAgo);
  p.decrypt_window_s = 7 * kDay;
  StoreId id = Provision(*store, p);
  ASSERT_TRUE(store->Load().ok());
  store->Maintain();
  const uint64_t n = EpochAt(clock_.NowUnix(), kHour);
  DecryptLookup held = store->KeysForDecrypt(NameFor(*store, id, n - 100));
  ASSERT_EQ(held.verdict, DecryptVerdict::kOld);
  const uint64_t generation = store->token()->generation();
  for (uint64_t e = n - 30; e < n; ++e) {
    clock_.Advance(1);
    (void)store->KeysForDecrypt(NameFor(*store, id, e));
  }
  EXPECT_LE(store->cached_keys(), kMaxDerivedPairs);
  {
    Result<p11::Session> s = store->token()->Acquire();
    ASSERT_TRUE(s.ok());
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    Status init = P11_CALL(*s, C_SignInit, s->handle(), &mac, held.keys.hmac);
    EXPECT_TRUE(init.ok()) << init.message();
    if (init.ok()) {
      uint8_t data[1] = {0};
      uint8_t tag[32];
      CK_ULONG tag_len = sizeof(tag);
      EXPECT_TRUE(
          P11_CALL(*s, C_Sign, s->handle(), data, 1, tag, &tag_len).ok());
    }
  }
  EXPECT_EQ(store->token()->generation(), generation);
}

TEST_F(KeyStoreTest, StatesFollowTheClockThroughARotation) {
  auto store = OpenStore("ks-b", "states");
  const int64_t t0 = clock_.NowUnix();
  StoreId first = Provision(*store, HourlyPolicy(t0 + kHour));
  ASSERT_TRUE(store->Load().ok());
  auto state_of = [&](const StoreId &id) {
    Result<StoreSnapshot> snap = store->Describe();
    EXPECT_TRUE(snap.ok());
    for (const MasterInfo &m : snap->masters)
      if (m.id == id) return m.state;
    ADD_FAILURE() << "master missing";
    return KeyState::kRetired;
  };
  EXPECT_EQ(state_of(first), KeyState::kPending);
  Result<TicketKeys> none = store->KeysForEncrypt();
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), ErrorCode::kFailedPrecondition);

  clock_.Advance(kHour);
  EXPECT_EQ(state_of(first), KeyState::kActive);
  Result<TicketKeys> k1 = store->KeysForEncrypt();
  ASSERT_TRUE(k1.ok());
  EXPECT_EQ(k1->name, NameFor(*store, first, EpochAt(clock_.NowUnix(), kHour)));

  // Rotate: a second generation activates an hour later.
  StoreId second = Provision(*store, HourlyPolicy(clock_.NowUnix() + kHour));
  ASSERT_TRUE(store->Load().ok());
  EXPECT_EQ(state_of(second), KeyState::kPending);
  EXPECT_EQ(state_of(first), KeyState::kActive);
  clock_.Advance(kHour);
  EXPECT_EQ(state_of(second), KeyState::kActive);
  EXPECT_EQ(state_of(first), KeyState::kDecryptOnly);
  Result<TicketKeys> k2 = store->KeysForEncrypt();
  ASSERT_TRUE(k2.ok());
  EXPECT_EQ(k2->name,
            NameFor(*store, second, EpochAt(clock_.NowUnix(), kHour)));
  // The old master's tickets renew while in the window...
  EXPECT_EQ(store->KeysForDecrypt(k1->name).verdict, DecryptVerdict::kOld);
  clock_.Advance(kDay);
  // ...and are refused once the window has passed.
  EXPECT_EQ(state_of(first), KeyState::kRetired);
  EXPECT_TRUE(Refused(store->KeysForDecrypt(k1->name).verdict));
}

TEST_F(KeyStoreTest, ExplicitRetireStopsDecryptingAtOnce) {
  auto store = OpenStore("ks-b", "retire");
  StoreId id = Provision(*store, HourlyPolicy(clock_.NowUnix()));
  ASSERT_TRUE(store->Load().ok());
  Result<TicketKeys> k = store->KeysForEncrypt();
  ASSERT_TRUE(k.ok());
  Result<p11::Session> s = store->token()->Acquire();
  ASSERT_TRUE(s.ok());
  Result<std::vector<Master>> masters = LoadMasters(*s, "retire");
  ASSERT_TRUE(masters.ok());
  Policy p = (*masters)[0].policy;
  p.retire_at = clock_.NowUnix();
  Status updated = UpdatePolicy(*s, (*masters)[0], "retire", p);
  ASSERT_TRUE(updated.ok()) << updated.message();
  ASSERT_TRUE(store->Load().ok());
  EXPECT_TRUE(Refused(store->KeysForDecrypt(k->name).verdict));
  EXPECT_FALSE(store->KeysForEncrypt().ok());
  (void)id;
}

TEST_F(KeyStoreTest, DecryptVerdictsFollowSpecSection5) {
  auto store = OpenStore("ks-c", "verdicts");
  const int64_t t0 =
      (clock_.NowUnix() / kHour) * kHour + 10;  // just past a boundary
  clock_.Set(t0);
  StoreId id = Provision(*store, HourlyPolicy(t0 - 30 * kDay));
  ASSERT_TRUE(store->Load().ok());
  const uint64_t n = EpochAt(t0, kHour);
  auto verdict = [&](uint64_t epoch) {
    Result<KeyName> name = store->NameOf(id, epoch);
    if (!name.ok()) return DecryptVerdict::kExpired;  // its link is gone
    return store->KeysForDecrypt(*name).verdict;
  };
  EXPECT_EQ(verdict(n), DecryptVerdict::kCurrent);
  EXPECT_EQ(verdict(n - 1), DecryptVerdict::kOld);
  EXPECT_EQ(verdict(n - 24), DecryptVerdict::kOld);  // window edge
  // 10 s into epoch n, inside the 60 s skew grace at the old end.
  EXPECT_EQ(verdict(n - 25), DecryptVerdict::kOld);
  EXPECT_EQ(verdict(n - 26), DecryptVerdict::kExpired);  // beyond the window
  EXPECT_EQ(verdict(n + 2), DecryptVerdict::kFuture);
  // n+1 starts in 3590 s: beyond the default 60 s skew.
  EXPECT_EQ(verdict(n + 1), DecryptVerdict::kFuture);
  clock_.Set(t0 + kHour - 10 - 30);  // 30 s before the boundary
  EXPECT_EQ(verdict(n + 1), DecryptVerdict::kCurrent);
  store->set_clock_skew(10);
  EXPECT_EQ(verdict(n + 1), DecryptVerdict::kFuture);
  StoreId other = {1, 1, 1, 1, 1, 1, 1, 1};
  EXPECT_EQ(store->KeysForDecrypt(MakeKeyName(other, n)).verdict,
            DecryptVerdict::kUnknownKey);
}

TEST_F(KeyStoreTest, EpochKeyCacheIsBoundedAndPrederivesTheNextEpoch) {
  auto store = OpenStore("ks-c", "bound");
  Policy p = HourlyPolicy(clock_.NowUnix());
  p.decrypt_window_s = 3 * kHour;
  StoreId id = Provision(*store, p);
  ASSERT_TRUE(store->Load().ok());
  store->Maintain();
  uint64_t n = EpochAt(clock_.NowUnix(), kHour);
  uint64_t derived = store->derivations();
  EXPECT_EQ(derived, 2u);  // epochs n and n+1
  clock_.Advance(kHour);
  // The boundary was crossed: the new current epoch needs no derivation.
  ASSERT_TRUE(store->KeysForEncrypt().ok());
  EXPECT_EQ(store->derivations(), derived);
  for (int i = 0; i < 10; ++i) {
    // Touch old epochs inside the window, then move on.
    for (uint64_t e = n - 3; e <= n; ++e) {
      // Epochs before the activation have no name.
      Result<KeyName> name = store->NameOf(id, e);
      if (name.ok()) (void)store->KeysForDecrypt(*name);
    }
    clock_.Advance(kHour);
    n = EpochAt(clock_.NowUnix(), kHour);
    store->Maintain();
    // Window, skew grace (17 s into the epoch: one more), current, next.
    EXPECT_LE(store->cached_keys(), 3u + 3u);
  }
}

// The cache bound must hold in the token too: a key pair evicted from the
// cache is destroyed (a maintenance pass later), so a long-running server
// does not leave two session objects per epoch in the HSM for ever (found
// by the soak, tests/soak).
TEST_F(KeyStoreTest, EvictedEpochKeysAreDestroyedInTheToken) {
  auto store = OpenStore("ks-d", "evict");
  Policy p = HourlyPolicy(clock_.NowUnix());
  p.decrypt_window_s = 2 * kHour;
  Provision(*store, p);
  ASSERT_TRUE(store->Load().ok());
  auto session_keys = [&]() -> size_t {
    Result<p11::Session> s = store->token()->Acquire();
    EXPECT_TRUE(s.ok());
    if (!s.ok()) return 0;
    p11::Template t;
    t.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bool(CKA_TOKEN, false);
    Result<std::vector<CK_OBJECT_HANDLE>> found = p11::FindObjects(*s, t);
    EXPECT_TRUE(found.ok()) << found.status().message();
    return found.ok() ? found->size() : 0;
  };
  const size_t before = session_keys();
  for (int i = 0; i < 24; ++i) {
    store->Maintain();
    clock_.Advance(kHour);
  }
  store->Maintain();
  EXPECT_GE(store->derivations(), 24u);
  EXPECT_LE(store->cached_keys(), 2u + 3u);  // + grace, current, next
  // Two objects per cached pair, plus at most two evicted pairs waiting
  // for their pass.
  EXPECT_LE(session_keys(), before + 2 * store->cached_keys() + 2 * 2);
  // Still working: the current epoch's keys are there and usable.
  EXPECT_TRUE(store->KeysForEncrypt().ok());
}

TEST_F(KeyStoreTest, RebuildsEverythingAfterTheTokenDropsItsSessions) {
  auto store = OpenStore("ks-c", "recover");
  Provision(*store, HourlyPolicy(clock_.NowUnix()));
  Result<TicketKeys> before = store->KeysForEncrypt();
  ASSERT_TRUE(before.ok());
  uint64_t derivations = store->derivations();
  auto token = store->token();
  ASSERT_EQ(token->fn()->C_CloseAllSessions(token->slot()), CKR_OK);
  // The fault is seen by the next token call; the store then reloads and
  // derives again instead of reusing the dead handles.
  Result<p11::Session> s = token->Acquire();
  ASSERT_TRUE(s.ok());
  uint8_t buf[8];
  Status probe = P11_CALL(*s, C_GenerateRandom, s->handle(), buf, sizeof(buf));
  EXPECT_FALSE(probe.ok());
  Result<TicketKeys> after = store->KeysForEncrypt();
  ASSERT_TRUE(after.ok()) << after.status().message();
  EXPECT_GT(after->generation, before->generation);
  EXPECT_EQ(store->derivations(), derivations + 1);
  EXPECT_EQ(after->name, before->name);
}

TEST_F(KeyStoreTest, LegacyKeysDecryptOnlyUntilExpiry) {
  auto store = OpenStore("ks-d", "legacy");
  std::vector<LegacyKey> keys(1);
  for (int i = 0; i < 16; ++i) keys[0].name[i] = static_cast<uint8_t>(0x40 + i);
  keys[0].aes_key = SecretBuffer(32);
  keys[0].hmac_key = SecretBuffer(32);
  for (int i = 0; i < 32; ++i) {
    keys[0].aes_key.data()[i] = static_cast<uint8_t>(i + 1);
    keys[0].hmac_key.data()[i] = static_cast<uint8_t>(0x80 + i);
  }
  Result<p11::Session> s = store->token()->Acquire();
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(ImportLegacyKeys(*s, "legacy", keys, clock_.NowUnix() + kDay,
                               LegacyFormat::kNginx)
                  .ok());
  Status dup = ImportLegacyKeys(*s, "legacy", keys, clock_.NowUnix() + kDay,
                                LegacyFormat::kNginx);
  EXPECT_EQ(dup.code(), ErrorCode::kAlreadyExists);
  ASSERT_TRUE(store->Load().ok());
  KeyName name;
  name.bytes = keys[0].name;
  DecryptLookup lookup = store->KeysForDecrypt(name);
  EXPECT_EQ(lookup.verdict, DecryptVerdict::kOld);
  // The legacy AES key decrypts what OpenSSL encrypted with the same bytes
  // (only the test knows them) and cannot encrypt.
  Result<StoreSnapshot> snap = store->Describe();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->legacy.size(), 1u);
  EXPECT_EQ(snap->legacy[0].format, "nginx");
  EXPECT_EQ(snap->legacy[0].aes_key_bytes, 32u);
  static constexpr CK_ATTRIBUTE_TYPE kTypes[] = {
      CKA_ENCRYPT, CKA_DECRYPT, CKA_SENSITIVE, CKA_EXTRACTABLE};
  auto bools = p11::ReadBools(*s, lookup.keys.aes, kTypes);
  ASSERT_TRUE(bools.ok());
  std::vector<std::optional<bool>> expected = {false, true, true, false};
  EXPECT_EQ(*bools, expected);
  clock_.Advance(kDay);
  EXPECT_EQ(store->KeysForDecrypt(name).verdict, DecryptVerdict::kExpired);
}

TEST_F(KeyStoreTest, SameMasterInTwoTokensDerivesTheSameKeys) {
  nlohmann::json v = Vectors();
  auto a = OpenStore("ks-a", "fleet");
  auto b = OpenStore("ks-d", "fleet");
  ImportVectorMaster(*a, HourlyPolicy(kVectorStart));
  ImportVectorMaster(*b, HourlyPolicy(kVectorStart));
  ASSERT_TRUE(a->Load().ok());
  ASSERT_TRUE(b->Load().ok());
  Result<TicketKeys> ka = a->KeysForEncrypt();
  ASSERT_TRUE(ka.ok());
  DecryptLookup kb = b->KeysForDecrypt(ka->name);
  ASSERT_EQ(kb.verdict, DecryptVerdict::kCurrent);
  Bytes iv(16, 0x5a);
  std::string pt = "session state from server A";
  auto [ct, tag] =
      Seal(*a, *ka, iv,
           ByteSpan(reinterpret_cast<const uint8_t *>(pt.data()), pt.size()));
  auto [ct_b, tag_b] =
      Seal(*b, kb.keys, iv,
           ByteSpan(reinterpret_cast<const uint8_t *>(pt.data()), pt.size()));
  EXPECT_EQ(ct, ct_b);
  EXPECT_EQ(tag, tag_b);
  Bytes back = Decrypt(*b, kb.keys, iv, ct);
  EXPECT_EQ(std::string(back.begin(), back.end()), pt);
}

}  // namespace
}  // namespace hsmstek::keystore
