// The process-wide set-up of the fault tests: every PKCS#11 call of the test
// binary goes through libhsmstek_faulty.so (hsm/faulty/README.md), which
// forwards to SoftHSM, injects the faults the tests ask for, traces every
// call and audits key custody.
//
// InitFaultEnvironment() must run first thing in main(), before
// SoftHsm::Get() loads and initialises the module: it points
// HSMSTEK_TEST_MODULE at the faulty module and sets its HSMSTEK_FAULTY_*
// variables, which the module reads at C_Initialize.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace hsmstek::testing {

// InitFaultEnvironment creates a scratch directory for the control, trace
// and audit files and sets the environment (see above). Aborts the process
// if the faulty module or SoftHSM cannot be found. Call once, single-threaded.
void InitFaultEnvironment();

// The files of the environment (valid after InitFaultEnvironment).
const std::string &ControlPath();
const std::string &TracePath();
const std::string &AuditPath();

// SetRules atomically replaces the control file with `rules` (empty: no
// faults). Fails the current test (ADD_FAILURE) on a rule the module would
// reject, so a typo can never inject nothing.
void SetRules(std::string_view rules);

// One traced PKCS#11 call: "C_Sign", "CKR_OK", injected by a rule or not.
struct TraceCall {
  std::string function;
  std::string result;
  bool injected = false;
  long tid = 0;  // the calling thread (gettid)
  bool ok() const { return result == "CKR_OK"; }
};

// TraceMark returns the current end of the trace; TraceSince the calls
// traced after `mark`. Calls of the whole process: use them only where no
// other thread talks to the token.
size_t TraceMark();
std::vector<TraceCall> TraceSince(size_t mark);

// Count returns how many calls of `function` the window holds (only
// injected ones when `injected_only`).
size_t Count(const std::vector<TraceCall> &calls, std::string_view function,
             bool injected_only = false);

// Seals summarises the ticket seals in a window, recognised by their token
// calls: C_EncryptInit (+ C_Encrypt) and then C_SignInit + C_Sign (libssl
// encrypts first and MACs the result). A seal is good when C_Encrypt and
// C_Sign both returned CKR_OK in the token; only a good seal can produce a
// ticket that resumes. The client keeps the newest ticket: the last seal's.
struct SealSummary {
  int attempts = 0;
  int good = 0;
  bool last_good = false;
};
SealSummary Seals(const std::vector<TraceCall> &calls);

// OpenedInToken returns true iff the window holds a successful C_Sign (the
// MAC check libssl runs first when opening a ticket) followed later by a
// successful C_Decrypt: the token itself verified and decrypted a ticket.
bool OpenedInToken(const std::vector<TraceCall> &calls);

}  // namespace hsmstek::testing
