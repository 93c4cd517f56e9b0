// fuzz_replay runs every fuzz target over its seed corpus with any
// compiler, so the corpus (and any crash reproducer added to it) is
// replayed in the normal test run.
//
// Usage: fuzz_replay <corpus-root> [target]
// Each target reads every regular file under <corpus-root>/<target>/. A
// failed invariant aborts; an empty or missing corpus directory fails.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

namespace hsmstek::fuzz {
int FuzzBundle(const uint8_t *data, size_t size);
int FuzzDurationTime(const uint8_t *data, size_t size);
int FuzzLegacyFile(const uint8_t *data, size_t size);
int FuzzPolicy(const uint8_t *data, size_t size);
#ifdef HSMSTEK_FUZZ_TOKEN_TARGETS
int FuzzTicketTls12(const uint8_t *data, size_t size);
int FuzzTicketTls13(const uint8_t *data, size_t size);
int FuzzUri(const uint8_t *data, size_t size);
#endif
}  // namespace hsmstek::fuzz

namespace {

struct Target {
  const char *name;
  int (*run)(const uint8_t *, size_t);
};

constexpr Target kTargets[] = {
    {"bundle", hsmstek::fuzz::FuzzBundle},
    {"duration_time", hsmstek::fuzz::FuzzDurationTime},
    {"legacy_file", hsmstek::fuzz::FuzzLegacyFile},
    {"policy", hsmstek::fuzz::FuzzPolicy},
#ifdef HSMSTEK_FUZZ_TOKEN_TARGETS
    {"ticket_tls12", hsmstek::fuzz::FuzzTicketTls12},
    {"ticket_tls13", hsmstek::fuzz::FuzzTicketTls13},
    {"uri", hsmstek::fuzz::FuzzUri},
#endif
};

// Returns the number of inputs replayed, or -1 if the corpus is unusable.
int Replay(const Target &target, const std::filesystem::path &dir) {
  std::error_code ec;
  std::vector<std::filesystem::path> files;
  for (const auto &entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.is_regular_file()) files.push_back(entry.path());
  }
  if (ec || files.empty()) {
    std::fprintf(stderr, "%s: no corpus files in %s\n", target.name,
                 dir.c_str());
    return -1;
  }
  for (const auto &file : files) {
    std::ifstream in(file, std::ios::binary);
    const std::string data((std::istreambuf_iterator<char>(in)),
                           std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) {
      std::fprintf(stderr, "%s: cannot read %s\n", target.name, file.c_str());
      return -1;
    }
    target.run(reinterpret_cast<const uint8_t *>(data.data()), data.size());
  }
  return static_cast<int>(files.size());
}

}  // namespace

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: %s <corpus-root> [target]\n", argv[0]);
    return 2;
  }
  const std::filesystem::path root = argv[1];
  const std::string_view only = argc == 3 ? argv[2] : "";
  int failures = 0;
  bool matched = false;
  for (const Target &t : kTargets) {
    if (!only.empty() && only != t.name) continue;
    matched = true;
    const int n = Replay(t, root / t.name);
    if (n < 0) {
      ++failures;
    } else {
      std::printf("%s: replayed %d inputs\n", t.name, n);
    }
  }
  if (!matched) {
    std::fprintf(stderr, "unknown target %s\n", std::string(only).c_str());
    return 2;
  }
  return failures == 0 ? 0 : 1;
}
