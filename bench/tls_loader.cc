// hsmstek_tls_loader: a small, bounded TLS resumption load generator for the
// nginx benchmark (docs/BENCHMARKS.md). One connection at a time over TCP:
// connect, handshake resuming the newest session, "GET <path> HTTP/1.0", read
// the response to the end (so TLS 1.3 NewSessionTicket messages arrive), close.
//
//   hsmstek_tls_loader HOST:PORT 1.2|1.3 SECONDS [PATH]
//
// Prints one line of JSON: {"handshakes":N,"resumed":R,"seconds":S,...}.
// Exits 1 if a connection fails or no handshake resumed.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

namespace {

struct SessionFree {
  void operator()(SSL_SESSION *s) const { SSL_SESSION_free(s); }
};
struct SslFree {
  void operator()(SSL *ssl) const { SSL_free(ssl); }
};
struct SslCtxFree {
  void operator()(SSL_CTX *ctx) const { SSL_CTX_free(ctx); }
};
// Closes a socket.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};
using UniqueSession = std::unique_ptr<SSL_SESSION, SessionFree>;

UniqueSession g_newest;  // the newest session the server gave us

int OnNewSession(SSL * /*ssl*/, SSL_SESSION *session) {
  g_newest.reset(session);  // takes the reference
  return 1;
}

int Dial(const sockaddr_in &addr) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(fd, reinterpret_cast<const sockaddr *>(&addr), sizeof(addr)) !=
      0) {
    close(fd);
    return -1;
  }
  return fd;
}

// One connection; returns false on any failure. Sets *reused.
bool OneConnection(SSL_CTX *ctx, const sockaddr_in &addr,
                   const std::string &request, bool *reused) {
  Fd sock{Dial(addr)};
  if (sock.fd < 0) {
    std::perror("connect");
    return false;
  }
  std::unique_ptr<SSL, SslFree> ssl(SSL_new(ctx));
  if (ssl == nullptr) return false;
  SSL_set_fd(ssl.get(), sock.fd);
  SSL_set_tlsext_host_name(ssl.get(), "localhost");
  if (g_newest) SSL_set_session(ssl.get(), g_newest.get());
  bool ok = SSL_connect(ssl.get()) == 1;
  ok = ok &&
       SSL_write(ssl.get(), request.data(), static_cast<int>(request.size())) ==
           static_cast<int>(request.size());
  char buf[4096];
  while (ok && SSL_read(ssl.get(), buf, sizeof(buf)) > 0) {
  }
  if (ok) {
    *reused = SSL_session_reused(ssl.get()) == 1;
    // TLS 1.3 tickets arrived through the callback; TLS 1.2 keeps (or
    // renews) the session of the connection.
    if (SSL_version(ssl.get()) != TLS1_3_VERSION) {
      g_newest.reset(SSL_get1_session(ssl.get()));
    }
    SSL_shutdown(ssl.get());
  } else {
    ERR_print_errors_fp(stderr);
  }
  return ok;
}

}  // namespace

int main(int argc, char **argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s HOST:PORT 1.2|1.3 SECONDS [PATH]\n",
                 argv[0]);
    return 2;
  }
  std::string target = argv[1];
  size_t colon = target.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  if (colon == std::string::npos ||
      inet_pton(AF_INET, target.substr(0, colon).c_str(), &addr.sin_addr) !=
          1) {
    std::fprintf(stderr, "bad HOST:PORT %s\n", argv[1]);
    return 2;
  }
  addr.sin_port =
      htons(static_cast<uint16_t>(std::atoi(target.c_str() + colon + 1)));
  const int version =
      std::strcmp(argv[2], "1.3") == 0 ? TLS1_3_VERSION : TLS1_2_VERSION;
  const double seconds = std::atof(argv[3]);
  const std::string path = argc > 4 ? argv[4] : "/";
  const std::string request =
      "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";

  std::unique_ptr<SSL_CTX, SslCtxFree> owner(SSL_CTX_new(TLS_client_method()));
  SSL_CTX *ctx = owner.get();
  if (ctx == nullptr) return 1;
  SSL_CTX_set_min_proto_version(ctx, version);
  SSL_CTX_set_max_proto_version(ctx, version);
  SSL_CTX_set_session_cache_mode(
      ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ctx, OnNewSession);

  // The first (full) handshake gets the first ticket; not counted.
  bool reused = false;
  if (!OneConnection(ctx, addr, request, &reused) || !g_newest) {
    std::fprintf(stderr, "first connection failed or got no ticket\n");
    return 1;
  }
  long handshakes = 0, resumed = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < seconds) {
    if (!OneConnection(ctx, addr, request, &reused)) return 1;
    ++handshakes;
    resumed += reused ? 1 : 0;
    elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
  }
  std::printf(
      "{\"handshakes\":%ld,\"resumed\":%ld,\"seconds\":%.4f,"
      "\"per_second\":%.1f}\n",
      handshakes, resumed, elapsed, handshakes / elapsed);
  g_newest.reset();
  return resumed > 0 ? 0 : 1;
}
