/* A small TLS server whose session tickets are sealed in a PKCS#11 token.
 *
 *   tls_server <port> <cert.pem> <key.pem> <pkcs11-uri> [max-connections]
 *
 * Listens on 127.0.0.1:<port>, answers each connection with one line, and
 * prints the store's counters when it exits (after max-connections, if
 * given). The hsmstek part is three calls: open, ssl_ctx_new, stats. */
#include <arpa/inet.h>
#include <hsmstek/hsmstek.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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

static void serve(SSL_CTX *ctx, int client) {
  static const char reply[] =
      "HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n";
  char buf[1024];
  SSL *ssl = SSL_new(ctx);
  SSL_set_fd(ssl, client);
  if (SSL_accept(ssl) == 1) {
    /* Best effort: s_client may close without sending anything. */
    (void)SSL_read(ssl, buf, sizeof(buf));
    (void)SSL_write(ssl, reply, (int)sizeof(reply) - 1);
    SSL_shutdown(ssl);
  } else {
    ERR_print_errors_fp(stderr);
  }
  SSL_free(ssl);
  close(client);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr,
            "usage: %s <port> <cert.pem> <key.pem> <pkcs11-uri> [max]\n",
            argv[0]);
    return 2;
  }
  long max = argc > 5 ? strtol(argv[5], NULL, 10) : -1;
  signal(SIGPIPE, SIG_IGN);
  hsmstek_set_log_callback(log_to_stderr, NULL);

  hsmstek_store *store = NULL;
  if (hsmstek_store_open(argv[4], &store) != HSMSTEK_OK) {
    fprintf(stderr, "hsmstek_store_open: %s\n", hsmstek_last_error());
    return 1;
  }
  /* Optional: learn now whether tickets will work (the store also
   * connects lazily and retries by itself). */
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

  int fd = listen_on(atoi(argv[1]));
  printf("listening on 127.0.0.1:%s\n", argv[1]);
  fflush(stdout);
  for (long served = 0; max < 0 || served < max; ++served) {
    int client = accept(fd, NULL, NULL);
    if (client < 0) continue;
    serve(ctx, client);
  }

  hsmstek_stats stats;
  if (hsmstek_store_stats(store, &stats) == HSMSTEK_OK) {
    printf(
        "issued=%llu resumed=%llu renewed=%llu rejected_unknown=%llu "
        "token_errors=%llu seal_p50_us=%.1f open_p50_us=%.1f\n",
        (unsigned long long)stats.tickets_issued,
        (unsigned long long)stats.tickets_resumed,
        (unsigned long long)stats.tickets_renewed,
        (unsigned long long)stats.rejected_unknown_key,
        (unsigned long long)stats.token_errors, stats.seal.p50_ns / 1e3,
        stats.open.p50_ns / 1e3);
  }
  SSL_CTX_free(ctx);
  hsmstek_store_close(store);
  close(fd);
  return 0;
}
