#include "provider/armed_pool.h"

#include <openssl/rand.h>
#include <pthread.h>

#include <algorithm>
#include <mutex>
#include <string>

#include "common/exit_guard.h"
#include "common/log.h"
#include "pkcs11/module.h"

namespace hsmstek::provider {
namespace {

using Clock = std::chrono::steady_clock;
constexpr std::chrono::milliseconds kBackoffInitial{100};
constexpr std::chrono::milliseconds kBackoffMax{5000};

// One mutex for every pool: pools are few (one per store), the critical
// sections never call the token, and a single lock lets the fork handlers
// below hold it across fork() so that a child never starts with it locked
// by a thread that does not exist there.
std::mutex &PoolMutex() {
  static std::mutex *mu = new std::mutex;  // leaked: used by atfork handlers
  return *mu;
}

// Re-armer threads inside the token module (all pools), and whether a
// fork() waits for them to leave it; guarded by PoolMutex. A thread forked
// away in the middle of a token call leaves the child the locks it held:
// the token's (Acquire and ReturnSession hold it across C_OpenSession and
// C_CloseSession) and the module's own, so the child would hang at its
// first call. The prepare handler waits for these calls to end and no new
// one starts until the fork is done.
size_t g_rearmers_in_token = 0;
bool g_fork_pending = false;
// This thread is a re-armer inside a token call: a module that forks from
// inside a call (p11-kit's remote transport spawns its helper that way)
// must not wait for itself.
thread_local bool t_in_token = false;

std::condition_variable *&ForkCv() {
  static std::condition_variable *cv = new std::condition_variable;  // leaked
  return cv;
}

void LockForFork() {
  std::unique_lock<std::mutex> lock(PoolMutex());
  g_fork_pending = true;
  const size_t self = t_in_token ? 1 : 0;
  ForkCv()->wait(lock, [self] { return g_rearmers_in_token <= self; });
  lock.release();  // held across fork(), unlocked by the handlers below
}

void UnlockAfterForkInParent() {
  g_fork_pending = false;
  PoolMutex().unlock();
  ForkCv()->notify_all();  // re-armers waiting for the fork to be done
}

void UnlockAfterForkInChild() {
  g_fork_pending = false;
  g_rearmers_in_token = 0;                 // their threads are not here
  ForkCv() = new std::condition_variable;  // the old one counts ghosts
  PoolMutex().unlock();
}

void RegisterForkHandlersOnce() {
  static const bool registered =
      pthread_atfork(LockForFork, UnlockAfterForkInParent,
                     UnlockAfterForkInChild) == 0;
  (void)registered;
}

// Marks the calling re-armer as inside the token module while it exists;
// constructed and destroyed with PoolMutex held by `lock`.
class TokenCallScope {
 public:
  explicit TokenCallScope(std::unique_lock<std::mutex> &lock) {
    ForkCv()->wait(lock, [] { return !g_fork_pending; });
    ++g_rearmers_in_token;
    t_in_token = true;
  }
  ~TokenCallScope() {
    t_in_token = false;
    if (g_rearmers_in_token > 0) --g_rearmers_in_token;
    if (g_fork_pending && g_rearmers_in_token == 0) ForkCv()->notify_all();
  }
  TokenCallScope(const TokenCallScope &) = delete;
  TokenCallScope &operator=(const TokenCallScope &) = delete;
};

size_t Index(ArmedKind kind) { return static_cast<size_t>(kind); }

const char *KindName(ArmedKind kind) {
  switch (kind) {
    case ArmedKind::kEncrypt:
      return "encrypt";
    case ArmedKind::kSign:
      return "sign";
    case ArmedKind::kDecryptEcb:
    default:
      return "decrypt";
  }
}

}  // namespace

ArmedPool::ArmedPool(std::shared_ptr<p11::Token> token,
                     ArmedPoolOptions options)
    : token_(std::move(token)),
      options_(options),
      cv_(new std::condition_variable) {
  RegisterForkHandlersOnce();
  exit_guard::Init();  // outside every lock (it registers fork handlers)
}

ArmedPool::~ArmedPool() {
  std::vector<std::thread *> threads;
  std::array<std::deque<ArmedOp>, kArmedKinds> ready;
  std::vector<ArmedOp> excess;
  bool own_threads;
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    stop_ = true;
    own_threads = fork_count_ == p11::Module::ForkCount();
    threads.swap(threads_);
    cv_->notify_all();
  }
  if (own_threads) {
    for (std::thread *t : threads) {
      t->join();
      delete t;
    }
    delete cv_;
  }
  // Cancelled outside the lock (closing a session is a token call). In a
  // forked child, destroying them only forgets the parent's sessions.
  std::lock_guard<std::mutex> lock(PoolMutex());
  ready.swap(ready_);
  excess.swap(excess_);
}

void ArmedPool::ResetAfterForkLocked() {
  const uint64_t forks = p11::Module::ForkCount();
  if (fork_count_ == forks) return;
  // The parent's operations are its own: never used here (an IV is handed
  // out by one process only). Their sessions are forgotten, not closed: the
  // token notices the fork and drops the parent's sessions itself.
  for (auto &ops : ready_) ops.clear();
  excess_.clear();
  pending_.fill(0);
  out_.fill(0);
  threads_.clear();                   // no threads behind them here
  cv_ = new std::condition_variable;  // the old one may count ghost waiters
  fork_count_ = forks;
}

void ArmedPool::StartThreadsLocked() {
  if (!threads_.empty() || stop_) return;
  for (size_t i = 0; i < options_.threads; ++i) {
    threads_.push_back(new std::thread([this] { RearmLoop(); }));
  }
}

void ArmedPool::SetCurrent(CK_OBJECT_HANDLE aes, CK_OBJECT_HANDLE hmac,
                           uint64_t generation) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  ResetAfterForkLocked();
  if (!has_target_ || aes != aes_ || hmac != hmac_ ||
      generation != generation_) {
    has_target_ = true;
    aes_ = aes;
    hmac_ = hmac;
    generation_ = generation;
    drain_ = true;
    cv_->notify_all();
  }
  StartThreadsLocked();
}

bool ArmedPool::IsCurrentLocked(ArmedKind kind, CK_OBJECT_HANDLE key,
                                uint64_t generation) const {
  if (!has_target_ || generation != generation_) return false;
  return key == (kind == ArmedKind::kSign ? hmac_ : aes_);
}

std::optional<ArmedOp> ArmedPool::Take(ArmedKind kind, CK_OBJECT_HANDLE key,
                                       uint64_t generation) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  ResetAfterForkLocked();
  const size_t k = Index(kind);
  std::deque<ArmedOp> &ops = ready_[k];
  if (!IsCurrentLocked(kind, key, generation) || ops.empty() ||
      ops.front().key() != key || ops.front().generation() != generation) {
    ++counters_.misses[k];
    // A miss on the current keys means the re-armer is behind: wake it
    // (never for other epochs' keys, which are never armed).
    if (IsCurrentLocked(kind, key, generation)) cv_->notify_one();
    return std::nullopt;
  }
  ArmedOp op = std::move(ops.front());
  ops.pop_front();
  ++counters_.hits[k];
  if (kind == ArmedKind::kDecryptEcb) ++out_[k];
  // Wake the re-armer at half depth rather than per ticket: a wake-up costs
  // CPU (a futex call each side), a batch costs nothing extra.
  if (ops.size() + pending_[k] + out_[k] <= options_.depth[k] / 2) {
    cv_->notify_one();
  }
  return op;
}

void ArmedPool::Return(ArmedOp op) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  ResetAfterForkLocked();
  const size_t k = Index(op.kind());
  if (out_[k] > 0) --out_[k];
  if (!IsCurrentLocked(op.kind(), op.key(), op.generation()) ||
      ready_[k].size() >= options_.depth[k]) {
    // Cancelled by the re-armer: closing a session is a token call.
    excess_.push_back(std::move(op));
    drain_ = true;
    cv_->notify_one();
    return;
  }
  ready_[k].push_back(std::move(op));
}

void ArmedPool::Lost(ArmedKind kind) {
  std::lock_guard<std::mutex> lock(PoolMutex());
  ResetAfterForkLocked();
  const size_t k = Index(kind);
  if (out_[k] > 0) --out_[k];
  cv_->notify_one();  // arm a replacement
}

ArmedCounters ArmedPool::Snapshot() const {
  std::lock_guard<std::mutex> lock(PoolMutex());
  return counters_;
}

bool ArmedPool::WaitUntilArmed(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(PoolMutex());
  ResetAfterForkLocked();
  cv_->notify_all();  // the re-armer refills only below half depth
  return cv_->wait_for(lock, timeout, [this] {
    if (!has_target_) return false;
    for (size_t k = 0; k < kArmedKinds; ++k) {
      size_t current = 0;
      for (const ArmedOp &op : ready_[k]) {
        if (IsCurrentLocked(op.kind(), op.key(), op.generation())) ++current;
      }
      if (current < options_.depth[k]) return false;
    }
    return true;
  });
}

std::optional<ArmedPool::Task> ArmedPool::NextTaskLocked(
    std::vector<ArmedOp> *stale) {
  if (drain_) {
    drain_ = false;
    counters_.cancelled += excess_.size();
    for (ArmedOp &op : excess_) stale->push_back(std::move(op));
    excess_.clear();
    for (size_t k = 0; k < kArmedKinds; ++k) {
      std::deque<ArmedOp> kept;
      for (ArmedOp &op : ready_[k]) {
        if (IsCurrentLocked(op.kind(), op.key(), op.generation())) {
          kept.push_back(std::move(op));
        } else {
          stale->push_back(std::move(op));
          ++counters_.cancelled;
        }
      }
      ready_[k].swap(kept);
    }
  }
  if (!has_target_) return std::nullopt;
  // The kind furthest below its depth, relative to that depth.
  const Clock::time_point now = Clock::now();
  std::optional<Task> best;
  double best_fill = 1.0;
  for (size_t k = 0; k < kArmedKinds; ++k) {
    if (options_.depth[k] == 0 || now < retry_at_[k]) continue;
    double fill =
        double(ready_[k].size() + pending_[k] + out_[k]) / options_.depth[k];
    if (fill < best_fill) {
      best_fill = fill;
      auto kind = static_cast<ArmedKind>(k);
      best = Task{kind, kind == ArmedKind::kSign ? hmac_ : aes_, generation_};
    }
  }
  return best;
}

void ArmedPool::RearmLoop() {
  std::unique_lock<std::mutex> lock(PoolMutex());
  const uint64_t forks = fork_count_;
  std::condition_variable *cv = cv_;
  while (!stop_ && fork_count_ == forks) {
    // Checked before anything is collected: once the process exits, no
    // session is closed or operation armed (the module is being torn down).
    std::optional<exit_guard::Activity> activity(std::in_place);
    if (!activity->ok()) {
      // Parked, not ended: a thread ending after OpenSSL's teardown leaks
      // its thread-local state (LeakSanitizer reports it). A pool destroyed
      // later still stops it.
      cv->wait(lock, [&] { return stop_ || fork_count_ != forks; });
      break;
    }
    std::vector<ArmedOp> stale;
    std::optional<Task> task = NextTaskLocked(&stale);
    if (!stale.empty()) {
      TokenCallScope in_token(lock);
      lock.unlock();
      stale.clear();  // closes the sessions: cancels their operations
      lock.lock();
      continue;
    }
    if (!task) {
      activity.reset();  // an exit need not wait for an idle re-armer
      // The timeout ends a back-off without a ticket to wake us.
      cv->wait_for(lock, std::chrono::seconds(1));
      continue;
    }
    TokenCallScope in_token(lock);
    if (stop_ || fork_count_ != forks) break;  // changed while waiting
    ++pending_[Index(task->kind)];
    lock.unlock();
    Arm(*task);
    lock.lock();
  }
}

// Runs one *Init on a leased session and files the result (or backs off).
void ArmedPool::Arm(const Task &task) {
  const size_t k = Index(task.kind);
  std::array<uint8_t, 16> iv{};
  Status status;
  std::optional<ArmedOp> armed;
  Result<p11::Session> session = token_->Acquire();
  if (!session.ok()) {
    status = session.status();
  } else if (session->generation() != task.generation) {
    status = FailedPrecondition("token reconnected since the keys were set");
  } else if (task.kind == ArmedKind::kEncrypt &&
             RAND_bytes(iv.data(), static_cast<int>(iv.size())) != 1) {
    status = Internal("no random IV");
  } else {
    CK_MECHANISM mechanism{CKM_SHA256_HMAC, nullptr, 0};
    if (task.kind == ArmedKind::kEncrypt) {
      mechanism = {CKM_AES_CBC_PAD, iv.data(), static_cast<CK_ULONG>(16)};
      status = P11_CALL(*session, C_EncryptInit, session->handle(), &mechanism,
                        task.key);
    } else if (task.kind == ArmedKind::kSign) {
      status = P11_CALL(*session, C_SignInit, session->handle(), &mechanism,
                        task.key);
    } else {
      mechanism = {CKM_AES_ECB, nullptr, 0};
      status = P11_CALL(*session, C_DecryptInit, session->handle(), &mechanism,
                        task.key);
    }
    if (status.ok()) {
      armed.emplace(std::move(*session), task.kind, task.key, task.generation,
                    iv);
    } else {
      // As on the on-demand path: a session whose *Init failed is closed,
      // never handed to a later user with whatever the module left active.
      session->Discard();
    }
  }
  std::optional<ArmedOp> discard;  // destroyed after the lock is released
  bool first_failure = false;
  {
    std::lock_guard<std::mutex> lock(PoolMutex());
    if (pending_[k] > 0) --pending_[k];
    if (!status.ok()) {
      ++counters_.failed[k];
      backoff_[k] = backoff_[k].count() == 0
                        ? kBackoffInitial
                        : std::min(backoff_[k] * 2, kBackoffMax);
      retry_at_[k] = Clock::now() + backoff_[k];
      first_failure = backoff_[k] == kBackoffInitial;
    } else {
      backoff_[k] = std::chrono::milliseconds(0);
      ++counters_.armed[k];
      if (stop_ || fork_count_ != p11::Module::ForkCount() ||
          !IsCurrentLocked(task.kind, task.key, task.generation)) {
        discard = std::move(armed);
        ++counters_.cancelled;
      } else {
        ready_[k].push_back(std::move(*armed));
        cv_->notify_all();  // WaitUntilArmed; free without waiters
      }
    }
  }
  // Logged with no lock held: a host's sink that forks, exits or blocks
  // must not do so under the pool's lock (fork and exit handlers take it).
  if (first_failure) {
    log::Warning(std::string("hsmstek: pre-arming ") + KindName(task.kind) +
                 " operations failed (" + status.message() +
                 "); tickets use on-demand token calls meanwhile");
  }
}

}  // namespace hsmstek::provider
