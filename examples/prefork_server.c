/* A pre-forking TLS server (the shape of Apache's prefork MPM or a classic
 * daemon) whose session tickets are sealed in a PKCS#11 token.
 *
 *   prefork_server <port> <cert.pem> <key.pem> <pkcs11-uri> <workers>
 *
 * The parent opens the store, checks it (connecting and deriving the
 * current keys), creates the SSL_CTX and binds; then it forks <workers>
 * processes that accept on the shared socket. Nothing hsmstek-specific is
 * needed around fork(): the library reconnects in each worker before its
 * first ticket, so a ticket issued by any process resumes on any other.
 * SIGTERM or SIGINT to the parent stops the workers; each prints its
 * counters ("worker <pid>: issued=... resumed=... renewed=...
 * token_errors=...") when it exits. */
#include <arpa/inet.h>
#include <errno.h>
#include <hsmstek/hsmstek.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_WORKERS 64

static volatile sig_atomic_t g_stop = 0;

static void on_stop(int sig) {
  (void)sig;
  g_stop = 1;
}

static void log_to_stderr(int level, const char *msg, void *arg) {
  (void)arg;
  if (level <= HSMSTEK_LOG_WARNING) fprintf(stderr, "hsmstek: %s\n", msg);
}

static int listen_on(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_port = htons((unsigned short)port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
      bind(fd, (struct sockaddr *)&addr, sizeof(addr)) || listen(fd, 64)) {
    perror("listen");
    exit(1);
  }
  return fd;
}

/* Stop signals interrupt accept() (no SA_RESTART). */
static void catch_stop_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_stop;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
}

static void serve(SSL_CTX *ctx, int client) {
  static const char reply[] =
      "HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n";
  char buf[1024];
  SSL *ssl = SSL_new(ctx);
  SSL_set_fd(ssl, client);
  if (SSL_accept(ssl) == 1) {
    (void)SSL_read(ssl, buf, sizeof(buf));
    (void)SSL_write(ssl, reply, (int)sizeof(reply) - 1);
    SSL_shutdown(ssl);
  } else {
    ERR_print_errors_fp(stderr);
  }
  SSL_free(ssl);
  close(client);
}

static void run_worker(SSL_CTX *ctx, hsmstek_store *store, int fd) {
  hsmstek_stats stats;
  while (!g_stop) {
    int client = accept(fd, NULL, NULL);
    if (client < 0) continue; /* EINTR on stop; transient errors */
    serve(ctx, client);
  }
  if (hsmstek_store_stats(store, &stats) == HSMSTEK_OK) {
    printf(
        "worker %d: issued=%llu resumed=%llu renewed=%llu "
        "token_errors=%llu\n",
        (int)getpid(), (unsigned long long)stats.tickets_issued,
        (unsigned long long)stats.tickets_resumed,
        (unsigned long long)stats.tickets_renewed,
        (unsigned long long)stats.token_errors);
    fflush(stdout);
  }
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr,
            "usage: %s <port> <cert.pem> <key.pem> <pkcs11-uri> <workers>\n",
            argv[0]);
    return 2;
  }
  int workers = atoi(argv[5]);
  if (workers < 1 || workers > MAX_WORKERS) {
    fprintf(stderr, "workers must be 1..%d\n", MAX_WORKERS);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  catch_stop_signals();
  hsmstek_set_log_callback(log_to_stderr, NULL);

  hsmstek_store *store = NULL;
  if (hsmstek_store_open(argv[4], &store) != HSMSTEK_OK) {
    fprintf(stderr, "hsmstek_store_open: %s\n", hsmstek_last_error());
    return 1;
  }
  if (hsmstek_store_check(store) != HSMSTEK_OK) {
    fprintf(stderr, "warning: %s (serving full handshakes)\n",
            hsmstek_last_error());
  }
  SSL_CTX *ctx = hsmstek_ssl_ctx_new(store, TLS_server_method());
  if (ctx == NULL || SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1) {
    fprintf(stderr, "SSL_CTX set-up failed: %s\n", hsmstek_last_error());
    ERR_print_errors_fp(stderr);
    return 1;
  }
  /* Tickets only: a worker's in-memory session cache is not shared. */
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);

  int fd = listen_on(atoi(argv[1]));
  pid_t pids[MAX_WORKERS];
  int started = 0;
  for (; started < workers; ++started) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      break;
    }
    if (pid == 0) {
      run_worker(ctx, store, fd);
      SSL_CTX_free(ctx);
      hsmstek_store_close(store);
      _exit(0);
    }
    pids[started] = pid;
  }
  printf("listening on 127.0.0.1:%s with %d workers\n", argv[1], started);
  fflush(stdout);

  while (!g_stop) pause();
  for (int i = 0; i < started; ++i) kill(pids[i], SIGTERM);
  for (int i = 0; i < started; ++i) waitpid(pids[i], NULL, 0);
  SSL_CTX_free(ctx);
  hsmstek_store_close(store);
  close(fd);
  return 0;
}
