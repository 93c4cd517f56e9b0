#include "fault_env.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "faulty/testing.h"
#include "softhsm.h"

namespace hsmstek::testing {
namespace {

namespace fs = std::filesystem;

std::string g_dir, g_control, g_trace, g_audit;

[[noreturn]] void Die(const std::string &what) {
  std::fprintf(stderr, "fault tests: %s\n", what.c_str());
  std::abort();
}

// SoftHSM's module, resolved here because SoftHsmModulePath() will name the
// faulty module once HSMSTEK_TEST_MODULE is set.
std::string SoftHsmTarget() {
  if (const char *p = std::getenv("HSMSTEK_FAULTY_TARGET")) return p;
  for (const char *p : {"/usr/lib/softhsm/libsofthsm2.so",
                        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"}) {
    if (fs::exists(p)) return p;
  }
  Die("SoftHSM2 module not found; run scripts/install-deps.sh");
}

}  // namespace

void InitFaultEnvironment() {
  if (!fs::exists(HSMSTEK_FAULTY_MODULE)) {
    Die(std::string("faulty module not built: ") + HSMSTEK_FAULTY_MODULE);
  }
  g_dir = MakeTempDir("hsmstek-faults-");
  g_control = g_dir + "/control";
  g_trace = g_dir + "/trace";
  g_audit = g_dir + "/audit";
  setenv("HSMSTEK_TEST_MODULE", HSMSTEK_FAULTY_MODULE, 1);
  setenv("HSMSTEK_FAULTY_TARGET", SoftHsmTarget().c_str(), 1);
  setenv("HSMSTEK_FAULTY_CONTROL", g_control.c_str(), 1);
  setenv("HSMSTEK_FAULTY_TRACE", g_trace.c_str(), 1);
  // Round-trip counts on the handshake thread (round_trip_test.cc).
  setenv("HSMSTEK_FAULTY_TRACE_THREADS", "1", 1);
  // The audit runs alongside the faults: a recovery path must not weaken
  // key custody either. Checked at exit by main().
  setenv("HSMSTEK_FAULTY_AUDIT", g_audit.c_str(), 1);
  if (std::getenv("HSMSTEK_KEEP_TOKENS") == nullptr) {
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(g_dir, ec);
    });
  }
}

const std::string &ControlPath() { return g_control; }
const std::string &TracePath() { return g_trace; }
const std::string &AuditPath() { return g_audit; }

void SetRules(std::string_view rules) {
  std::string error = faulty::WriteControlFile(g_control, rules);
  if (!error.empty()) ADD_FAILURE() << error;
}

size_t TraceMark() {
  std::error_code ec;
  auto size = fs::file_size(g_trace, ec);
  return ec ? 0 : static_cast<size_t>(size);
}

std::vector<TraceCall> TraceSince(size_t mark) {
  std::vector<TraceCall> calls;
  std::ifstream in(g_trace, std::ios::binary);
  if (!in) return calls;
  in.seekg(static_cast<std::streamoff>(mark));
  std::string line;
  while (std::getline(in, line)) {
    // "<pid> <C_Function> <CKR_NAME or 0xHEX>[ injected][ template=...][ tid=<n>]"
    std::istringstream fields(line);
    std::string pid, word;
    TraceCall call;
    if (!(fields >> pid >> call.function >> call.result)) continue;
    while (fields >> word) {
      if (word == "injected") call.injected = true;
      if (word.rfind("tid=", 0) == 0) call.tid = std::stol(word.substr(4));
    }
    calls.push_back(std::move(call));
  }
  return calls;
}

size_t Count(const std::vector<TraceCall> &calls, std::string_view function,
             bool injected_only) {
  size_t n = 0;
  for (const TraceCall &c : calls) {
    if (c.function == function && (!injected_only || c.injected)) ++n;
  }
  return n;
}

SealSummary Seals(const std::vector<TraceCall> &calls) {
  SealSummary summary;
  bool in_seal = false, encrypted = false, failed = false;
  // A seal whose MAC never reached the token (its key handle went stale
  // when the cipher's fault dropped the connection) has no C_Sign: it ends
  // at the next seal or with the window, as a failed seal.
  auto finish = [&](bool good) {
    if (good) ++summary.good;
    summary.last_good = good;
    in_seal = false;
  };
  for (const TraceCall &c : calls) {
    if (c.function == "C_EncryptInit") {
      if (in_seal) finish(false);
      ++summary.attempts;
      in_seal = true;
      encrypted = false;
      failed = !c.ok();
    } else if (!in_seal) {
      continue;
    } else if (c.function == "C_Encrypt") {
      encrypted = c.ok();
      failed = failed || !c.ok();
    } else if (c.function == "C_SignInit" && !c.ok()) {
      finish(false);  // no C_Sign follows: the MAC is a stand-in
    } else if (c.function == "C_Sign") {
      finish(encrypted && c.ok() && !failed);
    }
  }
  if (in_seal) finish(false);
  return summary;
}

bool OpenedInToken(const std::vector<TraceCall> &calls) {
  bool in_seal = false, mac_checked = false;
  for (const TraceCall &c : calls) {
    if (c.function == "C_EncryptInit") {
      in_seal = true;
    } else if (c.function == "C_SignInit" && !c.ok()) {
      in_seal = false;
    } else if (c.function == "C_Sign") {
      if (!in_seal && c.ok()) mac_checked = true;
      in_seal = false;
    } else if (c.function == "C_Decrypt" && c.ok() && mac_checked) {
      return true;
    }
  }
  return false;
}

}  // namespace hsmstek::testing
