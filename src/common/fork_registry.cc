#include "common/fork_registry.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

namespace hsmstek::atfork {
namespace {

std::atomic<uint64_t> g_fork_count{0};

// Leaked: participants may unregister during static destruction.
struct Registry {
  std::mutex mu;  // held from prepare until parent/child are done
  std::vector<Participant *> participants;
};

Registry &GetRegistry();

void Prepare() {
  Registry &r = GetRegistry();
  r.mu.lock();
  for (int rank = 0; rank < kRankCount; ++rank) {
    for (Participant *p : r.participants) {
      p->ForkPrepare(static_cast<Rank>(rank));
    }
  }
}

void Parent() {
  Registry &r = GetRegistry();
  for (int rank = kRankCount - 1; rank >= 0; --rank) {
    for (auto it = r.participants.rbegin(); it != r.participants.rend(); ++it) {
      (*it)->ForkParent(static_cast<Rank>(rank));
    }
  }
  r.mu.unlock();
}

void Child() {
  g_fork_count.fetch_add(1);
  Registry &r = GetRegistry();
  for (int rank = kRankCount - 1; rank >= 0; --rank) {
    for (auto it = r.participants.rbegin(); it != r.participants.rend(); ++it) {
      (*it)->ForkChild(static_cast<Rank>(rank));
    }
  }
  r.mu.unlock();
}

Registry &GetRegistry() {
  static Registry *registry = [] {
    auto *r = new Registry;
    pthread_atfork(Prepare, Parent, Child);
    return r;
  }();
  return *registry;
}

}  // namespace

void Register(Participant *p) {
  Registry &r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.participants.push_back(p);
}

void Unregister(Participant *p) {
  Registry &r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.participants.erase(
      std::remove(r.participants.begin(), r.participants.end(), p),
      r.participants.end());
}

uint64_t ForkCount() {
  // The handlers exist before anything can depend on the count.
  (void)GetRegistry();
  return g_fork_count.load();
}

}  // namespace hsmstek::atfork
