#include "common/barrier.h"

#include <atomic>
#include <cstdio>
#include <exception>

#include "common/log.h"

namespace hsmstek::barrier {
namespace {

std::atomic<uint64_t> g_caught{0};

}  // namespace

const char *ReportCaught(const char *where) noexcept {
  g_caught.fetch_add(1);
  const char *what = "unknown exception";
  try {
    throw;  // the exception being handled, to read its what()
  } catch (const std::exception &e) {
    what = e.what();
  } catch (...) {
  }
  // A fixed buffer: the barrier may be handling std::bad_alloc.
  char text[256];
  std::snprintf(text, sizeof(text), "hsmstek: %s: exception stopped (%s)",
                where, what);
  log::Error(text);
  return what;
}

uint64_t CaughtCount() noexcept { return g_caught.load(); }

}  // namespace hsmstek::barrier
