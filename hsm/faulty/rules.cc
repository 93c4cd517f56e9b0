#include "rules.h"

#include <limits>

namespace hsmstek::faulty {
namespace {

constexpr std::uint64_t kMaxCount = 1000000000;  // 1e9: plenty for tests
constexpr std::chrono::microseconds kMaxDelay = std::chrono::seconds(10);

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r'; }

std::vector<std::string_view> Split(std::string_view line) {
  std::vector<std::string_view> words;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsSpace(line[i])) ++i;
    std::size_t start = i;
    while (i < line.size() && !IsSpace(line[i])) ++i;
    if (i > start) words.push_back(line.substr(start, i - start));
  }
  return words;
}

// ParseDecimal accepts 1 to 20 ASCII digits without overflow.
std::optional<std::uint64_t> ParseDecimal(std::string_view s) {
  if (s.empty() || s.size() > 20) return std::nullopt;
  std::uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    std::uint64_t d = static_cast<std::uint64_t>(c - '0');
    if (v > (std::numeric_limits<std::uint64_t>::max() - d) / 10) {
      return std::nullopt;
    }
    v = v * 10 + d;
  }
  return v;
}

// Built with append: GCC 12 -O3 reports a false -Wrestrict on
// "'" + std::string(s).
std::string Quote(std::string_view s) {
  return std::string("'").append(s).append("'");
}

// One parsed line: either nothing (blank/comment) or one directive, or an
// error message without the "line N: " prefix.
struct LineResult {
  std::string error;
  bool insert = false;
};

bool ParseFunction(std::string_view word, std::optional<Fn> *out,
                   std::string *error) {
  if (word == "*") {
    *out = std::nullopt;
    return true;
  }
  std::optional<Fn> fn = FnFromName(word);
  if (!fn) {
    *error = "unknown function " + Quote(word) +
             " (use a C_* name of PKCS#11 v2.40 or '*')";
    return false;
  }
  *out = fn;
  return true;
}

std::string ParseFail(const std::vector<std::string_view> &w, Rules *rules) {
  constexpr char kUsage[] =
      "expected 'fail <C_Function|*> after <N> [times <M>|always] with "
      "<CKR_NAME>'";
  FailRule rule;
  std::string error;
  if (w.size() < 6 || w.size() > 8 || w[2] != "after") return kUsage;
  if (!ParseFunction(w[1], &rule.fn, &error)) return error;
  std::optional<std::uint64_t> after = ParseDecimal(w[3]);
  if (!after || *after > kMaxCount) {
    return "bad count " + Quote(w[3]) + " after 'after' (0 to 1000000000)";
  }
  rule.after = *after;
  std::size_t with = 4;
  if (w.size() == 7) {
    if (w[4] != "always") return kUsage;
    with = 5;
  } else if (w.size() == 8) {
    if (w[4] != "times") return kUsage;
    std::optional<std::uint64_t> times = ParseDecimal(w[5]);
    if (!times || *times == 0 || *times > kMaxCount) {
      return "bad count " + Quote(w[5]) + " after 'times' (1 to 1000000000)";
    }
    rule.times = *times;
    with = 6;
  }
  if (w[with] != "with" || with + 2 != w.size()) return kUsage;
  std::optional<CK_RV> rv = RvFromName(w[with + 1]);
  if (!rv) {
    return "unknown return value " + Quote(w[with + 1]) +
           " (use a CKR_* name or 0x<hex>)";
  }
  if (*rv == CKR_OK) return "CKR_OK cannot be injected";
  rule.rv = *rv;
  rules->fails.push_back(rule);
  return "";
}

std::string ParseDelay(const std::vector<std::string_view> &w, Rules *rules) {
  DelayRule rule;
  std::string error;
  if (w.size() != 3) return "expected 'delay <C_Function|*> <N>(us|ms|s)'";
  if (!ParseFunction(w[1], &rule.fn, &error)) return error;
  std::string_view d = w[2];
  std::uint64_t scale = 0;
  std::size_t unit = 0;
  if (d.size() > 2 && d.substr(d.size() - 2) == "us") {
    scale = 1;
    unit = 2;
  } else if (d.size() > 2 && d.substr(d.size() - 2) == "ms") {
    scale = 1000;
    unit = 2;
  } else if (d.size() > 1 && d.back() == 's') {
    scale = 1000000;
    unit = 1;
  }
  std::optional<std::uint64_t> n =
      scale == 0 ? std::nullopt : ParseDecimal(d.substr(0, d.size() - unit));
  if (!n) return "bad duration " + Quote(d) + " (use e.g. 200us, 5ms, 1s)";
  if (*n > static_cast<std::uint64_t>(kMaxDelay.count()) / scale) {
    return "duration " + Quote(d) + " above the 10s limit";
  }
  rule.delay = std::chrono::microseconds(*n * scale);
  rules->delays.push_back(rule);
  return "";
}

// `remove token` takes the rest of the line as the label, so labels may
// contain spaces; `line` is the whole line.
std::string ParseRemove(const std::vector<std::string_view> &w,
                        std::string_view line, Rules *rules) {
  constexpr char kUsage[] =
      "expected 'remove', 'remove slot <id>' or 'remove token <label>'";
  RemoveRule rule;
  if (w.size() == 1) {
    rule.kind = RemoveRule::Kind::kAll;
  } else if (w[1] == "slot") {
    if (w.size() != 3) return kUsage;
    std::optional<std::uint64_t> slot = ParseDecimal(w[2]);
    if (!slot || *slot > std::numeric_limits<CK_SLOT_ID>::max()) {
      return "bad slot id " + Quote(w[2]) + " (decimal)";
    }
    rule.kind = RemoveRule::Kind::kSlot;
    rule.slot = static_cast<CK_SLOT_ID>(*slot);
  } else if (w[1] == "token") {
    if (w.size() < 3) return kUsage;
    // The label runs from its first word to the end of the line, trimmed.
    std::size_t start = static_cast<std::size_t>(w[2].data() - line.data());
    std::size_t end = line.size();
    while (end > start && IsSpace(line[end - 1])) --end;
    rule.label = std::string(line.substr(start, end - start));
    if (rule.label.size() > 32) {
      return "token label longer than 32 bytes";
    }
    rule.kind = RemoveRule::Kind::kToken;
  } else {
    return kUsage;
  }
  rules->removes.push_back(rule);
  return "";
}

std::string ParseRefuse(const std::vector<std::string_view> &w, Rules *rules) {
  if (w.size() != 2) return "expected 'refuse <CKA_NAME>'";
  std::optional<CK_ATTRIBUTE_TYPE> a = AttributeFromName(w[1]);
  if (!a) return "unknown attribute " + Quote(w[1]) + " (use a CKA_* name)";
  rules->refuses.push_back(RefuseRule{*a});
  return "";
}

LineResult ParseLine(std::string_view line, Rules *rules) {
  LineResult result;
  std::vector<std::string_view> w = Split(line);
  if (w.empty() || w[0][0] == '#') return result;
  if (w[0] == "fail") {
    result.error = ParseFail(w, rules);
  } else if (w[0] == "delay") {
    result.error = ParseDelay(w, rules);
  } else if (w[0] == "refuse") {
    result.error = ParseRefuse(w, rules);
  } else if (w[0] == "remove") {
    result.error = ParseRemove(w, line, rules);
  } else if (w[0] == "insert") {
    if (w.size() != 1) {
      result.error = "'insert' takes no arguments";
    } else {
      result.insert = true;
    }
  } else {
    result.error = "unknown directive " + Quote(w[0]) +
                   " (fail, delay, refuse, remove, insert or # comment)";
  }
  return result;
}

}  // namespace

ParseResult ParseRules(std::string_view text) {
  ParseResult result;
  bool insert = false;
  int line_no = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    ++line_no;
    std::size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    std::string_view line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.find('\0') != std::string_view::npos) {
      result.error = "line " + std::to_string(line_no) + ": NUL byte";
      return result;
    }
    LineResult lr = ParseLine(line, &result.rules);
    if (!lr.error.empty()) {
      result.error = "line " + std::to_string(line_no) + ": " + lr.error;
      result.rules = Rules();
      return result;
    }
    insert = insert || lr.insert;
  }
  if (insert && !result.rules.removes.empty()) {
    result.error = "'insert' and 'remove' in the same file";
    result.rules = Rules();
    return result;
  }
  result.ok = true;
  return result;
}

bool MatchesFunction(const std::optional<Fn> &rule_fn, Fn fn) {
  if (rule_fn) return *rule_fn == fn;
  return fn != Fn::C_GetFunctionList && fn != Fn::C_Initialize &&
         fn != Fn::C_Finalize;
}

}  // namespace hsmstek::faulty
