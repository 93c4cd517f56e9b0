// hsmstek: the operator's tool for session-ticket keys in a PKCS#11 token.
// See docs/CLI.md. Exit codes: 0 success, 1 error, 2 usage error.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "cli/common.h"
#include "common/log.h"

namespace hsmstek::cli {
namespace {

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

void StderrSink(int level, const char *msg, void * /*arg*/) {
  static const char *const kLevels[] = {"error", "warning", "info", "debug"};
  const char *name = level >= 0 && level <= 3 ? kLevels[level] : "log";
  std::fprintf(stderr, "hsmstek: [%s] %s\n", name, Redact(msg).c_str());
}

int Main(int argc, char **argv) {
  // Before any PIN or key file is read.
  Status no_core = DisableCoreDumps();
  if (!no_core.ok()) {
    std::cerr << "hsmstek: warning: cannot disable core dumps: "
              << no_core.message() << "\n";
  }
  CLI::App app(
      "hsmstek keeps TLS session-ticket keys inside a PKCS#11 token.\n"
      "Stores are named by RFC 7512 URIs whose object= is the store label, "
      "e.g.\n  'pkcs11:token=edge;object=tickets?module-path=/usr/lib/softhsm/"
      "libsofthsm2.so&pin-source=file:/etc/hsmstek/pin'",
      "hsmstek");
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose,
               "Print the library's log messages (metadata only) to stderr");
  std::vector<Command> commands;
  RegisterProvision(app, commands);
  RegisterStatus(app, commands);
  RegisterLegacy(app, commands);
  RegisterReplicate(app, commands);
  RegisterSigner(app, commands);
  RegisterSelfTest(app, commands);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success &e) {
    return app.exit(e);  // --help
  } catch (const CLI::ParseError &e) {
    std::cerr << "hsmstek: " << Redact(e.what())
              << "\nRun `hsmstek --help` or `hsmstek <command> --help` for "
                 "usage.\n";
    return kExitUsage;
  }
  if (verbose) log::SetSink(&StderrSink, nullptr);
  for (const Command &command : commands) {
    if (!command.app->parsed()) continue;
    Status status = command.run();
    std::cout.flush();
    if (!status.ok()) {
      std::cerr << "hsmstek: " << Redact(status.message()) << "\n";
      return kExitError;
    }
    return 0;
  }
  std::cerr << "hsmstek: no command given\n";
  return kExitUsage;
}

}  // namespace
}  // namespace hsmstek::cli

int main(int argc, char **argv) {
  // CLI11 and the standard library may throw; nothing escapes main.
  try {
    return hsmstek::cli::Main(argc, argv);
  } catch (const std::exception &e) {
    std::fprintf(stderr, "hsmstek: internal error: %s\n",
                 hsmstek::cli::Redact(e.what()).c_str());
  } catch (...) {
    std::fprintf(stderr, "hsmstek: internal error\n");
  }
  return 1;
}
