/* hsmstek: TLS session-ticket keys that never leave a PKCS#11 token.
 *
 * Threat model. A server that uses this API issues and accepts RFC 5077
 * session tickets whose AES-256-CBC encryption and HMAC-SHA256 run inside a
 * PKCS#11 token on key handles. An attacker who reads the server's memory
 * learns no ticket key (past or future) and so cannot decrypt recorded
 * tickets or forge new ones; they do see the session state of connections
 * being resumed at that moment, as with any TLS server. When the token is
 * unusable the server keeps completing full handshakes and issues no ticket
 * under any other key: it fails closed and recovers by itself.
 *
 * Conventions. Functions that return int return HSMSTEK_OK (0) on success
 * and a negative HSMSTEK_ERR_* code on failure; hsmstek_last_error() then
 * describes the failure. Unless stated otherwise every function is
 * thread-safe. No function calls exit() or throws.
 */
#ifndef HSMSTEK_HSMSTEK_H
#define HSMSTEK_HSMSTEK_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(HSMSTEK_BUILDING_LIBRARY)
#define HSMSTEK_EXPORT __attribute__((visibility("default")))
#else
#define HSMSTEK_EXPORT
#endif

/* Result codes. */
#define HSMSTEK_OK 0
#define HSMSTEK_ERR_INVALID_ARGUMENT (-1) /* bad URI, option or value */
#define HSMSTEK_ERR_NOT_FOUND (-2)        /* no such module, token or store */
#define HSMSTEK_ERR_PERMISSION_DENIED                                  \
  (-3)                               /* wrong PIN, weak key attributes \
                                      */
#define HSMSTEK_ERR_UNAVAILABLE (-4) /* token fault; may succeed later */
#define HSMSTEK_ERR_UNSUPPORTED (-5) /* token lacks a mechanism */
#define HSMSTEK_ERR_FAILED_PRECONDITION (-6)
#define HSMSTEK_ERR_INTERNAL (-7)

/* hsmstek_store is a handle on one key store (a label in one token): its
 * masters, policy, derived per-epoch keys and counters. Opaque. */
typedef struct hsmstek_store hsmstek_store;

/* hsmstek_store_open opens the store named by |pkcs11_uri|, an RFC 7512 URI
 * whose |object| attribute is the store label, for example
 * "pkcs11:token=tickets;object=web?module-path=/usr/lib/softhsm/libsofthsm2.so
 * &pin-source=file:/etc/hsmstek/pin". On success it sets |*out| to a new
 * store the caller owns (release with hsmstek_store_close) and returns
 * HSMSTEK_OK.
 *
 * Immediate failures: a malformed URI, a URI without |object|, a module
 * that cannot be loaded. Everything that needs the token (finding it,
 * login, reading the store) is deferred: the store connects on first use
 * and retries with back-off, so a server can start while its token is
 * unreachable and serves full handshakes meanwhile. Call
 * hsmstek_store_check to connect now and learn the token's state.
 *
 * The PIN comes from the URI's pin-source file, its pin-value (unsafe:
 * visible in configuration), or the HSMSTEK_PIN environment variable. */
HSMSTEK_EXPORT int hsmstek_store_open(const char *pkcs11_uri,
                                      hsmstek_store **out);

/* hsmstek_store_open_tokens opens one store reached through |count| (1 to
 * 8) tokens that hold the same masters, replicated with `hsmstek export` /
 * `hsmstek import` (docs/CLI.md): |pkcs11_uris[0]| is the preferred token,
 * the others are used in order while it is out. Every URI names the same
 * store label (|object|); each follows hsmstek_store_open's rules. With
 * |count| == 1 it is hsmstek_store_open. On success sets |*out| to a new
 * store the caller owns; on failure leaves |*out| NULL.
 *
 * hsmstek_store_check verifies every token against the first one (the
 * reference: masters, policies, check values, legacy keys) and fails with
 * HSMSTEK_ERR_FAILED_PRECONDITION naming both check values for one that
 * differs, or with the first token's error when it cannot be read (then
 * no other token is used until it answers). A token is used only while
 * verified; after any reconnect or reload it is verified again by a
 * background thread (each second) before it is used again, and refused
 * while it differs. Each handshake uses one token, chosen without a token
 * round trip; a fault moves the next handshakes to the next verified
 * token (failover) and back once the preferred one has been connected for
 * 5 s and re-read (failback). Thread-safe. */
HSMSTEK_EXPORT int hsmstek_store_open_tokens(const char *const *pkcs11_uris,
                                             size_t count, hsmstek_store **out);

/* hsmstek_store_check connects to the token now if needed and loads the
 * store's masters. Returns HSMSTEK_OK when tickets can be issued, or an
 * error describing why not (wrong PIN, no token, no active master, ...). */
HSMSTEK_EXPORT int hsmstek_store_check(hsmstek_store *store);

/* hsmstek_store_close releases |store|. SSL_CTXs it was installed on keep
 * working (they hold their own reference) until they are freed. NULL is
 * ignored. */
HSMSTEK_EXPORT void hsmstek_store_close(hsmstek_store *store);

/* hsmstek_last_error returns a description of the last failure of an
 * hsmstek function on the calling thread, or "" if none. The pointer stays
 * valid until the next hsmstek call on this thread. Never contains a PIN. */
HSMSTEK_EXPORT const char *hsmstek_last_error(void);

/* Options of a store, set with hsmstek_store_set_option before the store
 * is installed on an SSL_CTX. */
enum hsmstek_option {
  /* Seconds by which a ticket's epoch may be ahead of this server's clock
   * (fleet clock skew) and still be accepted. Default 60; 0..3600. */
  HSMSTEK_OPT_CLOCK_SKEW_SECONDS = 1,
  /* 1 (default): a TLS 1.3 resumption with a current ticket asks for a
   * fresh ticket (single-use tickets); 0: it does not. */
  HSMSTEK_OPT_TLS13_RENEW = 2,
  /* 0 (default): hsmstek_ssl_ctx_install and hsmstek_ssl_ctx_new refuse an
   * SSL_CTX with TLS 1.3 early data (0-RTT) enabled
   * (SSL_CTX_set_max_early_data > 0) with HSMSTEK_ERR_FAILED_PRECONDITION;
   * on a connection whose current SSL_CTX was installed without the option
   * (including one picked by SNI after a default SSL_CTX that has it, and
   * one that enables early data later, with or without
   * SSL_OP_NO_ANTI_REPLAY) early data is switched off: its tickets offer
   * none and none is accepted. The option is read per SSL_CTX at install.
   * 1: accept early data knowing that stateless tickets give no replay
   * protection: a recorded 0-RTT flight can be replayed on every server
   * sharing the store for as long as its ticket is accepted (the store's
   * decrypt window, at most 7 days). Installing then sets
   * SSL_OP_NO_ANTI_REPLAY so that OpenSSL keeps TLS 1.3 tickets stateless
   * (sealed in the token) instead of switching to in-memory ones. Applies to
   * SSL_CTXs installed after it is set. */
  HSMSTEK_OPT_EARLY_DATA = 3,
};

/* hsmstek_store_set_option sets |option| to |value|. Returns
 * HSMSTEK_ERR_INVALID_ARGUMENT for an unknown option or out-of-range value.
 */
HSMSTEK_EXPORT int hsmstek_store_set_option(hsmstek_store *store, int option,
                                            long value);

/* hsmstek_ssl_ctx_new returns a new SSL_CTX for |method| whose session
 * tickets are sealed and opened in |store|'s token (scoped routing: only this
 * SSL_CTX prefers the hsmstek provider; see hsmstek_enable_process_wide).
 * The caller owns the SSL_CTX (SSL_CTX_free). The SSL_CTX holds its own
 * reference to the underlying key store, so |store| may be closed first.
 * Returns NULL on failure. */
HSMSTEK_EXPORT SSL_CTX *hsmstek_ssl_ctx_new(hsmstek_store *store,
                                            const SSL_METHOD *method);

/* hsmstek_ssl_ctx_install installs |store|'s ticket callback on an existing
 * |ctx|, replacing any other ticket key callback, and caps the advertised
 * ticket lifetime to the store's decrypt window (and 7 days). Tickets work
 * only if |ctx|'s HMAC fetches reach the hsmstek provider: either |ctx| came
 * from hsmstek_ssl_ctx_new or hsmstek_enable_process_wide() was called;
 * otherwise the callback logs one error and issues no tickets. |ctx| holds
 * its own reference to the key store (|store| may be closed first). Not
 * thread-safe with respect to other uses of |ctx|.
 *
 * Tickets are bound to |ctx|'s security policy: a digest of its verify mode
 * and depth, verify flags, the certificates and CRLs of its X509_STORE (and
 * verify store) and its client CA list, computed now, travels in every
 * ticket; a ticket whose digest differs from the resuming SSL_CTX's gives a
 * full handshake. Configure verification before installing, or call
 * hsmstek_ssl_ctx_set_policy after changing it (a change of verify mode,
 * depth, store or CA list detected at handshake time makes |ctx|'s tickets
 * stop resuming, logged once).
 *
 * Also installs |ctx|'s session ticket callbacks
 * (SSL_CTX_set_session_ticket_cb; WARNING: replaces the application's own)
 * and an info callback that calls the one |ctx| had. Fails with
 * HSMSTEK_ERR_FAILED_PRECONDITION if |ctx| enables early data and
 * HSMSTEK_OPT_EARLY_DATA is 0.
 *
 * SNI: when a servername callback switches a connection to another SSL_CTX
 * (SSL_set_SSL_CTX), OpenSSL keeps calling the callback of the context the
 * connection started on, while hsmstek uses the store installed on the
 * current context. Install the same store on every context a connection can
 * be switched to (a switched context without one issues and accepts no
 * tickets). Tickets are checked against the policy of the SSL_CTX current
 * when OpenSSL opens them, which is before the servername callback runs:
 * switch contexts in a client hello callback (SSL_CTX_set_client_hello_cb)
 * for tickets of a switched context to resume. */
HSMSTEK_EXPORT int hsmstek_ssl_ctx_install(hsmstek_store *store, SSL_CTX *ctx);

/* hsmstek_ssl_ctx_set_policy recomputes the policy digest of |ctx| (see
 * hsmstek_ssl_ctx_install) from its current verification settings plus the
 * |declared_len| bytes at |declared| (may be NULL when 0): whatever else
 * decides who is admitted that OpenSSL does not see, e.g. a verify callback's
 * rules, CApath directories, authorisation by certificate field. Servers
 * that must accept each other's tickets declare the same bytes. Returns
 * HSMSTEK_ERR_FAILED_PRECONDITION if no store is installed on |ctx|. Not
 * thread-safe with respect to handshakes on |ctx|: call it before serving. */
HSMSTEK_EXPORT int hsmstek_ssl_ctx_set_policy(SSL_CTX *ctx,
                                              const void *declared,
                                              size_t declared_len);

/* hsmstek_enable_process_wide makes the default library context prefer the
 * hsmstek provider ("?provider=hsmstek"), for servers that create their own
 * SSL_CTX (nginx). Every HMAC of the process then goes through hsmstek's
 * HMAC, which delegates raw-key HMACs unchanged to the default provider.
 * Idempotent. Call it before creating SSL_CTXs and before threads start. */
HSMSTEK_EXPORT int hsmstek_enable_process_wide(void);

/* Latency summary of one token operation, in nanoseconds. */
typedef struct hsmstek_latency {
  uint64_t count;
  uint64_t p50_ns; /* estimated from a log2 histogram */
  uint64_t p99_ns;
  uint64_t max_ns;
} hsmstek_latency;

/* Counters of one store since it was opened. */
typedef struct hsmstek_stats {
  uint64_t tickets_issued;       /* sealed new tickets */
  uint64_t tickets_resumed;      /* resumed, no renewal asked */
  uint64_t tickets_renewed;      /* resumed, a fresh ticket asked */
  uint64_t rejected_unknown_key; /* name not ours or key unknown */
  uint64_t rejected_expired;     /* epoch older than the decrypt window */
  uint64_t rejected_future;      /* epoch beyond the clock-skew tolerance */
  uint64_t rejected_not_routed;  /* HMAC context not from the provider */
  uint64_t token_errors;         /* token failures seen by the callback */
  uint64_t derivations;          /* per-epoch keys derived in the token */
  uint64_t reconnects;           /* successful token (re)connects */
  hsmstek_latency seal;          /* encrypt + HMAC of one ticket */
  hsmstek_latency open;          /* HMAC + decrypt of one ticket */
} hsmstek_stats;

/* hsmstek_store_stats fills |*out| with |store|'s counters. */
HSMSTEK_EXPORT int hsmstek_store_stats(hsmstek_store *store,
                                       hsmstek_stats *out);

/* Token round trips and token latency per ticket step of one store. Each
 * step's PKCS#11 calls run on the thread doing the handshake (for nginx:
 * its event loop): one call when the step found an operation initialised
 * ahead of use ("armed"), two when it had to initialise it. Later versions
 * may append fields; callers pass sizeof(hsmstek_token_stats). */
typedef struct hsmstek_token_stats {
  uint64_t seals;            /* ticket seals started */
  uint64_t opens;            /* ticket opens started */
  uint64_t seal_round_trips; /* token calls of seals, handshake thread */
  uint64_t open_round_trips; /* token calls of opens, handshake thread */
  /* Round trips per seal / per open, x1000 (0 before the first one). A TLS
   * 1.3 resumption with renewal is one open and one seal. */
  uint64_t round_trips_per_seal_milli;
  uint64_t round_trips_per_open_milli;
  hsmstek_latency encrypt; /* token calls of one encryption step */
  hsmstek_latency decrypt; /* ... of one decryption step */
  hsmstek_latency sign;    /* ... of one HMAC step (seal or open) */
  uint64_t armed_hits;     /* steps that took an armed operation */
  uint64_t armed_misses;   /* steps initialised on demand */
  uint64_t armed_failures; /* background initialisations that failed */
} hsmstek_token_stats;

/* hsmstek_store_token_stats fills the first |out_size| bytes of |*out|
 * (at most sizeof(hsmstek_token_stats)) with |store|'s token round trips
 * and latencies. */
HSMSTEK_EXPORT int hsmstek_store_token_stats(hsmstek_store *store,
                                             hsmstek_token_stats *out,
                                             size_t out_size);

/* What became of tickets after hsmstek opened them. Later versions may
 * append fields; callers pass sizeof(hsmstek_resumption_stats). */
typedef struct hsmstek_resumption_stats {
  /* Opened and handed to OpenSSL, which still completed a full handshake
   * (session id context, protocol version, cipher or 0-RTT checks); not
   * counted in tickets_resumed / tickets_renewed. */
  uint64_t opened_not_resumed;
  /* Opened, but issued under another security policy (or before policy
   * binding existed, where a client verdict is at stake), or the connection
   * verifies differently from its SSL_CTX: full handshake. Also counts a
   * resumption whose SSL_CTX the application switched to another policy
   * after the ticket was admitted (its verify result is then set to
   * X509_V_ERR_APPLICATION_VERIFICATION). */
  uint64_t rejected_policy;
  /* Server handshakes in which early data was switched off because the
   * connection's SSL_CTX enables it without HSMSTEK_OPT_EARLY_DATA (one per
   * handshake, whether or not a ticket was then issued). */
  uint64_t early_data_refused;
  /* Tickets of old epochs declined because deriving their keys would pass
   * the store's budget (8 a second, a bounded cache): a flood of old or
   * forged names, not token trouble (not in token_errors). */
  uint64_t rejected_budget;
} hsmstek_resumption_stats;

/* hsmstek_store_resumption_stats fills the first |out_size| bytes of |*out|
 * (at most sizeof(hsmstek_resumption_stats)) with |store|'s counters. */
HSMSTEK_EXPORT int hsmstek_store_resumption_stats(hsmstek_store *store,
                                                  hsmstek_resumption_stats *out,
                                                  size_t out_size);

/* The health of one token of a store, as this process sees it (no token
 * round trip). Later versions may append fields; callers pass
 * sizeof(hsmstek_token_health). */
typedef struct hsmstek_token_health {
  int up;       /* 1: connected now */
  int active;   /* 1: the token handshakes use now */
  int verified; /* 1: usable: its current view equals the first token's */
  int64_t ms_since_success; /* since the last session lease (grows on
                               an idle standby); -1: never */
  uint64_t failovers;       /* times handshakes moved away from it */
  uint64_t faults;          /* connection faults seen */
  char token[96];           /* "token \"label\" (serial \"...\")" */
  char last_error[256];     /* last fault or failed connect, kept after
                               recovery; "" if none */
} hsmstek_token_health;

/* hsmstek_store_token_count returns how many tokens |store| was opened
 * with (0 for an invalid handle). */
HSMSTEK_EXPORT size_t hsmstek_store_token_count(hsmstek_store *store);

/* hsmstek_store_token_health fills the first |out_size| bytes of |*out|
 * (at most sizeof(hsmstek_token_health)) with the health of token |index|
 * (0 = preferred). HSMSTEK_ERR_INVALID_ARGUMENT for a bad handle, index or
 * size. Strings are NUL-terminated, cut if longer. Thread-safe. */
HSMSTEK_EXPORT int hsmstek_store_token_health(hsmstek_store *store,
                                              size_t index,
                                              hsmstek_token_health *out,
                                              size_t out_size);

/* The forward secrecy of a store's active master: which ratchet link
 * serves the current epoch and how far back the token can still open
 * tickets (docs/SECURITY.md, "Forward secrecy"). Later versions may append
 * fields; callers pass sizeof(hsmstek_forward_secrecy). */
typedef struct hsmstek_forward_secrecy {
  uint8_t master[8];     /* the active master's store id */
  uint64_t current_link; /* index of the link serving the current epoch */
  uint8_t current_link_check[8]; /* its check value, as `hsmstek status`
                                    shows it (all zero if the token failed
                                    to compute it; retried each pass) */
  /* Unix time: the oldest moment whose tickets the store's tokens can
   * still open: the first epoch of the oldest link of any master in any of
   * its tokens (a superseded or retired master's links count until they
   * are destroyed); 0 while a legacy key is in a token (it opens tickets of
   * any age). A copy under another label is not seen (docs/SECURITY.md,
   * "Watching the horizon"). */
  int64_t horizon;
  uint64_t links_held;  /* links of the active master in the token */
  int64_t as_of;        /* Unix time the token was read (the oldest read
                           of the tokens counted) */
  uint64_t legacy_keys; /* legacy keys in the tokens (most in one token) */
} hsmstek_forward_secrecy;

/* hsmstek_store_forward_secrecy fills the first |out_size| bytes of |*out|
 * (at most sizeof(hsmstek_forward_secrecy)) with the forward secrecy of
 * |store|: the active master of the token its handshakes use now, and the
 * horizon over every token whose last maintenance pass saw an active
 * master, as of those passes (once a second, from a view up to the refresh
 * interval old, 30 s by default). No token
 * round trip: safe on an event loop. HSMSTEK_ERR_FAILED_PRECONDITION when
 * that pass saw no active master (or has not run yet: the token was never
 * reached); HSMSTEK_ERR_INVALID_ARGUMENT for a bad handle or size.
 * Thread-safe. */
HSMSTEK_EXPORT int hsmstek_store_forward_secrecy(hsmstek_store *store,
                                                 hsmstek_forward_secrecy *out,
                                                 size_t out_size);

/* Log levels passed to the log callback. */
#define HSMSTEK_LOG_ERROR 0
#define HSMSTEK_LOG_WARNING 1
#define HSMSTEK_LOG_INFO 2
#define HSMSTEK_LOG_DEBUG 3

/* hsmstek_set_log_callback routes the library's log messages to |cb| (NULL:
 * discard them; the default). |cb| may be called from any thread, with
 * internal locks held: it must not call back into hsmstek nor fork() (a
 * fork would wait for a lock its own thread holds), and while it blocks a
 * fork in another thread waits. It gets messages without PINs or key
 * values; labels and URIs in them are quoted and escaped. Setting the same
 * (cb, arg) again costs no memory. */
HSMSTEK_EXPORT void hsmstek_set_log_callback(
    void (*cb)(int level, const char *msg, void *arg), void *arg);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* HSMSTEK_HSMSTEK_H */
