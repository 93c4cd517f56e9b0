/* Shared parts of ngx_http_hsmstek_module and ngx_stream_hsmstek_module:
 * the hsmstek_store directive, per-server ticket settings, and the worker
 * lifecycle (open stores, install ticket callbacks, close stores).
 *
 * This file is compiled into both dynamic modules. Every function here is
 * hidden so that the copy in one .so never interposes the other's (nginx
 * dlopen()s modules with RTLD_GLOBAL).
 *
 * Only the public C API <hsmstek/hsmstek.h> is used. No function here makes a
 * PKCS#11 call except ngx_hsmstek_open_stores(), which runs in workers. */
#ifndef NGX_HSMSTEK_COMMON_H_INCLUDED_
#define NGX_HSMSTEK_COMMON_H_INCLUDED_

/* nginx's headers first: ngx_config.h sets feature macros (_GNU_SOURCE,
 * _FILE_OFFSET_BITS) that must precede every system header. */
/* clang-format off */
#include <ngx_config.h>
#include <ngx_core.h>
#include <hsmstek/hsmstek.h>
/* clang-format on */

#define NGX_HSMSTEK_LOCAL __attribute__((visibility("hidden")))

/* Longest store name; names are [A-Za-z0-9_.-] so they can be used as
 * Prometheus label values without escaping. */
#define NGX_HSMSTEK_MAX_NAME 64

/* One hsmstek_store directive. */
/* Tokens one store may name (the preferred one first, then failovers). */
#define NGX_HSMSTEK_MAX_TOKENS 8

typedef struct {
  ngx_str_t name;
  ngx_str_t uri; /* NUL-terminated; may hold a PIN: never logged */
  /* Every token URI (uris[0] == uri.data), NUL-terminated. */
  const char *uris[NGX_HSMSTEK_MAX_TOKENS];
  ngx_uint_t nuris;
  ngx_int_t clock_skew;  /* seconds; NGX_CONF_UNSET: library default */
  ngx_int_t tls13_renew; /* 0/1; NGX_CONF_UNSET: library default */
  u_char *file;          /* where the directive is, for messages */
  ngx_uint_t line;
  hsmstek_store *store; /* opened in a worker; NULL elsewhere or on error */
} ngx_hsmstek_store_conf_t;

/* One SSL_CTX that gets a store's ticket callback in every worker. */
typedef struct {
  SSL_CTX *ctx;
  ngx_uint_t store;      /* index into ngx_hsmstek_main_conf_t.stores */
  ngx_str_t server;      /* "server at file:line", for messages */
  ngx_uint_t active;     /* the store's callback is installed (worker) */
  ngx_flag_t early_data; /* hsmstek_early_data of the server */
} ngx_hsmstek_install_t;

/* Main configuration (http{} or stream{}). */
typedef struct {
  ngx_array_t stores;   /* of ngx_hsmstek_store_conf_t */
  ngx_array_t installs; /* of ngx_hsmstek_install_t, set at postconfig */
  const char *module;   /* "http" or "stream", for messages */
  ngx_uint_t opened;    /* ngx_hsmstek_open_stores ran in this process */
} ngx_hsmstek_main_conf_t;

/* hsmstek_tickets of one server. */
typedef struct {
  /* NGX_CONF_UNSET (never set, also after merge), 0 (off) or 1 (name). */
  ngx_int_t enabled;
  ngx_str_t name;
  u_char *file; /* where the directive is, for messages */
  ngx_uint_t line;
  ngx_uint_t store; /* index of the store, resolved at merge */
  /* hsmstek_early_data: accept TLS 1.3 early data (replayable) with the
   * store's tickets. NGX_CONF_UNSET until merged, then 0 or 1. */
  ngx_flag_t early_data;
} ngx_hsmstek_srv_conf_t;

/* ngx_hsmstek_init_main_conf initialises |mcf| (allocated in cf->pool).
 * Returns NGX_OK or NGX_ERROR. */
NGX_HSMSTEK_LOCAL ngx_int_t ngx_hsmstek_init_main_conf(
    ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf, const char *module);

/* ngx_hsmstek_store_directive handles
 * "hsmstek_store <name> <pkcs11-uri> [<pkcs11-uri> ...] [clock_skew=<time>]
 * [tls13_renew=on|off]": up to NGX_HSMSTEK_MAX_TOKENS URIs of tokens that
 * hold the same masters (the first preferred, the others used while it is
 * out; hsmstek_store_open_tokens). |conf| is an ngx_hsmstek_main_conf_t. It
 * validates the name, rejects duplicates and checks only each URI's shape
 * (starts with "pkcs11:", has a non-empty object attribute): no PKCS#11
 * call. The library refuses URIs naming different labels when the store
 * opens, and tokens with different masters at its check. */
NGX_HSMSTEK_LOCAL char *ngx_hsmstek_store_directive(ngx_conf_t *cf,
                                                    ngx_command_t *cmd,
                                                    void *conf);

/* ngx_hsmstek_tickets_directive handles "hsmstek_tickets <name> | off;".
 * |conf| is an ngx_hsmstek_srv_conf_t; the name is resolved at merge, once
 * every store of the block is known. */
NGX_HSMSTEK_LOCAL char *ngx_hsmstek_tickets_directive(ngx_conf_t *cf,
                                                      ngx_command_t *cmd,
                                                      void *conf);

/* ngx_hsmstek_create_srv_conf returns a new unset srv conf or NULL. */
NGX_HSMSTEK_LOCAL ngx_hsmstek_srv_conf_t *ngx_hsmstek_create_srv_conf(
    ngx_conf_t *cf);

/* ngx_hsmstek_merge_srv_conf inherits |prev| into |conf| and resolves the
 * store name against |mcf|. An unknown name is an error that names the name
 * and the directive's file:line. Returns NGX_CONF_OK or NGX_CONF_ERROR. */
NGX_HSMSTEK_LOCAL char *ngx_hsmstek_merge_srv_conf(
    ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf, ngx_hsmstek_srv_conf_t *prev,
    ngx_hsmstek_srv_conf_t *conf);

/* ngx_hsmstek_add_install records that the server at |file|:|line| with
 * settings |scf|, SSL context |ctx| (NULL: no ssl) and ssl_session_tickets
 * |session_tickets| gets its tickets from a store. Servers without ssl, with
 * "hsmstek_tickets off" (or unset) or with "ssl_session_tickets off" are
 * skipped. Returns NGX_OK or NGX_ERROR. */
NGX_HSMSTEK_LOCAL ngx_int_t ngx_hsmstek_add_install(
    ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf, ngx_hsmstek_srv_conf_t *scf,
    SSL_CTX *ctx, ngx_flag_t session_tickets, u_char *file, ngx_uint_t line);

/* ngx_hsmstek_add_install_store records that |ctx| (of the server at
 * |file|:|line|, with tickets on and hsmstek_early_data |early_data|) gets
 * the callback of store index |store|.
 * Returns NGX_OK (also if already recorded with that store), NGX_DECLINED if
 * |ctx| is already recorded with another store, or NGX_ERROR. */
NGX_HSMSTEK_LOCAL ngx_int_t ngx_hsmstek_add_install_store(
    ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf, SSL_CTX *ctx,
    ngx_uint_t store, ngx_flag_t early_data, u_char *file, ngx_uint_t line);

/* ngx_hsmstek_postconfiguration ends the configuration of |mcf|. A server
 * whose SSL_CTX accepts TLS 1.3 early data ("ssl_early_data on") with a
 * store but without "hsmstek_early_data on" is a configuration error (a
 * recorded 0-RTT flight could be replayed on every server sharing the
 * store). Then, if any
 * server uses a store it makes the process prefer the hsmstek provider
 * (hsmstek_enable_process_wide: sets an OpenSSL property query, no PKCS#11
 * call), which must happen before workers fork. In a single-process
 * reconfiguration (master_process off + reload), where init_process does not
 * run again, it disables tickets on every configured SSL_CTX instead (fail
 * closed). Returns NGX_OK or NGX_ERROR. */
NGX_HSMSTEK_LOCAL ngx_int_t
ngx_hsmstek_postconfiguration(ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf);

/* ngx_hsmstek_open_stores runs in a worker (init_process): routes library
 * logs to the error log, opens every store, applies its options, checks the
 * token (failures are warnings: the library retries by itself) and installs
 * the ticket callback on every recorded SSL_CTX. A store that cannot be
 * opened leaves its servers without tickets (fail closed); the worker always
 * continues. Returns NGX_OK. */
NGX_HSMSTEK_LOCAL ngx_int_t
ngx_hsmstek_open_stores(ngx_cycle_t *cycle, ngx_hsmstek_main_conf_t *mcf);

/* ngx_hsmstek_close_stores disables tickets on the SSL_CTXs and closes every
 * open store (exit_process, or when the cycle's pool is destroyed).
 * Idempotent. */
NGX_HSMSTEK_LOCAL void ngx_hsmstek_close_stores(ngx_hsmstek_main_conf_t *mcf);

#endif /* NGX_HSMSTEK_COMMON_H_INCLUDED_ */
