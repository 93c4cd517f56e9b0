// Helpers for tests that drive libhsmstek_faulty.so (hsm/faulty/README.md):
// write its control file, count calls in its trace, read its audit log.
// Link `hsmstek_faulty_testing`; include "faulty/testing.h".
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace hsmstek::faulty {

// WriteControlFile validates `rules` with the module's own parser and, if
// valid, atomically replaces the control file at `path` (temporary file +
// rename) with `rules` plus a "# serial <n>" line unique in this process, so
// the module always sees a new file and restarts its rule counters. Returns
// an empty string on success, else the parse or I/O error (the file is then
// left unchanged). Not thread-safe for the same path.
std::string WriteControlFile(const std::string &path, std::string_view rules);

// CountCalls returns how many calls of `function` ("C_Sign") the trace file
// at `trace_path` records, counting only results named `result`
// ("CKR_DEVICE_ERROR") when it is not empty. A missing file counts 0.
std::size_t CountCalls(const std::string &trace_path, std::string_view function,
                       std::string_view result = {});

// CountInjected returns how many calls of `function` the trace records as
// failed by a rule.
std::size_t CountInjected(const std::string &trace_path,
                          std::string_view function);

// AuditViolations returns the violation lines of the audit log at `path`
// (summary lines excluded; "wrap" lines excluded when `allow_wrap`). A
// missing file has none.
std::vector<std::string> AuditViolations(const std::string &path,
                                         bool allow_wrap = false);

}  // namespace hsmstek::faulty
