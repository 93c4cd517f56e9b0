#include "common/log.h"

#include <mutex>
#include <string>

namespace hsmstek::log {
namespace {

std::mutex g_mu;
Sink g_sink = nullptr;
void *g_arg = nullptr;

}  // namespace

void SetSink(Sink sink, void *arg) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_sink = sink;
  g_arg = arg;
}

void Emit(Level level, std::string_view msg) {
  Sink sink;
  void *arg;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    sink = g_sink;
    arg = g_arg;
  }
  if (sink == nullptr) return;
  std::string text(msg);
  sink(static_cast<int>(level), text.c_str(), arg);
}

}  // namespace hsmstek::log
