// The per-thread ticket IV pool: every IV handed out once, threads never
// share one, and a child process never repeats its parent's.
#include "tls/iv_pool.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <set>
#include <thread>
#include <vector>

namespace hsmstek::tls {
namespace {

using Iv = std::array<unsigned char, kTicketIvLength>;

std::vector<Iv> Draw(size_t n) {
  std::vector<Iv> ivs(n);
  for (Iv &iv : ivs) EXPECT_TRUE(NextTicketIv(iv.data()));
  return ivs;
}

size_t CountDistinct(const std::vector<Iv> &ivs) {
  return std::set<Iv>(ivs.begin(), ivs.end()).size();
}

TEST(IvPoolTest, EveryIvIsHandedOutOnceAcrossBatches) {
  // Many batches: an index or refill bug repeats IVs.
  std::vector<Iv> ivs = Draw(5000);
  EXPECT_EQ(CountDistinct(ivs), ivs.size());
}

TEST(IvPoolTest, ThreadsNeverShareAnIv) {
  std::vector<Iv> a, b;
  std::thread ta([&] { a = Draw(1000); });
  std::thread tb([&] { b = Draw(1000); });
  ta.join();
  tb.join();
  a.insert(a.end(), b.begin(), b.end());
  EXPECT_EQ(CountDistinct(a), a.size());
}

TEST(IvPoolTest, ForkedChildDoesNotReuseTheParentsBatch) {
  // Leave the parent's pool holding the rest of a batch at fork time.
  Iv first;
  ASSERT_TRUE(NextTicketIv(first.data()));
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  constexpr size_t kCount = 64;  // more than a batch
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    for (Iv &iv : Draw(kCount)) {
      if (write(fds[1], iv.data(), iv.size()) != ssize_t(iv.size())) _exit(2);
    }
    _exit(0);
  }
  close(fds[1]);
  std::vector<Iv> all = Draw(kCount);
  for (size_t i = 0; i < kCount; ++i) {
    Iv iv;
    ASSERT_EQ(read(fds[0], iv.data(), iv.size()), ssize_t(iv.size()));
    all.push_back(iv);
  }
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  all.push_back(first);
  EXPECT_EQ(CountDistinct(all), all.size());
}

}  // namespace
}  // namespace hsmstek::tls
