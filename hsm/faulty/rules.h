// The control-file language of the fault-injecting PKCS#11 test module
// (grammar in hsm/faulty/README.md). Parsing is pure: no I/O, no globals.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ck.h"
#include "names.h"

namespace hsmstek::faulty {

// FailRule: `fail <fn|*> after <N> [times <M>|always] with <CKR>`.
// The k-th call (1-based) matched by the rule since the rules were loaded
// fails when k > after and (times == 0 || k <= after + times).
struct FailRule {
  std::optional<Fn> fn;  // nullopt: `*`
  std::uint64_t after = 0;
  std::uint64_t times = 0;  // 0: always
  CK_RV rv = CKR_GENERAL_ERROR;
};

// DelayRule: `delay <fn|*> <N>(us|ms|s)`.
struct DelayRule {
  std::optional<Fn> fn;  // nullopt: `*`
  std::chrono::microseconds delay{0};
};

// RemoveRule: `remove`, `remove slot <id>` or `remove token <label>`.
struct RemoveRule {
  enum class Kind { kAll, kSlot, kToken };
  Kind kind = Kind::kAll;
  CK_SLOT_ID slot = 0;
  std::string label;
};

// RefuseRule: `refuse <CKA_NAME>`: the token does not know the attribute
// (CKR_ATTRIBUTE_TYPE_INVALID for key templates holding it, unavailable
// when read).
struct RefuseRule {
  CK_ATTRIBUTE_TYPE attribute = 0;
};

struct Rules {
  std::vector<FailRule> fails;
  std::vector<RefuseRule> refuses;
  std::vector<DelayRule> delays;
  std::vector<RemoveRule> removes;
};

struct ParseResult {
  bool ok = false;
  Rules rules;
  std::string error;  // "line <n>: <what>" when !ok
};

// ParseRules parses a whole control file. Any bad line makes the whole file
// invalid: ok is false and error names the first bad line. Never throws on
// bad input.
[[nodiscard]] ParseResult ParseRules(std::string_view text);

// MatchesFunction: whether a rule for `rule_fn` (nullopt = `*`) applies to a
// call of `fn`. `*` matches every function except C_GetFunctionList,
// C_Initialize and C_Finalize, which match only when named.
bool MatchesFunction(const std::optional<Fn> &rule_fn, Fn fn);

}  // namespace hsmstek::faulty
