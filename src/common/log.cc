#include "common/log.h"

#include <atomic>
#include <cstring>
#include <new>

namespace hsmstek::log {
namespace {

// The sink and its argument, replaced as a pair. Lock-free so that a fork
// can never leave a child with a held logging lock; a replaced pair is
// kept for the process (a host sets its sink a handful of times) because
// another thread may still be reading it: all entries stay on g_entries.
struct SinkEntry {
  Sink sink;
  void *arg;
  SinkEntry *next;
};
std::atomic<const SinkEntry *> g_sink{nullptr};
std::atomic<SinkEntry *> g_entries{nullptr};

// Longer messages are cut; the sink needs a NUL-terminated copy and the
// log path must not allocate (it also reports std::bad_alloc).
constexpr size_t kMaxMessage = 1024;

}  // namespace

void SetSink(Sink sink, void *arg) {
  SinkEntry *entry = nullptr;
  if (sink != nullptr) {
    // A pair set before is reused: a host that sets its sink again and
    // again (per request, per reload) must not grow the kept list.
    for (SinkEntry *e = g_entries.load(); e != nullptr; e = e->next) {
      if (e->sink == sink && e->arg == arg) {
        g_sink.store(e, std::memory_order_release);
        return;
      }
    }
    entry = new (std::nothrow) SinkEntry{sink, arg, g_entries.load()};
    if (entry == nullptr) return;  // keeps the previous sink
    while (!g_entries.compare_exchange_weak(entry->next, entry)) {
    }
  }
  g_sink.store(entry, std::memory_order_release);
}

void Emit(Level level, std::string_view msg) noexcept {
  const SinkEntry *entry = g_sink.load(std::memory_order_acquire);
  if (entry == nullptr) return;
  char text[kMaxMessage + 4];
  size_t n = msg.size() <= kMaxMessage ? msg.size() : kMaxMessage;
  std::memcpy(text, msg.data(), n);
  if (n < msg.size()) {
    std::memcpy(text + n, "...", 3);
    n += 3;
  }
  text[n] = '\0';
  entry->sink(static_cast<int>(level), text, entry->arg);
}

size_t KeptSinkEntries() {
  size_t n = 0;
  for (const SinkEntry *e = g_entries.load(); e != nullptr; e = e->next) ++n;
  return n;
}

}  // namespace hsmstek::log
