// Fork is a normal event (docs/TESTING.md, "Fork, threads and exceptions"): a
// server opens its store, serves, then forks workers. Each child's very first
// TLS 1.3 and TLS 1.2 resumption resumes (the token reconnects before any
// cached handle of the parent is used), each child issues and resumes its own
// tickets, and the parent, whose state nothing in a child touched, still
// resumes afterwards.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include "tls_fixture.h"

namespace hsmstek::testing {
namespace {

constexpr int kChildren = 8;

// A copy of `session` to offer again (by DER: a TLS 1.3 client does not
// offer one session object twice).
UniqueSslSession Copy(const SSL_SESSION *session) {
  int len = i2d_SSL_SESSION(const_cast<SSL_SESSION *>(session), nullptr);
  std::vector<unsigned char> der(static_cast<size_t>(len));
  unsigned char *p = der.data();
  i2d_SSL_SESSION(const_cast<SSL_SESSION *>(session), &p);
  const unsigned char *q = der.data();
  return UniqueSslSession(d2i_SSL_SESSION(nullptr, &q, len));
}

// Server contexts with no session cache: every resumption is a ticket the
// token opened, never a cache entry the child inherited.
UniqueSslCtx TicketOnly(UniqueSslCtx ctx) {
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  return ctx;
}

class ForkTest : public TlsTest {
 protected:
  static void SetUpTestSuite() { SoftHsm::Get().CreateToken("fork"); }
};

// What a child checks; its exit status names the first failed step.
enum ChildStep : int {
  kOk = 0,
  kFirstTls13Resumption = 1,
  kFirstTls12Resumption = 2,
  kOwnTls13Ticket = 3,
  kOwnTls12Ticket = 4,
  kCounters = 5,
};

const char *StepName(int step) {
  switch (step) {
    case kFirstTls13Resumption:
      return "the child's first TLS 1.3 resumption";
    case kFirstTls12Resumption:
      return "the child's first TLS 1.2 resumption";
    case kOwnTls13Ticket:
      return "a TLS 1.3 ticket issued and resumed in the child";
    case kOwnTls12Ticket:
      return "a TLS 1.2 ticket issued and resumed in the child";
    case kCounters:
      return "the child's counters (token errors, resumptions)";
    default:
      return "the child (crashed or unknown status)";
  }
}

bool Resumes(SSL_CTX *client, SSL_CTX *server, const SSL_SESSION *session) {
  UniqueSslSession offer = Copy(session);
  HandshakeResult r = Handshake(client, server, offer.get());
  return r.ok && r.reused;
}

bool IssuesAndResumes(SSL_CTX *client, SSL_CTX *server) {
  HandshakeResult full = Handshake(client, server);
  return full.ok && !full.reused && full.session &&
         Resumes(client, server, full.session.get());
}

TEST_F(ForkTest, EveryChildsFirstResumptionResumesAndTheParentStillDoes) {
  auto context = ContextFor(ProvisionedStore("fork", "prefork"));
  auto server13 = TicketOnly(ServerCtx(context, TLS1_3_VERSION));
  auto server12 = TicketOnly(ServerCtx(context, TLS1_2_VERSION));
  auto client13 = NewClientCtx(TLS1_3_VERSION);
  auto client12 = NewClientCtx(TLS1_2_VERSION);
  HandshakeResult full13 = Handshake(client13.get(), server13.get());
  HandshakeResult full12 = Handshake(client12.get(), server12.get());
  ASSERT_TRUE(full13.ok && full13.session) << full13.error;
  ASSERT_TRUE(full12.ok && full12.session) << full12.error;
  ASSERT_TRUE(Resumes(client13.get(), server13.get(), full13.session.get()));
  const tls::TicketCounters before = context->stats->Snapshot();
  ASSERT_EQ(before.token_errors, 0u);

  std::vector<pid_t> children;
  for (int i = 0; i < kChildren; ++i) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // The very first ticket operations of this process: opens, then seals.
      int step = kOk;
      if (!Resumes(client13.get(), server13.get(), full13.session.get())) {
        step = kFirstTls13Resumption;
      } else if (!Resumes(client12.get(), server12.get(),
                          full12.session.get())) {
        step = kFirstTls12Resumption;
      } else if (!IssuesAndResumes(client13.get(), server13.get())) {
        step = kOwnTls13Ticket;
      } else if (!IssuesAndResumes(client12.get(), server12.get())) {
        step = kOwnTls12Ticket;
      } else {
        tls::TicketCounters after = context->stats->Snapshot();
        if (after.token_errors != 0 ||
            after.resumed + after.renewed !=
                before.resumed + before.renewed + 4) {
          step = kCounters;
        }
      }
      _exit(step);  // no test-framework teardown in the child
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "child " << pid << " died";
    EXPECT_EQ(WEXITSTATUS(status), kOk)
        << "child " << pid << " failed: " << StepName(WEXITSTATUS(status));
  }

  // The parent kept its connection, sessions and keys.
  EXPECT_TRUE(Resumes(client13.get(), server13.get(), full13.session.get()));
  EXPECT_TRUE(Resumes(client12.get(), server12.get(), full12.session.get()));
  EXPECT_TRUE(IssuesAndResumes(client12.get(), server12.get()));
  EXPECT_EQ(context->stats->Snapshot().token_errors, 0u);
}

// A worker that exits closes its store: that must not wait for the
// parent's maintenance thread, which at fork time sat in its condition
// variable (the child's copy counts a waiter that does not exist there).
TEST_F(ForkTest, ChildClosesItsStoreWhileTheParentsThreadWaits) {
  ProvisionedStore("fork", "close");
  keystore::StoreOptions options;
  options.clock = &clock_;
  options.background_maintenance = true;
  auto opened =
      keystore::KeyStore::Open(SoftHsm::Get().Uri("fork", "close"), options);
  ASSERT_TRUE(opened.ok()) << opened.status().message();
  std::shared_ptr<keystore::KeyStore> store = std::move(*opened);
  ASSERT_TRUE(store->Load().ok());
  // The thread's first pass derives this epoch's and the next one's keys;
  // then it waits a second for the next pass.
  while (store->derivations() < 2) std::this_thread::yield();

  constexpr int kBoundMs = 5000;  // a hang is forever; this is generous
  for (int i = 0; i < kChildren; ++i) {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      store.reset();  // the child's last reference
      char done = 0;
      (void)!write(fds[1], &done, 1);
      _exit(0);
    }
    close(fds[1]);
    pollfd p{fds[0], POLLIN, 0};
    char done = 1;
    bool closed = poll(&p, 1, kBoundMs) == 1 && read(fds[0], &done, 1) == 1;
    if (!closed) kill(pid, SIGKILL);
    close(fds[0]);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(closed) << "child " << i << " hung closing its store";
  }
}

}  // namespace
}  // namespace hsmstek::testing
