#include "common/log_limit.h"

#include <map>
#include <mutex>

namespace hsmstek::log {
namespace {

struct CauseState {
  int64_t next = 0;
  uint64_t held_back = 0;
  uint64_t order = 0;  // insertion order, to forget the oldest
};

constexpr size_t kMaxCauses = 64;

}  // namespace

std::string CauseOf(const Status &status) {
  return std::to_string(static_cast<int>(status.code())) + "/" +
         std::to_string(status.ckr());
}

void EmitLimited(Level level, std::string_view cause, std::string_view msg,
                 int64_t now, int64_t interval_s) {
  static std::mutex mu;
  static std::map<std::string, CauseState, std::less<>> causes;
  static uint64_t inserted = 0;
  uint64_t held_back = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = causes.find(cause);
    if (it == causes.end()) {
      if (causes.size() >= kMaxCauses) {
        auto oldest = causes.begin();
        for (auto c = causes.begin(); c != causes.end(); ++c) {
          if (c->second.order < oldest->second.order) oldest = c;
        }
        causes.erase(oldest);
      }
      it = causes.emplace(std::string(cause), CauseState{0, 0, ++inserted})
               .first;
    }
    if (now < it->second.next) {
      ++it->second.held_back;
      return;
    }
    held_back = it->second.held_back;
    it->second.held_back = 0;
    it->second.next = now + interval_s;
  }
  if (held_back == 0) {
    Emit(level, msg);
  } else {
    Emit(level, std::string(msg) + " (" + std::to_string(held_back) +
                    " more like it held back)");
  }
}

}  // namespace hsmstek::log
