// exit() while a background thread is inside a token call. The token
// module and OpenSSL registered their teardown before our first background
// activity, so it runs after the exit guard's handler
// (src/common/exit_guard.h); that handler must hold exit() until the call
// is done. A re-armer's C_EncryptInit is delayed by the faulty module; the
// child registers a stand-in for that teardown before the store exists and
// reports, when it runs, how many background activities are still inside.
// Fails without the guard's handler: the stand-in sees the re-armer.
//
// Own process (ctest: faults.exit): an earlier activity in the same
// process would have registered the guard's handler before the stand-in.
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "common/exit_guard.h"
#include "fault_fixture.h"

namespace hsmstek::testing {
namespace {

constexpr int kBoundMs = 60000;  // a hang, not a timing

int g_report_fd = -1;

// Stand-in for the teardown of a library loaded before our threads start.
// Ends the child there: the handlers registered before it belong to the
// parent's test process (its token directory's clean-up among them).
void ReportActivitiesAtTeardown() {
  const char inside = static_cast<char>(exit_guard::ActiveCount());
  (void)!write(g_report_fd, &inside, 1);
  _exit(0);
}

class ExitTest : public FaultTest {
 protected:
  static void SetUpTestSuite() { EnsureFaultStore("exit"); }
};

TEST_F(ExitTest, ExitWaitsForAReArmerInsideTheToken) {
  ASSERT_EQ(exit_guard::ActiveCount(), 0u);
  SetRules("delay C_EncryptInit 300ms\n");
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    g_report_fd = fds[1];
    atexit(ReportActivitiesAtTeardown);
    std::shared_ptr<keystore::KeyStore> store = OpenStore("exit");
    if (!store) _exit(10);
    std::shared_ptr<tls::TicketContext> context = ContextFor(store);
    context->options.prearm = true;
    UniqueSslCtx server = ServerCtx(context, TLS1_3_VERSION);
    UniqueSslCtx client = NewClientCtx(TLS1_3_VERSION);
    if (!server || !client || !context->armed) _exit(11);
    // The server's pool starts arming; its C_EncryptInit sleeps 300 ms.
    if (!Handshake(client.get(), server.get()).ok) _exit(12);
    const auto give_up =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(kBoundMs);
    while (exit_guard::ActiveCount() == 0) {
      if (std::chrono::steady_clock::now() > give_up) _exit(13);
      std::this_thread::yield();
    }
    exit(0);  // with the re-armer inside the token
  }
  close(fds[1]);
  pollfd p{fds[0], POLLIN, 0};
  char inside = 99;
  const bool answered =
      poll(&p, 1, kBoundMs) == 1 && read(fds[0], &inside, 1) == 1;
  if (!answered) kill(pid, SIGKILL);
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(answered) << "the child neither reported nor exited in time";
  EXPECT_EQ(inside, 0) << "background activities still inside the token "
                          "when the libraries' teardown ran";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "child status " << status;
}

}  // namespace
}  // namespace hsmstek::testing
