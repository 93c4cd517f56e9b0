// Library logging. Messages go to the callback the host sets (nginx: its
// error log); with no callback they are dropped. The library never writes to
// stderr itself. Messages carry metadata only: never PINs or key values.
#pragma once

#include <cstddef>
#include <string_view>

namespace hsmstek::log {

enum class Level : int { kError = 0, kWarning = 1, kInfo = 2, kDebug = 3 };

using Sink = void (*)(int level, const char *msg, void *arg);

// Installs `sink` (nullptr: drop messages). Thread-safe; lock-free, so a
// fork never leaves a child with a held logging lock.
void SetSink(Sink sink, void *arg);
// Formats nothing; delivers `msg` (cut at 1024 bytes) to the sink if one is
// set. Never throws and never allocates: the exception barriers log through
// it. The sink must not throw either (it is C). Thread-safe.
void Emit(Level level, std::string_view msg) noexcept;

// KeptSinkEntries counts the distinct (sink, arg) pairs ever set: they are
// kept for the process (see log.cc), so this is the log path's memory.
size_t KeptSinkEntries();

inline void Error(std::string_view m) noexcept { Emit(Level::kError, m); }
inline void Warning(std::string_view m) noexcept { Emit(Level::kWarning, m); }
inline void Info(std::string_view m) noexcept { Emit(Level::kInfo, m); }
inline void Debug(std::string_view m) noexcept { Emit(Level::kDebug, m); }

}  // namespace hsmstek::log
