#include "pkcs11/prober.h"

#include <memory>
#include <new>

#include "common/barrier.h"
#include "common/exit_guard.h"

namespace hsmstek::p11 {

Prober::Prober(ProbeFn probe) : probe_(std::move(probe)) {
  exit_guard::Init();  // outside every lock (it registers fork handlers)
  atfork::Register(this);
}

Prober::~Prober() {
  atfork::Unregister(this);
  std::thread *thread;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    thread = thread_;
    thread_ = nullptr;
  }
  cv_.notify_all();
  if (thread != nullptr && thread_fork_count_ == atfork::ForkCount()) {
    thread->join();
    delete thread;
  }
}

bool Prober::Schedule(Clock::time_point at) noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return false;
  if (!due_ || at < *due_) due_ = at;
  const uint64_t forks = atfork::ForkCount();
  if (thread_ == nullptr || thread_fork_count_ != forks) {
    try {
      thread_ = new std::thread([this] { Loop(); });
      thread_fork_count_ = forks;
    } catch (...) {
      barrier::ReportCaught("token prober thread start");
      thread_ = nullptr;
      due_.reset();
      return false;
    }
  }
  cv_.notify_all();
  return true;
}

void Prober::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (!due_) {
      cv_.wait(lock, [this] { return stop_ || due_.has_value(); });
      continue;
    }
    if (Clock::now() < *due_) {
      // Woken early by a nearer Schedule or by stop.
      cv_.wait_until(lock, *due_);
      continue;
    }
    exit_guard::Activity activity;
    if (!activity.ok()) {
      // The process is exiting: parked until stopped (exit_guard.h).
      cv_.wait(lock, [this] { return stop_; });
      return;
    }
    due_.reset();
    lock.unlock();
    std::optional<Clock::time_point> next;
    // An exception leaving a std::thread's body ends the host process.
    try {
      next = probe_();
    } catch (...) {
      barrier::ReportCaught("token probe");
      next = Clock::now() + std::chrono::seconds(1);
    }
    probes_.fetch_add(1);
    lock.lock();
    if (next && (!due_ || *next < *due_)) due_ = next;
  }
}

void Prober::ForkPrepare(atfork::Rank rank) {
  if (rank == atfork::Rank::kLeaf) mu_.lock();
}

void Prober::ForkParent(atfork::Rank rank) {
  if (rank == atfork::Rank::kLeaf) mu_.unlock();
}

void Prober::ForkChild(atfork::Rank rank) {
  if (rank != atfork::Rank::kLeaf) return;
  // The parent's thread does not exist here: leak its object, forget its
  // schedule (the child's tokens start disconnected), and replace the
  // condition variable, whose copy may count the parent's waiter.
  thread_ = nullptr;
  due_.reset();
  new (&cv_) std::condition_variable();
  mu_.unlock();
}

}  // namespace hsmstek::p11
