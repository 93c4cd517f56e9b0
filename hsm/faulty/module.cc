// libhsmstek_faulty.so: a PKCS#11 v2.40 module for tests that forwards every
// call to a target module (SoftHSM by default), injects faults described by
// a control file, simulates token removal and audits key custody. See
// README.md in this directory. Only C_GetFunctionList is exported.

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "audit.h"
#include "ck.h"
#include "names.h"
#include "rules.h"

namespace hsmstek::faulty {
namespace {

constexpr char kDefaultTarget[] = "/usr/lib/softhsm/libsofthsm2.so";
constexpr std::size_t kMaxControlFile = 64 * 1024;
// A control file changed this recently may have been rewritten within the
// file system's timestamp granularity: compare its content, not its stat.
constexpr long long kRacyWindowNs = 100LL * 1000 * 1000;
// Object handles are XORed with a per-insertion salt in these high bits, so
// handles from before a removal never name an object afterwards.
constexpr int kSaltShift = sizeof(CK_ULONG) >= 8 ? 40 : 24;
constexpr CK_ULONG kSaltMask = 0x7f;
constexpr std::size_t kScratchSize = 16 * 1024;

struct FileId {
  bool exists = false;
  dev_t dev = 0;
  ino_t ino = 0;
  off_t size = 0;
  long long mtime_ns = 0;
  long long ctime_ns = 0;
  bool operator==(const FileId &) const = default;
};

struct SessionEntry {
  CK_SESSION_HANDLE target = 0;
  CK_SLOT_ID slot = 0;
  std::uint64_t generation = 0;  // the slot's insertion generation at open
  bool dead = false;             // the token was removed while it was open
};

struct ActiveFail {
  FailRule rule;
  std::uint64_t seen = 0;  // matching calls since the rules were loaded
};

struct State {
  // Every forwarded call holds `forwarding` shared; a simulated removal
  // closes the target's sessions holding it exclusively, so no thread is
  // inside the target on a session being closed (SoftHSM does not survive
  // C_CloseAllSessions racing a call on one of those sessions). Taken
  // before `mu`, never while holding it.
  std::shared_mutex forwarding;
  std::mutex mu;
  // Target module: loaded once, never unloaded.
  std::atomic<CK_FUNCTION_LIST *> target{nullptr};
  void *dl = nullptr;
  bool initialized = false;
  // From the environment, read at C_Initialize (and at first use).
  bool env_read = false;
  std::string control_path;
  std::string trace_path;
  std::string stats_path;
  std::string audit_path;
  std::atomic<int> trace_fd{-1};
  // HSMSTEK_FAULTY_TRACE_THREADS=1: trace lines name the calling thread.
  std::atomic<bool> trace_threads{false};
  // Control file.
  FileId file_id;
  bool file_loaded = false;
  std::string file_content;
  bool file_bad = false;
  std::vector<ActiveFail> fails;
  std::vector<DelayRule> delays;
  std::vector<RemoveRule> removes;
  std::vector<CK_ATTRIBUTE_TYPE> refused;  // `refuse` rules
  // Token removal.
  bool remove_all = false;
  std::set<CK_SLOT_ID> removed;
  // Target sessions of removed slots still to be closed (by Begin, outside
  // `mu`). Handles, not slots: a quick re-insertion must not save them.
  std::vector<CK_SESSION_HANDLE> pending_closes;
  std::map<CK_SLOT_ID, std::uint64_t> generation;
  // Caller session handle -> target session. Never reused in a process.
  std::unordered_map<CK_SESSION_HANDLE, SessionEntry> sessions;
  CK_SESSION_HANDLE next_session = 0x1000;
  // Counters since the last successful C_Initialize.
  std::array<std::uint64_t, kFnCount> calls{};
  std::array<std::uint64_t, kFnCount> injected{};
};

// Leaked on purpose: calls may arrive during static destruction.
State &St() {
  static State *s = new State();
  return *s;
}

Auditor &Audit() {
  static Auditor *a = new Auditor();
  return *a;
}

// T: the target's function list; non-null once C_GetFunctionList succeeded,
// which is the only way a caller can reach the other functions.
CK_FUNCTION_LIST *T() { return St().target.load(); }

std::size_t Index(Fn fn) { return static_cast<std::size_t>(fn); }

std::string Env(const char *name) {
  const char *v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

long long Ns(const struct timespec &ts) {
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

long long NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return Ns(ts);
}

bool WriteAll(int fd, const std::string &data) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

bool LoadTargetLocked(State &s) {
  if (s.target.load() != nullptr) return true;
  std::string path = Env("HSMSTEK_FAULTY_TARGET");
  if (path.empty()) path = kDefaultTarget;
  void *dl = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (dl == nullptr) {
    std::fprintf(stderr, "hsmstek-faulty: cannot load target module %s: %s\n",
                 path.c_str(), ::dlerror());
    return false;
  }
  auto get =
      reinterpret_cast<CK_C_GetFunctionList>(::dlsym(dl, "C_GetFunctionList"));
  if (get == &::C_GetFunctionList) {
    std::fprintf(stderr, "hsmstek-faulty: target module %s is this module\n",
                 path.c_str());
    return false;  // dlclose would drop our own reference: keep it
  }
  CK_FUNCTION_LIST *list = nullptr;
  if (get == nullptr || get(&list) != CKR_OK || list == nullptr) {
    std::fprintf(stderr, "hsmstek-faulty: %s has no usable C_GetFunctionList\n",
                 path.c_str());
    ::dlclose(dl);
    return false;
  }
  s.dl = dl;
  s.target.store(list);
  return true;
}

// ---------------------------------------------------------------------------
// Token removal

std::vector<CK_SLOT_ID> TargetSlots(CK_BBOOL present, CK_RV *rv_out) {
  std::vector<CK_SLOT_ID> slots;
  CK_RV rv = CKR_OK;
  for (int attempt = 0; attempt < 4; ++attempt) {
    CK_ULONG n = 0;
    rv = T()->C_GetSlotList(present, nullptr, &n);
    if (rv != CKR_OK) break;
    slots.resize(n);
    rv = T()->C_GetSlotList(present, slots.data(), &n);
    if (rv == CKR_BUFFER_TOO_SMALL) continue;
    if (rv == CKR_OK) slots.resize(n);
    break;
  }
  if (rv != CKR_OK) slots.clear();
  if (rv_out != nullptr) *rv_out = rv;
  return slots;
}

std::string TrimmedLabel(const CK_TOKEN_INFO &info) {
  std::string label(reinterpret_cast<const char *>(info.label),
                    sizeof(info.label));
  while (!label.empty() && (label.back() == ' ' || label.back() == '\0')) {
    label.pop_back();
  }
  return label;
}

bool IsRemovedLocked(const State &s, CK_SLOT_ID slot) {
  return s.remove_all || s.removed.count(slot) != 0;
}

// ResolveRemovalLocked turns the remove rules into slot ids. Token labels
// need the target, so they resolve only while it is initialised (and again
// at every C_Initialize and C_InitToken).
void ResolveRemovalLocked(State &s) {
  s.remove_all = false;
  s.removed.clear();
  std::vector<std::string> labels;
  for (const RemoveRule &r : s.removes) {
    switch (r.kind) {
      case RemoveRule::Kind::kAll:
        s.remove_all = true;
        break;
      case RemoveRule::Kind::kSlot:
        s.removed.insert(r.slot);
        break;
      case RemoveRule::Kind::kToken:
        labels.push_back(r.label);
        break;
      default:
        break;
    }
  }
  if (labels.empty() || !s.initialized) return;
  for (CK_SLOT_ID slot : TargetSlots(CK_TRUE, nullptr)) {
    CK_TOKEN_INFO info;
    if (T()->C_GetTokenInfo(slot, &info) != CKR_OK) continue;
    std::string label = TrimmedLabel(info);
    for (const std::string &want : labels) {
      if (label == want) s.removed.insert(slot);
    }
  }
}

// ApplyRemovesLocked installs new remove rules and performs the transitions:
// a slot that becomes removed loses all its sessions on the target (ours
// turn dead at once; the target's are closed by Begin, see ClosePending); a
// slot that comes back gets a new generation (new handle salt) and forgets its
// dead sessions, whose handles are now simply invalid.
void ApplyRemovesLocked(State &s, std::vector<RemoveRule> removes) {
  bool old_all = s.remove_all;
  std::set<CK_SLOT_ID> old_removed = s.removed;
  s.removes = std::move(removes);
  ResolveRemovalLocked(s);
  if (!s.initialized) return;
  std::set<CK_SLOT_ID> known(old_removed.begin(), old_removed.end());
  known.insert(s.removed.begin(), s.removed.end());
  for (CK_SLOT_ID slot : TargetSlots(CK_FALSE, nullptr)) known.insert(slot);
  for (const auto &[handle, e] : s.sessions) known.insert(e.slot);
  for (CK_SLOT_ID slot : known) {
    bool was = old_all || old_removed.count(slot) != 0;
    bool now = IsRemovedLocked(s, slot);
    if (!was && now) {
      for (auto &[handle, e] : s.sessions) {
        if (e.slot == slot && !e.dead) {
          e.dead = true;
          s.pending_closes.push_back(e.target);
        }
      }
    } else if (was && !now) {
      ++s.generation[slot];
      std::erase_if(s.sessions, [slot](const auto &kv) {
        return kv.second.slot == slot && kv.second.dead;
      });
    }
  }
}

// ---------------------------------------------------------------------------
// Control file

bool ReadSmallFile(const std::string &path, std::string *out,
                   std::string *error) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *error = std::string("cannot open: ") + std::strerror(errno);
    return false;
  }
  out->clear();
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      *error = std::string("cannot read: ") + std::strerror(errno);
      ::close(fd);
      return false;
    }
    if (n == 0) break;
    out->append(buf, static_cast<std::size_t>(n));
    if (out->size() > kMaxControlFile) {
      *error = "larger than 64 KiB";
      ::close(fd);
      return false;
    }
  }
  ::close(fd);
  return true;
}

// RefreshRulesLocked reloads the control file when its content changed. A
// stat per call is the common cost; the content is read only when the stat
// changed or the file is younger than the timestamp granularity can tell.
void RefreshRulesLocked(State &s) {
  if (s.control_path.empty()) return;
  FileId id;
  struct stat st;
  if (::stat(s.control_path.c_str(), &st) == 0) {
    id = {true,       st.st_dev,      st.st_ino,
          st.st_size, Ns(st.st_mtim), Ns(st.st_ctim)};
  }
  bool racy =
      id.exists && NowNs() - std::max(id.mtime_ns, id.ctime_ns) < kRacyWindowNs;
  if (s.file_loaded && id == s.file_id && !racy) return;
  s.file_id = id;
  std::string content;
  std::string error;
  bool read_ok = !id.exists || ReadSmallFile(s.control_path, &content, &error);
  if (read_ok && s.file_loaded && content == s.file_content) return;
  s.file_loaded = true;
  s.file_content = read_ok ? content : "\n<unreadable>\n";
  ParseResult parsed;
  if (read_ok) {
    parsed = ParseRules(content);
    error = parsed.error;
  }
  if (!read_ok || !parsed.ok) {
    s.file_bad = true;
    std::fprintf(stderr,
                 "hsmstek-faulty: control file %s: %s; every call fails with "
                 "CKR_GENERAL_ERROR until it is fixed\n",
                 s.control_path.c_str(), error.c_str());
    return;
  }
  s.file_bad = false;
  s.fails.clear();
  for (const FailRule &r : parsed.rules.fails) s.fails.push_back({r, 0});
  s.delays = std::move(parsed.rules.delays);
  s.refused.clear();
  for (const RefuseRule &r : parsed.rules.refuses) {
    s.refused.push_back(r.attribute);
  }
  ApplyRemovesLocked(s, std::move(parsed.rules.removes));
}

// ReadEnvLocked (re)reads the environment; a new control file starts from
// no rules, a new trace file is opened.
void ReadEnvLocked(State &s) {
  s.env_read = true;
  std::string control = Env("HSMSTEK_FAULTY_CONTROL");
  if (control != s.control_path) {
    s.control_path = control;
    s.file_loaded = false;
    s.file_bad = false;
    s.file_content.clear();
    s.fails.clear();
    s.delays.clear();
    s.refused.clear();
    ApplyRemovesLocked(s, {});
  }
  std::string trace = Env("HSMSTEK_FAULTY_TRACE");
  if (trace != s.trace_path || (s.trace_fd.load() < 0 && !trace.empty())) {
    int old = s.trace_fd.exchange(-1);
    if (old >= 0) ::close(old);
    s.trace_path = trace;
    if (!trace.empty()) {
      int fd = ::open(trace.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                      0644);
      if (fd < 0) {
        std::fprintf(stderr, "hsmstek-faulty: cannot open trace file %s\n",
                     trace.c_str());
      }
      s.trace_fd.store(fd);
    }
  }
  s.trace_threads.store(Env("HSMSTEK_FAULTY_TRACE_THREADS") == "1");
  s.stats_path = Env("HSMSTEK_FAULTY_STATS");
  s.audit_path = Env("HSMSTEK_FAULTY_AUDIT");
}

void WriteStatsLocked(const State &s) {
  if (s.stats_path.empty()) return;
  std::string path = s.stats_path;
  std::size_t p = path.find("%p");
  if (p != std::string::npos) path.replace(p, 2, std::to_string(::getpid()));
  std::string text;
  for (std::size_t i = 0; i < kFnCount; ++i) {
    if (s.calls[i] == 0) continue;
    text += std::string(FnName(static_cast<Fn>(i))) +
            " calls=" + std::to_string(s.calls[i]) +
            " injected=" + std::to_string(s.injected[i]) + "\n";
  }
  std::string tmp = path + ".tmp" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  bool ok = fd >= 0 && WriteAll(fd, text);
  if (fd >= 0) ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    std::fprintf(stderr, "hsmstek-faulty: cannot write stats file %s\n",
                 path.c_str());
  }
}

// ---------------------------------------------------------------------------
// Per-call bookkeeping

struct Decision {
  CK_RV injected = CKR_OK;
  // Held until the call returns (see State::forwarding).
  std::shared_lock<std::shared_mutex> forwarding;
};

// ClosePending closes the target sessions of removed slots, with no
// forwarded call in flight. Closing the last one also logs the target out,
// as a real removal does.
void ClosePending(State &s) {
  std::unique_lock<std::shared_mutex> exclusive(s.forwarding);
  std::vector<CK_SESSION_HANDLE> handles;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    handles.swap(s.pending_closes);
    if (!s.initialized) return;  // C_Finalize closed them all
  }
  for (CK_SESSION_HANDLE h : handles) T()->C_CloseSession(h);
}

// Begin counts a call of `fn`, reloads the rules if needed, decides whether
// the call fails by rule, and sleeps the delay rules' total (unlocked).
Decision Begin(Fn fn) {
  State &s = St();
  Decision d;
  std::chrono::microseconds delay{0};
  bool close_pending;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.env_read) ReadEnvLocked(s);
    RefreshRulesLocked(s);
    ++s.calls[Index(fn)];
    if (s.file_bad) {
      if (fn != Fn::C_Finalize && fn != Fn::C_GetFunctionList) {
        d.injected = CKR_GENERAL_ERROR;
      }
    } else {
      // Every matching rule counts the call; the first one that fires wins.
      for (ActiveFail &f : s.fails) {
        if (!MatchesFunction(f.rule.fn, fn)) continue;
        ++f.seen;
        bool fires =
            f.seen > f.rule.after &&
            (f.rule.times == 0 || f.seen - f.rule.after <= f.rule.times);
        if (fires && d.injected == CKR_OK) d.injected = f.rule.rv;
      }
      for (const DelayRule &r : s.delays) {
        if (MatchesFunction(r.fn, fn)) delay += r.delay;
      }
    }
    if (d.injected != CKR_OK) ++s.injected[Index(fn)];
    close_pending = !s.pending_closes.empty();
  }
  if (close_pending) ClosePending(s);
  if (delay.count() > 0) std::this_thread::sleep_for(delay);
  d.forwarding = std::shared_lock<std::shared_mutex>(s.forwarding);
  return d;
}

// End appends the trace line of the call and returns `rv`.
// The attribute types of the key template of the call in progress on this
// thread ("" for other calls), appended to its trace line by End.
thread_local std::string t_template_types;

CK_RV End(Fn fn, CK_RV rv, const Decision &d) {
  int fd = St().trace_fd.load();
  std::string types;
  types.swap(t_template_types);
  if (fd >= 0) {
    std::string line = std::to_string(::getpid()) + " " +
                       std::string(FnName(fn)) + " " + RvName(rv) +
                       (d.injected != CKR_OK ? " injected" : "") +
                       (types.empty() ? "" : " template=" + types);
    // The thread id (equal to the pid on a process's main thread) tells
    // calls on a server's handshake thread from background ones.
    if (St().trace_threads.load(std::memory_order_relaxed)) {
      line += " tid=" + std::to_string(::gettid());
    }
    line += "\n";
    // One write per line: O_APPEND keeps lines whole across processes.
    if (::write(fd, line.data(), line.size()) < 0) {
      std::fprintf(stderr, "hsmstek-faulty: trace write failed\n");
    }
  }
  return rv;
}

struct Sess {
  CK_SESSION_HANDLE target = 0;
  CK_ULONG salt = 0;
};

// KeyTemplate notes the attribute types of a key-creating call's template
// for its trace line, and returns CKR_ATTRIBUTE_TYPE_INVALID when a
// `refuse` rule names one of them (the token does not know it), else
// CKR_OK.
CK_RV KeyTemplate(const CK_ATTRIBUTE *tmpl, CK_ULONG count) {
  std::vector<CK_ATTRIBUTE_TYPE> refused;
  {
    State &s = St();
    std::lock_guard<std::mutex> lock(s.mu);
    // As Begin would: the rules of this very call.
    if (!s.env_read) ReadEnvLocked(s);
    RefreshRulesLocked(s);
    refused = s.refused;
  }
  std::string types;
  CK_RV rv = CKR_OK;
  for (CK_ULONG i = 0; tmpl != nullptr && i < count; ++i) {
    types += (i == 0 ? "" : ",") + AttributeName(tmpl[i].type);
    if (std::find(refused.begin(), refused.end(), tmpl[i].type) !=
        refused.end()) {
      rv = CKR_ATTRIBUTE_TYPE_INVALID;
    }
  }
  t_template_types = types;
  return rv;
}

// RefusedRead answers a C_GetAttributeValue for the attributes a `refuse`
// rule names as a token that does not know them: unavailable, and
// CKR_ATTRIBUTE_TYPE_INVALID; the other attributes are read from the
// target. Returns nullopt when no refused attribute is asked for.
std::optional<CK_RV> RefusedRead(CK_SESSION_HANDLE target,
                                 CK_OBJECT_HANDLE object, CK_ATTRIBUTE *tmpl,
                                 CK_ULONG count) {
  std::vector<CK_ATTRIBUTE_TYPE> refused;
  {
    State &s = St();
    std::lock_guard<std::mutex> lock(s.mu);
    refused = s.refused;
  }
  if (refused.empty() || tmpl == nullptr) return std::nullopt;
  std::vector<CK_ULONG> forwarded;
  bool any = false;
  for (CK_ULONG i = 0; i < count; ++i) {
    if (std::find(refused.begin(), refused.end(), tmpl[i].type) !=
        refused.end()) {
      tmpl[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
      any = true;
    } else {
      forwarded.push_back(i);
    }
  }
  if (!any) return std::nullopt;
  std::vector<CK_ATTRIBUTE> rest;
  for (CK_ULONG i : forwarded) rest.push_back(tmpl[i]);
  CK_RV rv = CKR_OK;
  if (!rest.empty()) {
    rv = T()->C_GetAttributeValue(target, object, rest.data(),
                                  static_cast<CK_ULONG>(rest.size()));
    for (std::size_t j = 0; j < forwarded.size(); ++j) {
      tmpl[forwarded[j]].ulValueLen = rest[j].ulValueLen;
    }
  }
  return rv == CKR_OK ? CKR_ATTRIBUTE_TYPE_INVALID : rv;
}

CK_ULONG Salt(std::uint64_t generation) {
  return (static_cast<CK_ULONG>(generation + 1) & kSaltMask) << kSaltShift;
}

// Object handles cross the boundary XORed with the session's salt; 0
// (CK_INVALID_HANDLE) stays 0.
CK_OBJECT_HANDLE Map(CK_OBJECT_HANDLE h, const Sess &s) {
  return h == CK_INVALID_HANDLE ? h : h ^ s.salt;
}

CK_RV LookupSession(CK_SESSION_HANDLE h, Sess *out) {
  State &s = St();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.initialized) return CKR_CRYPTOKI_NOT_INITIALIZED;
  auto it = s.sessions.find(h);
  if (it == s.sessions.end()) return CKR_SESSION_HANDLE_INVALID;
  if (it->second.dead) return CKR_DEVICE_REMOVED;
  out->target = it->second.target;
  out->salt = Salt(it->second.generation);
  return CKR_OK;
}

CK_RV CheckSlot(CK_SLOT_ID slot) {
  State &s = St();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.initialized) return CKR_CRYPTOKI_NOT_INITIALIZED;
  if (IsRemovedLocked(s, slot)) return CKR_TOKEN_NOT_PRESENT;
  return CKR_OK;
}

// The operation a session function continues; an injected failure ends it
// on the target too, as a failing call ends it on a real token.
enum class Op {
  kNone,
  kEncrypt,
  kDecrypt,
  kDigest,
  kSign,
  kVerify,
  kSignRecover,
  kVerifyRecover,
  kDigestEncrypt,
  kDecryptDigest,
  kSignEncrypt,
  kDecryptVerify,
};

// Drain ends the active operation of kind `op` on target session `t` by
// finishing it into a scratch buffer, which is wiped afterwards.
void Drain(CK_SESSION_HANDLE t, Op op) {
  std::vector<CK_BYTE> scratch(kScratchSize);
  CK_BYTE *buf = scratch.data();
  CK_ULONG n = kScratchSize;
  CK_FUNCTION_LIST *f = T();
  switch (op) {
    case Op::kEncrypt:
      f->C_EncryptFinal(t, buf, &n);
      break;
    case Op::kDecrypt:
      f->C_DecryptFinal(t, buf, &n);
      break;
    case Op::kDigest:
      f->C_DigestFinal(t, buf, &n);
      break;
    case Op::kSign:
      f->C_SignFinal(t, buf, &n);
      break;
    case Op::kVerify:
      f->C_VerifyFinal(t, buf, 1);
      break;
    case Op::kSignRecover:
      f->C_SignRecover(t, buf, 1, buf + 1, &n);
      break;
    case Op::kVerifyRecover:
      f->C_VerifyRecover(t, buf, 1, buf + 1, &n);
      break;
    case Op::kDigestEncrypt:
      f->C_DigestFinal(t, buf, &n);
      n = kScratchSize;
      f->C_EncryptFinal(t, buf, &n);
      break;
    case Op::kDecryptDigest:
      f->C_DecryptFinal(t, buf, &n);
      n = kScratchSize;
      f->C_DigestFinal(t, buf, &n);
      break;
    case Op::kSignEncrypt:
      f->C_SignFinal(t, buf, &n);
      n = kScratchSize;
      f->C_EncryptFinal(t, buf, &n);
      break;
    case Op::kDecryptVerify:
      f->C_DecryptFinal(t, buf, &n);
      f->C_VerifyFinal(t, buf, 1);
      break;
    case Op::kNone:
    default:
      break;
  }
  explicit_bzero(buf, kScratchSize);
}

// OnInjected applies the side effects of an injected failure on a live
// session: SESSION_HANDLE_INVALID / SESSION_CLOSED really close it (as a
// real token would never take the handle back); other errors end the
// operation in progress, except BUFFER_TOO_SMALL, which keeps it.
void OnInjected(CK_SESSION_HANDLE h, const Sess &sess, CK_RV rv, Op op) {
  if (rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED) {
    T()->C_CloseSession(sess.target);
    State &s = St();
    std::lock_guard<std::mutex> lock(s.mu);
    s.sessions.erase(h);
    std::erase(s.pending_closes, sess.target);  // as in CloseSession
    return;
  }
  if (rv != CKR_BUFFER_TOO_SMALL) Drain(sess.target, op);
}

struct NoHook {
  void operator()(const Sess &) const {}
};

// SessionCall: the common path of functions taking a session handle.
// `forward(sess)` runs the call on the target; `on_injected(sess)` lets the
// audit see calls that were failed by rule.
template <typename F, typename G = NoHook>
CK_RV SessionCall(Fn fn, CK_SESSION_HANDLE h, Op op, F &&forward,
                  G &&on_injected = G()) {
  Decision d = Begin(fn);
  Sess sess;
  CK_RV lookup = LookupSession(h, &sess);
  if (d.injected != CKR_OK) {
    if (lookup == CKR_OK) {
      on_injected(sess);
      OnInjected(h, sess, d.injected, op);
    }
    return End(fn, d.injected, d);
  }
  if (lookup != CKR_OK) return End(fn, lookup, d);
  return End(fn, forward(sess), d);
}

// SlotCall: the common path of functions taking a slot id.
template <typename F>
CK_RV SlotCall(Fn fn, CK_SLOT_ID slot, F &&forward) {
  Decision d = Begin(fn);
  if (d.injected != CKR_OK) return End(fn, d.injected, d);
  CK_RV rv = CheckSlot(slot);
  if (rv != CKR_OK) return End(fn, rv, d);
  return End(fn, forward(), d);
}

// ---------------------------------------------------------------------------
// General purpose functions

CK_RV Initialize(CK_VOID_PTR init_args) {
  State &s = St();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    ReadEnvLocked(s);
  }
  Decision d = Begin(Fn::C_Initialize);
  if (d.injected != CKR_OK) return End(Fn::C_Initialize, d.injected, d);
  std::string audit_path;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!LoadTargetLocked(s)) {
      return End(Fn::C_Initialize, CKR_GENERAL_ERROR, d);
    }
    audit_path = s.audit_path;
  }
  CK_RV rv = T()->C_Initialize(init_args);
  if (rv == CKR_OK) {
    // No other call may run during C_Initialize (PKCS#11 §5.4), so the
    // audit log can be swapped without a lock.
    Audit().Open(audit_path);
    std::lock_guard<std::mutex> lock(s.mu);
    s.initialized = true;
    s.sessions.clear();
    s.calls.fill(0);
    s.injected.fill(0);
    s.calls[Index(Fn::C_Initialize)] = 1;
    ResolveRemovalLocked(s);
  }
  return End(Fn::C_Initialize, rv, d);
}

CK_RV Finalize(CK_VOID_PTR reserved) {
  Decision d = Begin(Fn::C_Finalize);
  if (d.injected != CKR_OK) return End(Fn::C_Finalize, d.injected, d);
  CK_RV rv = T()->C_Finalize(reserved);
  State &s = St();
  if (rv == CKR_OK) {
    {
      std::lock_guard<std::mutex> lock(s.mu);
      s.initialized = false;
      s.sessions.clear();
      WriteStatsLocked(s);
    }
    Audit().Close();
  }
  End(Fn::C_Finalize, rv, d);
  if (rv == CKR_OK) {
    // Not under another call's End: C_GetFunctionList may run concurrently
    // (it answers in any state) and would write to a closed, maybe reused,
    // descriptor. Every call holds `forwarding` shared until it returns.
    d.forwarding.unlock();
    std::unique_lock<std::shared_mutex> exclusive(s.forwarding);
    std::lock_guard<std::mutex> lock(s.mu);
    int fd = s.trace_fd.exchange(-1);
    if (fd >= 0) ::close(fd);
    s.trace_path.clear();
  }
  return rv;
}

CK_RV GetInfo(CK_INFO_PTR info) {
  Decision d = Begin(Fn::C_GetInfo);
  if (d.injected != CKR_OK) return End(Fn::C_GetInfo, d.injected, d);
  return End(Fn::C_GetInfo, T()->C_GetInfo(info), d);
}

CK_RV GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out);

// ---------------------------------------------------------------------------
// Slot and token management

CK_RV GetSlotList(CK_BBOOL token_present, CK_SLOT_ID_PTR list,
                  CK_ULONG_PTR count) {
  constexpr Fn kFn = Fn::C_GetSlotList;
  Decision d = Begin(kFn);
  if (d.injected != CKR_OK) return End(kFn, d.injected, d);
  if (count == nullptr) return End(kFn, CKR_ARGUMENTS_BAD, d);
  CK_RV rv = CKR_OK;
  std::vector<CK_SLOT_ID> slots = TargetSlots(token_present, &rv);
  if (rv != CKR_OK) return End(kFn, rv, d);
  if (token_present != CK_FALSE) {
    State &s = St();
    std::lock_guard<std::mutex> lock(s.mu);
    std::erase_if(slots,
                  [&s](CK_SLOT_ID id) { return IsRemovedLocked(s, id); });
  }
  CK_ULONG n = static_cast<CK_ULONG>(slots.size());
  if (list == nullptr) {
    *count = n;
    return End(kFn, CKR_OK, d);
  }
  if (*count < n) {
    *count = n;
    return End(kFn, CKR_BUFFER_TOO_SMALL, d);
  }
  std::copy(slots.begin(), slots.end(), list);
  *count = n;
  return End(kFn, CKR_OK, d);
}

CK_RV GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info) {
  constexpr Fn kFn = Fn::C_GetSlotInfo;
  Decision d = Begin(kFn);
  if (d.injected != CKR_OK) return End(kFn, d.injected, d);
  CK_RV rv = T()->C_GetSlotInfo(slot, info);
  if (rv == CKR_OK && CheckSlot(slot) == CKR_TOKEN_NOT_PRESENT) {
    info->flags &= ~CKF_TOKEN_PRESENT;
    info->flags |= CKF_REMOVABLE_DEVICE;
  }
  return End(kFn, rv, d);
}

CK_RV GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) {
  return SlotCall(Fn::C_GetTokenInfo, slot,
                  [&] { return T()->C_GetTokenInfo(slot, info); });
}

CK_RV WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR slot,
                       CK_VOID_PTR reserved) {
  constexpr Fn kFn = Fn::C_WaitForSlotEvent;
  Decision d = Begin(kFn);
  if (d.injected != CKR_OK) return End(kFn, d.injected, d);
  return End(kFn, T()->C_WaitForSlotEvent(flags, slot, reserved), d);
}

CK_RV GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list,
                       CK_ULONG_PTR count) {
  return SlotCall(Fn::C_GetMechanismList, slot,
                  [&] { return T()->C_GetMechanismList(slot, list, count); });
}

CK_RV GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type,
                       CK_MECHANISM_INFO_PTR info) {
  return SlotCall(Fn::C_GetMechanismInfo, slot,
                  [&] { return T()->C_GetMechanismInfo(slot, type, info); });
}

CK_RV InitToken(CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len,
                CK_UTF8CHAR_PTR label) {
  return SlotCall(Fn::C_InitToken, slot, [&] {
    CK_RV rv = T()->C_InitToken(slot, pin, pin_len, label);
    if (rv == CKR_OK) {
      // Labels moved: `remove token` rules may now name other slots.
      State &s = St();
      std::lock_guard<std::mutex> lock(s.mu);
      ResolveRemovalLocked(s);
    }
    return rv;
  });
}

CK_RV InitPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len) {
  return SessionCall(Fn::C_InitPIN, h, Op::kNone, [&](const Sess &s) {
    return T()->C_InitPIN(s.target, pin, pin_len);
  });
}

CK_RV SetPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR old_pin, CK_ULONG old_len,
             CK_UTF8CHAR_PTR new_pin, CK_ULONG new_len) {
  return SessionCall(Fn::C_SetPIN, h, Op::kNone, [&](const Sess &s) {
    return T()->C_SetPIN(s.target, old_pin, old_len, new_pin, new_len);
  });
}

// ---------------------------------------------------------------------------
// Session management

CK_RV OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                  CK_NOTIFY /*notify*/, CK_SESSION_HANDLE_PTR out) {
  return SlotCall(Fn::C_OpenSession, slot, [&]() -> CK_RV {
    if (out == nullptr) return CKR_ARGUMENTS_BAD;
    // Callbacks would carry target handles; SoftHSM never calls them.
    CK_SESSION_HANDLE t = 0;
    CK_RV rv = T()->C_OpenSession(slot, flags, application, nullptr, &t);
    if (rv != CKR_OK) return rv;
    State &s = St();
    std::lock_guard<std::mutex> lock(s.mu);
    if (IsRemovedLocked(s, slot)) {  // removed while we were opening
      T()->C_CloseSession(t);
      return CKR_TOKEN_NOT_PRESENT;
    }
    CK_SESSION_HANDLE h = s.next_session++;
    s.sessions[h] = {t, slot, s.generation[slot], false};
    *out = h;
    return CKR_OK;
  });
}

CK_RV CloseSession(CK_SESSION_HANDLE h) {
  constexpr Fn kFn = Fn::C_CloseSession;
  Decision d = Begin(kFn);
  Sess sess;
  CK_RV lookup = LookupSession(h, &sess);
  if (d.injected != CKR_OK) {
    if (lookup == CKR_OK) OnInjected(h, sess, d.injected, Op::kNone);
    return End(kFn, d.injected, d);
  }
  State &s = St();
  if (lookup == CKR_DEVICE_REMOVED) {
    // The token took the session with it: closing it succeeds.
    std::lock_guard<std::mutex> lock(s.mu);
    s.sessions.erase(h);
    return End(kFn, CKR_OK, d);
  }
  if (lookup != CKR_OK) return End(kFn, lookup, d);
  CK_RV rv = T()->C_CloseSession(sess.target);
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.sessions.erase(h);
    // Removed while this close was in flight: already closed, and the
    // target may hand the number to a new session.
    std::erase(s.pending_closes, sess.target);
  }
  return End(kFn, rv, d);
}

CK_RV CloseAllSessions(CK_SLOT_ID slot) {
  return SlotCall(Fn::C_CloseAllSessions, slot, [&] {
    CK_RV rv = T()->C_CloseAllSessions(slot);
    if (rv == CKR_OK) {
      State &s = St();
      std::lock_guard<std::mutex> lock(s.mu);
      std::erase_if(s.sessions,
                    [slot](const auto &kv) { return kv.second.slot == slot; });
    }
    return rv;
  });
}

CK_RV GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info) {
  return SessionCall(Fn::C_GetSessionInfo, h, Op::kNone, [&](const Sess &s) {
    return T()->C_GetSessionInfo(s.target, info);
  });
}

CK_RV GetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR state,
                        CK_ULONG_PTR state_len) {
  return SessionCall(Fn::C_GetOperationState, h, Op::kNone, [&](const Sess &s) {
    return T()->C_GetOperationState(s.target, state, state_len);
  });
}

CK_RV SetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR state,
                        CK_ULONG state_len, CK_OBJECT_HANDLE enc_key,
                        CK_OBJECT_HANDLE auth_key) {
  return SessionCall(Fn::C_SetOperationState, h, Op::kNone, [&](const Sess &s) {
    return T()->C_SetOperationState(s.target, state, state_len, Map(enc_key, s),
                                    Map(auth_key, s));
  });
}

CK_RV Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin,
            CK_ULONG pin_len) {
  return SessionCall(Fn::C_Login, h, Op::kNone, [&](const Sess &s) {
    return T()->C_Login(s.target, user, pin, pin_len);
  });
}

CK_RV Logout(CK_SESSION_HANDLE h) {
  return SessionCall(Fn::C_Logout, h, Op::kNone,
                     [&](const Sess &s) { return T()->C_Logout(s.target); });
}

// ---------------------------------------------------------------------------
// Object management

CK_RV CreateObject(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                   CK_OBJECT_HANDLE_PTR out) {
  // CKO_DATA as the default class: a template without CKA_CLASS is not
  // audited as a key (and the token refuses it anyway).
  const CK_RV refused = KeyTemplate(tmpl, count);
  return SessionCall(
      Fn::C_CreateObject, h, Op::kNone,
      [&](const Sess &s) {
        if (refused != CKR_OK) return refused;
        CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
        CK_RV rv = T()->C_CreateObject(s.target, tmpl, count,
                                       out == nullptr ? nullptr : &obj);
        Audit().NewKey(Fn::C_CreateObject, T(), s.target, CKO_DATA, tmpl, count,
                       rv == CKR_OK ? obj : CK_INVALID_HANDLE);
        if (rv == CKR_OK && out != nullptr) *out = Map(obj, s);
        return rv;
      },
      [&](const Sess &s) {
        Audit().NewKey(Fn::C_CreateObject, T(), s.target, CKO_DATA, tmpl, count,
                       CK_INVALID_HANDLE);
      });
}

CK_RV CopyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object,
                 CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                 CK_OBJECT_HANDLE_PTR out) {
  const CK_RV refused = KeyTemplate(tmpl, count);
  return SessionCall(
      Fn::C_CopyObject, h, Op::kNone,
      [&](const Sess &s) {
        if (refused != CKR_OK) return refused;
        CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
        CK_RV rv = T()->C_CopyObject(s.target, Map(object, s), tmpl, count,
                                     out == nullptr ? nullptr : &obj);
        Audit().ChangedKey(Fn::C_CopyObject, T(), s.target, Map(object, s),
                           tmpl, count, rv == CKR_OK ? obj : CK_INVALID_HANDLE);
        if (rv == CKR_OK && out != nullptr) *out = Map(obj, s);
        return rv;
      },
      [&](const Sess &s) {
        Audit().ChangedKey(Fn::C_CopyObject, T(), s.target, Map(object, s),
                           tmpl, count, CK_INVALID_HANDLE);
      });
}

CK_RV DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object) {
  return SessionCall(Fn::C_DestroyObject, h, Op::kNone, [&](const Sess &s) {
    return T()->C_DestroyObject(s.target, Map(object, s));
  });
}

CK_RV GetObjectSize(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object,
                    CK_ULONG_PTR size) {
  return SessionCall(Fn::C_GetObjectSize, h, Op::kNone, [&](const Sess &s) {
    return T()->C_GetObjectSize(s.target, Map(object, s), size);
  });
}

CK_RV GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object,
                        CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
  auto audit = [&](const Sess &s) {
    Audit().GetAttributeValue(T(), s.target, Map(object, s), tmpl, count);
  };
  return SessionCall(
      Fn::C_GetAttributeValue, h, Op::kNone,
      [&](const Sess &s) {
        audit(s);
        std::optional<CK_RV> refused =
            RefusedRead(s.target, Map(object, s), tmpl, count);
        if (refused) return *refused;
        return T()->C_GetAttributeValue(s.target, Map(object, s), tmpl, count);
      },
      audit);
}

CK_RV SetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object,
                        CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
  auto audit = [&](const Sess &s) {
    Audit().ChangedKey(Fn::C_SetAttributeValue, T(), s.target, Map(object, s),
                       tmpl, count, CK_INVALID_HANDLE);
  };
  return SessionCall(
      Fn::C_SetAttributeValue, h, Op::kNone,
      [&](const Sess &s) {
        audit(s);
        return T()->C_SetAttributeValue(s.target, Map(object, s), tmpl, count);
      },
      audit);
}

CK_RV FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR tmpl,
                      CK_ULONG count) {
  return SessionCall(Fn::C_FindObjectsInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_FindObjectsInit(s.target, tmpl, count);
  });
}

CK_RV FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR objects,
                  CK_ULONG max_count, CK_ULONG_PTR count) {
  return SessionCall(Fn::C_FindObjects, h, Op::kNone, [&](const Sess &s) {
    CK_RV rv = T()->C_FindObjects(s.target, objects, max_count, count);
    if (rv == CKR_OK && objects != nullptr && count != nullptr) {
      for (CK_ULONG i = 0; i < *count && i < max_count; ++i) {
        objects[i] = Map(objects[i], s);
      }
    }
    return rv;
  });
}

CK_RV FindObjectsFinal(CK_SESSION_HANDLE h) {
  return SessionCall(Fn::C_FindObjectsFinal, h, Op::kNone, [&](const Sess &s) {
    return T()->C_FindObjectsFinal(s.target);
  });
}

// ---------------------------------------------------------------------------
// Encryption and decryption

CK_RV EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                  CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_EncryptInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_EncryptInit(s.target, mech, Map(key, s));
  });
}

CK_RV Encrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
              CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_Encrypt, h, Op::kEncrypt, [&](const Sess &s) {
    return T()->C_Encrypt(s.target, data, data_len, out, out_len);
  });
}

CK_RV EncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len,
                    CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_EncryptUpdate, h, Op::kEncrypt, [&](const Sess &s) {
    return T()->C_EncryptUpdate(s.target, part, part_len, out, out_len);
  });
}

CK_RV EncryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_EncryptFinal, h, Op::kEncrypt, [&](const Sess &s) {
    return T()->C_EncryptFinal(s.target, out, out_len);
  });
}

CK_RV DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                  CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_DecryptInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_DecryptInit(s.target, mech, Map(key, s));
  });
}

CK_RV Decrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
              CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_Decrypt, h, Op::kDecrypt, [&](const Sess &s) {
    return T()->C_Decrypt(s.target, data, data_len, out, out_len);
  });
}

CK_RV DecryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len,
                    CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_DecryptUpdate, h, Op::kDecrypt, [&](const Sess &s) {
    return T()->C_DecryptUpdate(s.target, part, part_len, out, out_len);
  });
}

CK_RV DecryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_DecryptFinal, h, Op::kDecrypt, [&](const Sess &s) {
    return T()->C_DecryptFinal(s.target, out, out_len);
  });
}

// ---------------------------------------------------------------------------
// Message digesting

CK_RV DigestInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech) {
  return SessionCall(Fn::C_DigestInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_DigestInit(s.target, mech);
  });
}

CK_RV Digest(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
             CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_Digest, h, Op::kDigest, [&](const Sess &s) {
    return T()->C_Digest(s.target, data, data_len, out, out_len);
  });
}

CK_RV DigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len) {
  return SessionCall(Fn::C_DigestUpdate, h, Op::kDigest, [&](const Sess &s) {
    return T()->C_DigestUpdate(s.target, part, part_len);
  });
}

CK_RV DigestKey(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_DigestKey, h, Op::kDigest, [&](const Sess &s) {
    return T()->C_DigestKey(s.target, Map(key, s));
  });
}

CK_RV DigestFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_DigestFinal, h, Op::kDigest, [&](const Sess &s) {
    return T()->C_DigestFinal(s.target, out, out_len);
  });
}

// ---------------------------------------------------------------------------
// Signing and MACing

CK_RV SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
               CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_SignInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_SignInit(s.target, mech, Map(key, s));
  });
}

CK_RV Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
           CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  return SessionCall(Fn::C_Sign, h, Op::kSign, [&](const Sess &s) {
    return T()->C_Sign(s.target, data, data_len, sig, sig_len);
  });
}

CK_RV SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len) {
  return SessionCall(Fn::C_SignUpdate, h, Op::kSign, [&](const Sess &s) {
    return T()->C_SignUpdate(s.target, part, part_len);
  });
}

CK_RV SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  return SessionCall(Fn::C_SignFinal, h, Op::kSign, [&](const Sess &s) {
    return T()->C_SignFinal(s.target, sig, sig_len);
  });
}

CK_RV SignRecoverInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                      CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_SignRecoverInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_SignRecoverInit(s.target, mech, Map(key, s));
  });
}

CK_RV SignRecover(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
                  CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  return SessionCall(
      Fn::C_SignRecover, h, Op::kSignRecover, [&](const Sess &s) {
        return T()->C_SignRecover(s.target, data, data_len, sig, sig_len);
      });
}

// ---------------------------------------------------------------------------
// Verifying signatures and MACs

CK_RV VerifyInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                 CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_VerifyInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_VerifyInit(s.target, mech, Map(key, s));
  });
}

CK_RV Verify(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
             CK_BYTE_PTR sig, CK_ULONG sig_len) {
  return SessionCall(Fn::C_Verify, h, Op::kVerify, [&](const Sess &s) {
    return T()->C_Verify(s.target, data, data_len, sig, sig_len);
  });
}

CK_RV VerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len) {
  return SessionCall(Fn::C_VerifyUpdate, h, Op::kVerify, [&](const Sess &s) {
    return T()->C_VerifyUpdate(s.target, part, part_len);
  });
}

CK_RV VerifyFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sig_len) {
  return SessionCall(Fn::C_VerifyFinal, h, Op::kVerify, [&](const Sess &s) {
    return T()->C_VerifyFinal(s.target, sig, sig_len);
  });
}

CK_RV VerifyRecoverInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                        CK_OBJECT_HANDLE key) {
  return SessionCall(Fn::C_VerifyRecoverInit, h, Op::kNone, [&](const Sess &s) {
    return T()->C_VerifyRecoverInit(s.target, mech, Map(key, s));
  });
}

CK_RV VerifyRecover(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sig_len,
                    CK_BYTE_PTR data, CK_ULONG_PTR data_len) {
  return SessionCall(
      Fn::C_VerifyRecover, h, Op::kVerifyRecover, [&](const Sess &s) {
        return T()->C_VerifyRecover(s.target, sig, sig_len, data, data_len);
      });
}

// ---------------------------------------------------------------------------
// Dual-function cryptographic operations

CK_RV DigestEncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part,
                          CK_ULONG part_len, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_DigestEncryptUpdate, h, Op::kDigestEncrypt,
                     [&](const Sess &s) {
                       return T()->C_DigestEncryptUpdate(
                           s.target, part, part_len, out, out_len);
                     });
}

CK_RV DecryptDigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part,
                          CK_ULONG part_len, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_DecryptDigestUpdate, h, Op::kDecryptDigest,
                     [&](const Sess &s) {
                       return T()->C_DecryptDigestUpdate(
                           s.target, part, part_len, out, out_len);
                     });
}

CK_RV SignEncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part,
                        CK_ULONG part_len, CK_BYTE_PTR out,
                        CK_ULONG_PTR out_len) {
  return SessionCall(
      Fn::C_SignEncryptUpdate, h, Op::kSignEncrypt, [&](const Sess &s) {
        return T()->C_SignEncryptUpdate(s.target, part, part_len, out, out_len);
      });
}

CK_RV DecryptVerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part,
                          CK_ULONG part_len, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len) {
  return SessionCall(Fn::C_DecryptVerifyUpdate, h, Op::kDecryptVerify,
                     [&](const Sess &s) {
                       return T()->C_DecryptVerifyUpdate(
                           s.target, part, part_len, out, out_len);
                     });
}

// ---------------------------------------------------------------------------
// Key management

CK_RV GenerateKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                  CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                  CK_OBJECT_HANDLE_PTR out) {
  const CK_RV refused = KeyTemplate(tmpl, count);
  return SessionCall(
      Fn::C_GenerateKey, h, Op::kNone,
      [&](const Sess &s) {
        if (refused != CKR_OK) return refused;
        CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
        CK_RV rv = T()->C_GenerateKey(s.target, mech, tmpl, count,
                                      out == nullptr ? nullptr : &obj);
        Audit().NewKey(Fn::C_GenerateKey, T(), s.target, CKO_SECRET_KEY, tmpl,
                       count, rv == CKR_OK ? obj : CK_INVALID_HANDLE);
        if (rv == CKR_OK && out != nullptr) *out = Map(obj, s);
        return rv;
      },
      [&](const Sess &s) {
        Audit().NewKey(Fn::C_GenerateKey, T(), s.target, CKO_SECRET_KEY, tmpl,
                       count, CK_INVALID_HANDLE);
      });
}

CK_RV GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                      CK_ATTRIBUTE_PTR pub_tmpl, CK_ULONG pub_count,
                      CK_ATTRIBUTE_PTR priv_tmpl, CK_ULONG priv_count,
                      CK_OBJECT_HANDLE_PTR pub_out,
                      CK_OBJECT_HANDLE_PTR priv_out) {
  return SessionCall(
      Fn::C_GenerateKeyPair, h, Op::kNone,
      [&](const Sess &s) {
        CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE;
        CK_OBJECT_HANDLE priv = CK_INVALID_HANDLE;
        CK_RV rv = T()->C_GenerateKeyPair(
            s.target, mech, pub_tmpl, pub_count, priv_tmpl, priv_count,
            pub_out == nullptr ? nullptr : &pub,
            priv_out == nullptr ? nullptr : &priv);
        Audit().NewKey(Fn::C_GenerateKeyPair, T(), s.target, CKO_PRIVATE_KEY,
                       priv_tmpl, priv_count,
                       rv == CKR_OK ? priv : CK_INVALID_HANDLE);
        if (rv == CKR_OK && pub_out != nullptr) *pub_out = Map(pub, s);
        if (rv == CKR_OK && priv_out != nullptr) *priv_out = Map(priv, s);
        return rv;
      },
      [&](const Sess &s) {
        Audit().NewKey(Fn::C_GenerateKeyPair, T(), s.target, CKO_PRIVATE_KEY,
                       priv_tmpl, priv_count, CK_INVALID_HANDLE);
      });
}

CK_RV WrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
              CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key,
              CK_BYTE_PTR wrapped, CK_ULONG_PTR wrapped_len) {
  auto audit = [&](const Sess &s) {
    Audit().Wrap(T(), s.target, mech, Map(wrapping_key, s), Map(key, s),
                 wrapped == nullptr);
  };
  return SessionCall(
      Fn::C_WrapKey, h, Op::kNone,
      [&](const Sess &s) {
        audit(s);
        return T()->C_WrapKey(s.target, mech, Map(wrapping_key, s), Map(key, s),
                              wrapped, wrapped_len);
      },
      audit);
}

CK_RV UnwrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                CK_OBJECT_HANDLE unwrapping_key, CK_BYTE_PTR wrapped,
                CK_ULONG wrapped_len, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,
                CK_OBJECT_HANDLE_PTR out) {
  const CK_RV refused = KeyTemplate(tmpl, count);
  return SessionCall(
      Fn::C_UnwrapKey, h, Op::kNone,
      [&](const Sess &s) {
        if (refused != CKR_OK) return refused;
        CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
        CK_RV rv = T()->C_UnwrapKey(s.target, mech, Map(unwrapping_key, s),
                                    wrapped, wrapped_len, tmpl, count,
                                    out == nullptr ? nullptr : &obj);
        Audit().NewKey(Fn::C_UnwrapKey, T(), s.target, CKO_SECRET_KEY, tmpl,
                       count, rv == CKR_OK ? obj : CK_INVALID_HANDLE);
        if (rv == CKR_OK && out != nullptr) *out = Map(obj, s);
        return rv;
      },
      [&](const Sess &s) {
        Audit().NewKey(Fn::C_UnwrapKey, T(), s.target, CKO_SECRET_KEY, tmpl,
                       count, CK_INVALID_HANDLE);
      });
}

CK_RV DeriveKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                CK_OBJECT_HANDLE base_key, CK_ATTRIBUTE_PTR tmpl,
                CK_ULONG count, CK_OBJECT_HANDLE_PTR out) {
  auto audit = [&](const Sess &s, CK_OBJECT_HANDLE created) {
    Audit().NewKey(Fn::C_DeriveKey, T(), s.target, CKO_SECRET_KEY, tmpl, count,
                   created);
    Audit().Derive(T(), s.target, mech, tmpl, count, created);
  };
  const CK_RV refused = KeyTemplate(tmpl, count);
  return SessionCall(
      Fn::C_DeriveKey, h, Op::kNone,
      [&](const Sess &s) {
        if (refused != CKR_OK) return refused;
        CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
        CK_RV rv = T()->C_DeriveKey(s.target, mech, Map(base_key, s), tmpl,
                                    count, out == nullptr ? nullptr : &obj);
        audit(s, rv == CKR_OK ? obj : CK_INVALID_HANDLE);
        if (rv == CKR_OK && out != nullptr) *out = Map(obj, s);
        return rv;
      },
      [&](const Sess &s) { audit(s, CK_INVALID_HANDLE); });
}

// ---------------------------------------------------------------------------
// Random number generation and legacy parallel functions

CK_RV SeedRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR seed, CK_ULONG seed_len) {
  return SessionCall(Fn::C_SeedRandom, h, Op::kNone, [&](const Sess &s) {
    return T()->C_SeedRandom(s.target, seed, seed_len);
  });
}

CK_RV GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG len) {
  return SessionCall(Fn::C_GenerateRandom, h, Op::kNone, [&](const Sess &s) {
    return T()->C_GenerateRandom(s.target, out, len);
  });
}

CK_RV GetFunctionStatus(CK_SESSION_HANDLE h) {
  return SessionCall(Fn::C_GetFunctionStatus, h, Op::kNone, [&](const Sess &s) {
    return T()->C_GetFunctionStatus(s.target);
  });
}

CK_RV CancelFunction(CK_SESSION_HANDLE h) {
  return SessionCall(Fn::C_CancelFunction, h, Op::kNone, [&](const Sess &s) {
    return T()->C_CancelFunction(s.target);
  });
}

// ---------------------------------------------------------------------------

constexpr CK_FUNCTION_LIST kFunctionList = {
    .version = {2, 40},
    .C_Initialize = Initialize,
    .C_Finalize = Finalize,
    .C_GetInfo = GetInfo,
    .C_GetFunctionList = GetFunctionList,
    .C_GetSlotList = GetSlotList,
    .C_GetSlotInfo = GetSlotInfo,
    .C_GetTokenInfo = GetTokenInfo,
    .C_GetMechanismList = GetMechanismList,
    .C_GetMechanismInfo = GetMechanismInfo,
    .C_InitToken = InitToken,
    .C_InitPIN = InitPIN,
    .C_SetPIN = SetPIN,
    .C_OpenSession = OpenSession,
    .C_CloseSession = CloseSession,
    .C_CloseAllSessions = CloseAllSessions,
    .C_GetSessionInfo = GetSessionInfo,
    .C_GetOperationState = GetOperationState,
    .C_SetOperationState = SetOperationState,
    .C_Login = Login,
    .C_Logout = Logout,
    .C_CreateObject = CreateObject,
    .C_CopyObject = CopyObject,
    .C_DestroyObject = DestroyObject,
    .C_GetObjectSize = GetObjectSize,
    .C_GetAttributeValue = GetAttributeValue,
    .C_SetAttributeValue = SetAttributeValue,
    .C_FindObjectsInit = FindObjectsInit,
    .C_FindObjects = FindObjects,
    .C_FindObjectsFinal = FindObjectsFinal,
    .C_EncryptInit = EncryptInit,
    .C_Encrypt = Encrypt,
    .C_EncryptUpdate = EncryptUpdate,
    .C_EncryptFinal = EncryptFinal,
    .C_DecryptInit = DecryptInit,
    .C_Decrypt = Decrypt,
    .C_DecryptUpdate = DecryptUpdate,
    .C_DecryptFinal = DecryptFinal,
    .C_DigestInit = DigestInit,
    .C_Digest = Digest,
    .C_DigestUpdate = DigestUpdate,
    .C_DigestKey = DigestKey,
    .C_DigestFinal = DigestFinal,
    .C_SignInit = SignInit,
    .C_Sign = Sign,
    .C_SignUpdate = SignUpdate,
    .C_SignFinal = SignFinal,
    .C_SignRecoverInit = SignRecoverInit,
    .C_SignRecover = SignRecover,
    .C_VerifyInit = VerifyInit,
    .C_Verify = Verify,
    .C_VerifyUpdate = VerifyUpdate,
    .C_VerifyFinal = VerifyFinal,
    .C_VerifyRecoverInit = VerifyRecoverInit,
    .C_VerifyRecover = VerifyRecover,
    .C_DigestEncryptUpdate = DigestEncryptUpdate,
    .C_DecryptDigestUpdate = DecryptDigestUpdate,
    .C_SignEncryptUpdate = SignEncryptUpdate,
    .C_DecryptVerifyUpdate = DecryptVerifyUpdate,
    .C_GenerateKey = GenerateKey,
    .C_GenerateKeyPair = GenerateKeyPair,
    .C_WrapKey = WrapKey,
    .C_UnwrapKey = UnwrapKey,
    .C_DeriveKey = DeriveKey,
    .C_SeedRandom = SeedRandom,
    .C_GenerateRandom = GenerateRandom,
    .C_GetFunctionStatus = GetFunctionStatus,
    .C_CancelFunction = CancelFunction,
    .C_WaitForSlotEvent = WaitForSlotEvent,
};

CK_RV GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
  Decision d = Begin(Fn::C_GetFunctionList);
  if (d.injected != CKR_OK) return End(Fn::C_GetFunctionList, d.injected, d);
  if (out == nullptr) return End(Fn::C_GetFunctionList, CKR_ARGUMENTS_BAD, d);
  State &s = St();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!LoadTargetLocked(s)) {
      return End(Fn::C_GetFunctionList, CKR_GENERAL_ERROR, d);
    }
  }
  // The list is read-only; PKCS#11 callers must not write to it.
  *out = const_cast<CK_FUNCTION_LIST *>(&kFunctionList);
  return End(Fn::C_GetFunctionList, CKR_OK, d);
}

}  // namespace
}  // namespace hsmstek::faulty

// C_GetFunctionList: the module's only exported symbol. Returns the
// forwarding list (static, never freed) after loading the target module.
extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(
    CK_FUNCTION_LIST_PTR_PTR out) {
  return hsmstek::faulty::GetFunctionList(out);
}
