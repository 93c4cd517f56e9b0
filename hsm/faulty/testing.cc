#include "testing.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "rules.h"

namespace hsmstek::faulty {
namespace {

std::vector<std::string> Lines(const std::string &path) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) lines.push_back(line);
  return lines;
}

std::vector<std::string> Words(const std::string &line) {
  std::vector<std::string> words;
  std::istringstream in(line);
  std::string w;
  while (in >> w) words.push_back(w);
  return words;
}

}  // namespace

std::string WriteControlFile(const std::string &path, std::string_view rules) {
  ParseResult parsed = ParseRules(rules);
  if (!parsed.ok) return "control file rules: " + parsed.error;
  static std::atomic<unsigned long> serial{0};
  std::string text(rules);
  if (!text.empty() && text.back() != '\n') text += '\n';
  text += "# serial " + std::to_string(::getpid()) + "-" +
          std::to_string(++serial) + "\n";
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return "cannot create " + tmp + ": " + std::strerror(errno);
  std::size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return "cannot write " + tmp + ": " + std::strerror(err);
    }
    done += static_cast<std::size_t>(n);
  }
  if (::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    return "cannot replace " + path + ": " + std::strerror(errno);
  }
  return "";
}

std::size_t CountCalls(const std::string &trace_path, std::string_view function,
                       std::string_view result) {
  std::size_t n = 0;
  for (const std::string &line : Lines(trace_path)) {
    // "<pid> <C_Function> <CKR_NAME>[ injected]"
    std::vector<std::string> w = Words(line);
    if (w.size() < 3 || w[1] != function) continue;
    if (!result.empty() && w[2] != result) continue;
    ++n;
  }
  return n;
}

std::size_t CountInjected(const std::string &trace_path,
                          std::string_view function) {
  std::size_t n = 0;
  for (const std::string &line : Lines(trace_path)) {
    std::vector<std::string> w = Words(line);
    if (w.size() >= 4 && w[1] == function && w[3] == "injected") ++n;
  }
  return n;
}

std::vector<std::string> AuditViolations(const std::string &path,
                                         bool allow_wrap) {
  std::vector<std::string> out;
  for (const std::string &line : Lines(path)) {
    std::vector<std::string> w = Words(line);
    if (w.empty() || w[0] == "summary") continue;
    if (allow_wrap && w[0] == "wrap") continue;
    out.push_back(line);
  }
  return out;
}

}  // namespace hsmstek::faulty
