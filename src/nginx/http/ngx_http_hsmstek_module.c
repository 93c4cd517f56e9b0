/* ngx_http_hsmstek_module: TLS session tickets of nginx http servers sealed
 * and opened in a PKCS#11 token through libhsmstek.
 *
 *   http {
 *     hsmstek_store web "pkcs11:token=tickets;object=web?module-path=...";
 *     server {
 *       listen 443 ssl;
 *       hsmstek_tickets web;           # or "off"; also valid in http{}
 *       location = /hsmstek { hsmstek_status; }
 *     }
 *   }
 *
 * Configuration makes no PKCS#11 call (nginx -t, the -s signaller and the
 * master never touch the token); workers open the stores in init_process and
 * install the ticket callback on the SSL_CTX of every server that uses one.
 * See docs/NGINX.md. */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#if (NGX_HSMSTEK_STREAM)
#include <ngx_stream.h>
#endif

#include "ngx_hsmstek_common.h"

static ngx_int_t ngx_http_hsmstek_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_hsmstek_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_hsmstek_create_srv_conf(ngx_conf_t *cf);
static char *ngx_http_hsmstek_merge_srv_conf(ngx_conf_t *cf, void *parent,
                                             void *child);
static char *ngx_http_hsmstek_status(ngx_conf_t *cf, ngx_command_t *cmd,
                                     void *conf);
static ngx_int_t ngx_http_hsmstek_init_process(ngx_cycle_t *cycle);
static void ngx_http_hsmstek_exit_process(ngx_cycle_t *cycle);

static ngx_command_t ngx_http_hsmstek_commands[] = {
    {ngx_string("hsmstek_store"), NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
     ngx_hsmstek_store_directive, NGX_HTTP_MAIN_CONF_OFFSET, 0, NULL},

    {ngx_string("hsmstek_tickets"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_CONF_TAKE1,
     ngx_hsmstek_tickets_directive, NGX_HTTP_SRV_CONF_OFFSET, 0, NULL},

    {ngx_string("hsmstek_early_data"),
     NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_CONF_FLAG,
     ngx_conf_set_flag_slot, NGX_HTTP_SRV_CONF_OFFSET,
     offsetof(ngx_hsmstek_srv_conf_t, early_data), NULL},

    {ngx_string("hsmstek_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
     ngx_http_hsmstek_status, 0, 0, NULL},

    ngx_null_command};

static ngx_http_module_t ngx_http_hsmstek_module_ctx = {
    NULL,                               /* preconfiguration */
    ngx_http_hsmstek_postconfiguration, /* postconfiguration */
    ngx_http_hsmstek_create_main_conf,  /* create main configuration */
    NULL,                               /* init main configuration */
    ngx_http_hsmstek_create_srv_conf,   /* create server configuration */
    ngx_http_hsmstek_merge_srv_conf,    /* merge server configuration */
    NULL,                               /* create location configuration */
    NULL                                /* merge location configuration */
};

ngx_module_t ngx_http_hsmstek_module = {
    NGX_MODULE_V1,
    &ngx_http_hsmstek_module_ctx,  /* module context */
    ngx_http_hsmstek_commands,     /* module directives */
    NGX_HTTP_MODULE,               /* module type */
    NULL,                          /* init master */
    NULL,                          /* init module */
    ngx_http_hsmstek_init_process, /* init process */
    NULL,                          /* init thread */
    NULL,                          /* exit thread */
    ngx_http_hsmstek_exit_process, /* exit process */
    NULL,                          /* exit master */
    NGX_MODULE_V1_PADDING};

static void *ngx_http_hsmstek_create_main_conf(ngx_conf_t *cf) {
  ngx_hsmstek_main_conf_t *mcf = ngx_pcalloc(cf->pool, sizeof(*mcf));
  if (mcf == NULL || ngx_hsmstek_init_main_conf(cf, mcf, "http") != NGX_OK) {
    return NULL;
  }
  return mcf;
}

static void *ngx_http_hsmstek_create_srv_conf(ngx_conf_t *cf) {
  return ngx_hsmstek_create_srv_conf(cf);
}

static char *ngx_http_hsmstek_merge_srv_conf(ngx_conf_t *cf, void *parent,
                                             void *child) {
  ngx_hsmstek_main_conf_t *mcf =
      ngx_http_conf_get_module_main_conf(cf, ngx_http_hsmstek_module);
  return ngx_hsmstek_merge_srv_conf(cf, mcf, parent, child);
}

/* ngx_http_hsmstek_effective returns the index of the store whose callback
 * goes on |cscf|'s SSL_CTX, or -1 if none does. */
static ngx_int_t ngx_http_hsmstek_effective(ngx_http_core_srv_conf_t *cscf) {
  ngx_hsmstek_srv_conf_t *scf =
      cscf->ctx->srv_conf[ngx_http_hsmstek_module.ctx_index];
  ngx_http_ssl_srv_conf_t *sscf =
      cscf->ctx->srv_conf[ngx_http_ssl_module.ctx_index];
  if (scf->enabled != 1 || sscf->ssl.ctx == NULL || !sscf->session_tickets) {
    return -1;
  }
  return (ngx_int_t)scf->store;
}

/* ngx_http_hsmstek_sni reconciles name-based virtual servers with the
 * default server of each TLS address. OpenSSL calls the ticket callback of
 * the context a connection started with (the default server's) even after
 * SNI switched to a virtual server's context, while libhsmstek looks the
 * store up on the current context. So:
 *  - a virtual server without hsmstek_tickets gets the default server's
 *    store installed too: "the default server decides";
 *  - a store on the virtual server but none on the default server is a
 *    configuration error: nginx's own ticket keys would serve it;
 *  - any other difference is warned about: with "off" on the virtual
 *    server it gets no tickets at all; with two stores the result depends
 *    on the library, so the same store is required. */
static ngx_int_t ngx_http_hsmstek_sni(ngx_conf_t *cf,
                                      ngx_http_core_main_conf_t *cmcf,
                                      ngx_hsmstek_main_conf_t *mcf) {
  if (cmcf->ports == NULL) {
    return NGX_OK;
  }
  ngx_hsmstek_store_conf_t *stores = mcf->stores.elts;
  ngx_http_conf_port_t *ports = cmcf->ports->elts;
  for (ngx_uint_t p = 0; p < cmcf->ports->nelts; p++) {
    ngx_http_conf_addr_t *addrs = ports[p].addrs.elts;
    for (ngx_uint_t a = 0; a < ports[p].addrs.nelts; a++) {
      if (!addrs[a].opt.ssl) {
        continue;
      }
      ngx_http_core_srv_conf_t *dflt = addrs[a].default_server;
      ngx_int_t dflt_store = ngx_http_hsmstek_effective(dflt);
      ngx_http_core_srv_conf_t **servers = addrs[a].servers.elts;
      for (ngx_uint_t s = 0; s < addrs[a].servers.nelts; s++) {
        ngx_http_core_srv_conf_t *v = servers[s];
        ngx_hsmstek_srv_conf_t *scf =
            v->ctx->srv_conf[ngx_http_hsmstek_module.ctx_index];
        ngx_http_ssl_srv_conf_t *sscf =
            v->ctx->srv_conf[ngx_http_ssl_module.ctx_index];
        /* Without tickets (nginx copies SSL_OP_NO_TICKET on the switch)
         * nothing is at stake. */
        if (v == dflt || sscf->ssl.ctx == NULL || !sscf->session_tickets) {
          continue;
        }
        ngx_int_t store = ngx_http_hsmstek_effective(v);
        if (store == dflt_store) {
          continue;
        }
        if (dflt_store >= 0 && scf->enabled == NGX_CONF_UNSET) {
          ngx_int_t rc = ngx_hsmstek_add_install_store(
              cf, mcf, sscf->ssl.ctx, (ngx_uint_t)dflt_store,
              scf->early_data == 1, v->file_name, v->line);
          if (rc == NGX_ERROR) {
            return NGX_ERROR;
          }
          if (rc == NGX_OK) {
            ngx_log_error(NGX_LOG_INFO, cf->log, 0,
                          "hsmstek: the server in %s:%ui has no "
                          "\"hsmstek_tickets\"; on %V it uses store \"%V\" "
                          "of the default server in %s:%ui",
                          v->file_name, v->line, &addrs[a].opt.addr_text,
                          &stores[dflt_store].name, dflt->file_name,
                          dflt->line);
            continue;
          }
          ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                        "hsmstek: the server in %s:%ui is a name-based "
                        "virtual server of default servers with different "
                        "hsmstek stores; it keeps the first: set its "
                        "\"hsmstek_tickets\" explicitly",
                        v->file_name, v->line);
          continue;
        }
        if (dflt_store < 0) {
          /* OpenSSL would run the default server's ticket keys, i.e.
           * nginx's own in-memory keys, for a server that asked for the
           * token: a configuration error, never a warning. */
          ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                        "hsmstek: the server in %s:%ui uses store \"%V\", "
                        "but on %V its default server in %s:%ui has none: "
                        "connections that reach it by SNI would get session "
                        "tickets under nginx's own keys; set "
                        "\"hsmstek_tickets %V\" on the default server in "
                        "%s:%ui, or \"ssl_session_tickets off\" on the "
                        "server in %s:%ui",
                        v->file_name, v->line, &stores[store].name,
                        &addrs[a].opt.addr_text, dflt->file_name, dflt->line,
                        &stores[store].name, dflt->file_name, dflt->line,
                        v->file_name, v->line);
          return NGX_ERROR;
        } else if (store < 0) {
          ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                        "hsmstek: the server in %s:%ui has "
                        "\"hsmstek_tickets off\", but on %V its default "
                        "server in %s:%ui uses store \"%V\": connections "
                        "that reach it by SNI get no session tickets",
                        v->file_name, v->line, &addrs[a].opt.addr_text,
                        dflt->file_name, dflt->line, &stores[dflt_store].name);
        } else {
          ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                        "hsmstek: the server in %s:%ui uses store \"%V\", "
                        "but on %V its default server in %s:%ui uses store "
                        "\"%V\": name-based virtual servers must use the "
                        "store of their default server",
                        v->file_name, v->line, &stores[store].name,
                        &addrs[a].opt.addr_text, dflt->file_name, dflt->line,
                        &stores[dflt_store].name);
        }
      }
    }
  }
  return NGX_OK;
}

/* ngx_http_hsmstek_sni_host extracts the host name of the ClientHello's
 * server_name extension into |buf| (256 bytes), lowercased and without a
 * trailing dot, as nginx's servername callback will see it. Returns its
 * length, or 0 if absent or not a plain host name (nginx then refuses or
 * keeps the default server itself). */
static size_t ngx_http_hsmstek_sni_host(ngx_ssl_conn_t *ssl_conn, u_char *buf) {
  const unsigned char *ext;
  size_t len;
  if (!SSL_client_hello_get0_ext(ssl_conn, TLSEXT_TYPE_server_name, &ext,
                                 &len) ||
      len < 5 || (size_t)((ext[0] << 8) | ext[1]) != len - 2 ||
      ext[2] != TLSEXT_NAMETYPE_host_name) {
    return 0;
  }
  size_t n = (size_t)((ext[3] << 8) | ext[4]);
  if (n == 0 || n > 255 || n > len - 5) {
    return 0;
  }
  for (size_t i = 0; i < n; i++) {
    u_char ch = ext[5 + i];
    if (ch == '/' || ch == '\\' || ch == '\0' || ch <= ' ' || ch >= 0x7f ||
        (ch == '.' && (i == 0 || buf[i - 1] == '.'))) {
      return 0;
    }
    buf[i] = ngx_tolower(ch);
  }
  if (buf[n - 1] == '.') {
    n--;
  }
  return n;
}

/* ngx_http_hsmstek_find_server finds the server{} of |host| among |names|
 * the way nginx does for SNI: exact and wildcard names, then regexes. */
static ngx_http_core_srv_conf_t *ngx_http_hsmstek_find_server(
    ngx_http_virtual_names_t *names, u_char *host, size_t len) {
  ngx_http_core_srv_conf_t *cscf =
      ngx_hash_find_combined(&names->names, ngx_hash_key(host, len), host, len);
  if (cscf != NULL) {
    return cscf;
  }
#if (NGX_PCRE)
  ngx_str_t name = {len, host};
  for (ngx_uint_t i = 0; i < names->nregex; i++) {
    ngx_int_t rc = ngx_regex_exec(names->regex[i].regex->regex, &name, NULL, 0);
    if (rc == NGX_REGEX_NO_MATCHED) {
      continue;
    }
    return rc >= 0 ? names->regex[i].server : NULL;
  }
#endif
  return NULL;
}

/* ngx_http_hsmstek_client_hello selects the name-based virtual server's
 * SSL_CTX before OpenSSL opens the session ticket. nginx 1.22 switches in
 * its servername callback, which OpenSSL runs after ticket decryption: the
 * ticket would be checked against the default server's security policy
 * (libhsmstek binds tickets to the policy of the SSL_CTX current when they
 * are opened). nginx's own callback later switches to the same SSL_CTX
 * again and does the rest (request config, ssl_servername). Never fails the
 * handshake. */
static int ngx_http_hsmstek_client_hello(ngx_ssl_conn_t *ssl_conn, int *al,
                                         void *arg) {
  (void)al;
  (void)arg;
  u_char host[256];
  size_t len = ngx_http_hsmstek_sni_host(ssl_conn, host);
  if (len == 0) {
    return SSL_CLIENT_HELLO_SUCCESS;
  }
  ngx_connection_t *c = ngx_ssl_get_connection(ssl_conn);
  ngx_http_connection_t *hc = c != NULL ? c->data : NULL;
  if (hc == NULL || hc->addr_conf == NULL ||
      hc->addr_conf->virtual_names == NULL) {
    return SSL_CLIENT_HELLO_SUCCESS;
  }
  ngx_http_core_srv_conf_t *cscf =
      ngx_http_hsmstek_find_server(hc->addr_conf->virtual_names, host, len);
  if (cscf == NULL) {
    return SSL_CLIENT_HELLO_SUCCESS;
  }
  ngx_http_ssl_srv_conf_t *sscf =
      ngx_http_get_module_srv_conf(cscf->ctx, ngx_http_ssl_module);
  SSL_CTX *ctx = sscf->ssl.ctx;
  if (ctx == NULL || ctx == SSL_get_SSL_CTX(ssl_conn) ||
      SSL_set_SSL_CTX(ssl_conn, ctx) == NULL) {
    return SSL_CLIENT_HELLO_SUCCESS;
  }
  /* What nginx's servername callback adjusts after SSL_set_SSL_CTX. */
  SSL_set_verify(ssl_conn, SSL_CTX_get_verify_mode(ctx),
                 SSL_CTX_get_verify_callback(ctx));
  SSL_set_verify_depth(ssl_conn, SSL_CTX_get_verify_depth(ctx));
  SSL_clear_options(ssl_conn,
                    SSL_get_options(ssl_conn) & ~SSL_CTX_get_options(ctx));
  SSL_set_options(ssl_conn, SSL_CTX_get_options(ctx));
  /* Not adjusted by SSL_set_SSL_CTX nor by nginx: without this, a server
   * without "ssl_early_data on" would accept 0-RTT as the default server
   * does (libhsmstek also refuses it unless the server opted in). */
  SSL_set_max_early_data(ssl_conn, SSL_CTX_get_max_early_data(ctx));
  SSL_set_recv_max_early_data(ssl_conn, SSL_CTX_get_recv_max_early_data(ctx));
  return SSL_CLIENT_HELLO_SUCCESS;
}

/* ngx_http_hsmstek_early_sni installs the client hello callback on the
 * SSL_CTX of every TLS address's default server that uses a store (the
 * context connections start with). */
static void ngx_http_hsmstek_early_sni(ngx_http_core_main_conf_t *cmcf) {
  if (cmcf->ports == NULL) {
    return;
  }
  ngx_http_conf_port_t *ports = cmcf->ports->elts;
  for (ngx_uint_t p = 0; p < cmcf->ports->nelts; p++) {
    ngx_http_conf_addr_t *addrs = ports[p].addrs.elts;
    for (ngx_uint_t a = 0; a < ports[p].addrs.nelts; a++) {
      if (!addrs[a].opt.ssl || addrs[a].servers.nelts < 2) {
        continue;
      }
      ngx_http_core_srv_conf_t *dflt = addrs[a].default_server;
      if (ngx_http_hsmstek_effective(dflt) < 0) {
        continue;
      }
      ngx_http_ssl_srv_conf_t *sscf =
          dflt->ctx->srv_conf[ngx_http_ssl_module.ctx_index];
      SSL_CTX_set_client_hello_cb(sscf->ssl.ctx, ngx_http_hsmstek_client_hello,
                                  NULL);
    }
  }
}

static ngx_int_t ngx_http_hsmstek_postconfiguration(ngx_conf_t *cf) {
  ngx_hsmstek_main_conf_t *mcf =
      ngx_http_conf_get_module_main_conf(cf, ngx_http_hsmstek_module);
  ngx_http_core_main_conf_t *cmcf =
      ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

  ngx_http_core_srv_conf_t **servers = cmcf->servers.elts;
  for (ngx_uint_t i = 0; i < cmcf->servers.nelts; i++) {
    ngx_hsmstek_srv_conf_t *scf =
        servers[i]->ctx->srv_conf[ngx_http_hsmstek_module.ctx_index];
    ngx_http_ssl_srv_conf_t *sscf =
        servers[i]->ctx->srv_conf[ngx_http_ssl_module.ctx_index];
    if (ngx_hsmstek_add_install(cf, mcf, scf, sscf->ssl.ctx,
                                sscf->session_tickets, servers[i]->file_name,
                                servers[i]->line) != NGX_OK) {
      return NGX_ERROR;
    }
  }
  if (ngx_http_hsmstek_sni(cf, cmcf, mcf) != NGX_OK) {
    return NGX_ERROR;
  }
  ngx_http_hsmstek_early_sni(cmcf);
  return ngx_hsmstek_postconfiguration(cf, mcf);
}

static ngx_int_t ngx_http_hsmstek_init_process(ngx_cycle_t *cycle) {
  return ngx_hsmstek_open_stores(cycle, ngx_http_cycle_get_module_main_conf(
                                            cycle, ngx_http_hsmstek_module));
}

static void ngx_http_hsmstek_exit_process(ngx_cycle_t *cycle) {
  ngx_hsmstek_close_stores(
      ngx_http_cycle_get_module_main_conf(cycle, ngx_http_hsmstek_module));
}

/* Prometheus metrics of hsmstek_status, one family per row (rows of one
 * family are adjacent and share name/help/type). */
typedef struct {
  const char *name;
  const char *help;
  const char *type;
  const char *labels; /* appended after store="..." */
  size_t offset;      /* of a uint64_t in ngx_http_hsmstek_snapshot_t */
  ngx_uint_t scale;   /* 1: ns, print as seconds; 2: x1000, print as units */
} ngx_http_hsmstek_metric_t;

/* What the page shows of one store, read once per request. */
typedef struct {
  hsmstek_stats stats;
  hsmstek_token_stats token;
  hsmstek_resumption_stats resumption;
} ngx_http_hsmstek_snapshot_t;

#define NGX_HSMSTEK_FIELD(f) offsetof(ngx_http_hsmstek_snapshot_t, stats.f)
#define NGX_HSMSTEK_TOKEN_FIELD(f) \
  offsetof(ngx_http_hsmstek_snapshot_t, token.f)
#define NGX_HSMSTEK_RESUMPTION_FIELD(f) \
  offsetof(ngx_http_hsmstek_snapshot_t, resumption.f)

static const ngx_http_hsmstek_metric_t ngx_http_hsmstek_metrics[] = {
    {"hsmstek_tickets_issued_total", "Session tickets sealed in the token.",
     "counter", "", NGX_HSMSTEK_FIELD(tickets_issued), 0},
    {"hsmstek_tickets_resumed_total",
     "Handshakes resumed from a ticket, no new ticket asked for.", "counter",
     "", NGX_HSMSTEK_FIELD(tickets_resumed), 0},
    {"hsmstek_tickets_renewed_total",
     "Handshakes resumed from a ticket, a fresh ticket asked for.", "counter",
     "", NGX_HSMSTEK_FIELD(tickets_renewed), 0},
    {"hsmstek_tickets_rejected_total",
     "Tickets refused (full handshake instead), by reason.", "counter",
     ",reason=\"unknown_key\"", NGX_HSMSTEK_FIELD(rejected_unknown_key), 0},
    {"hsmstek_tickets_rejected_total", NULL, NULL, ",reason=\"expired\"",
     NGX_HSMSTEK_FIELD(rejected_expired), 0},
    {"hsmstek_tickets_rejected_total", NULL, NULL, ",reason=\"future\"",
     NGX_HSMSTEK_FIELD(rejected_future), 0},
    {"hsmstek_tickets_rejected_total", NULL, NULL, ",reason=\"not_routed\"",
     NGX_HSMSTEK_FIELD(rejected_not_routed), 0},
    {"hsmstek_tickets_rejected_total", NULL, NULL, ",reason=\"policy\"",
     NGX_HSMSTEK_RESUMPTION_FIELD(rejected_policy), 0},
    {"hsmstek_tickets_rejected_total", NULL, NULL, ",reason=\"budget\"",
     NGX_HSMSTEK_RESUMPTION_FIELD(rejected_budget), 0},
    {"hsmstek_tickets_not_resumed_total",
     "Tickets opened that still ended in a full handshake (OpenSSL refused "
     "the session: session id context, version, cipher).",
     "counter", "", NGX_HSMSTEK_RESUMPTION_FIELD(opened_not_resumed), 0},
    {"hsmstek_early_data_refused_total",
     "Handshakes in which early data was switched off (a server without "
     "hsmstek_early_data).",
     "counter", "", NGX_HSMSTEK_RESUMPTION_FIELD(early_data_refused), 0},
    {"hsmstek_token_errors_total", "Token failures seen by the callback.",
     "counter", "", NGX_HSMSTEK_FIELD(token_errors), 0},
    {"hsmstek_derivations_total", "Per-epoch keys derived in the token.",
     "counter", "", NGX_HSMSTEK_FIELD(derivations), 0},
    {"hsmstek_reconnects_total", "Successful token (re)connects.", "counter",
     "", NGX_HSMSTEK_FIELD(reconnects), 0},
    {"hsmstek_seal_operations_total", "Tickets sealed (timed operations).",
     "counter", "", NGX_HSMSTEK_FIELD(seal.count), 0},
    {"hsmstek_seal_latency_seconds",
     "Latency of sealing one ticket (estimated quantiles).", "gauge",
     ",quantile=\"0.5\"", NGX_HSMSTEK_FIELD(seal.p50_ns), 1},
    {"hsmstek_seal_latency_seconds", NULL, NULL, ",quantile=\"0.99\"",
     NGX_HSMSTEK_FIELD(seal.p99_ns), 1},
    {"hsmstek_seal_latency_max_seconds", "Slowest seal of one ticket.", "gauge",
     "", NGX_HSMSTEK_FIELD(seal.max_ns), 1},
    {"hsmstek_open_operations_total", "Tickets opened (timed operations).",
     "counter", "", NGX_HSMSTEK_FIELD(open.count), 0},
    {"hsmstek_open_latency_seconds",
     "Latency of opening one ticket (estimated quantiles).", "gauge",
     ",quantile=\"0.5\"", NGX_HSMSTEK_FIELD(open.p50_ns), 1},
    {"hsmstek_open_latency_seconds", NULL, NULL, ",quantile=\"0.99\"",
     NGX_HSMSTEK_FIELD(open.p99_ns), 1},
    {"hsmstek_open_latency_max_seconds", "Slowest open of one ticket.", "gauge",
     "", NGX_HSMSTEK_FIELD(open.max_ns), 1},
    /* Round trips to the token on this worker's event loop (docs/DESIGN.md,
     * "Pre-armed operations"): 1 per step when armed, 2 on demand. */
    {"hsmstek_token_round_trips_per_operation",
     "Token calls made on the event loop per ticket seal / open.", "gauge",
     ",op=\"seal\"", NGX_HSMSTEK_TOKEN_FIELD(round_trips_per_seal_milli), 2},
    {"hsmstek_token_round_trips_per_operation", NULL, NULL, ",op=\"open\"",
     NGX_HSMSTEK_TOKEN_FIELD(round_trips_per_open_milli), 2},
    {"hsmstek_token_round_trips_total",
     "Token calls made on the event loop, by ticket operation.", "counter",
     ",op=\"seal\"", NGX_HSMSTEK_TOKEN_FIELD(seal_round_trips), 0},
    {"hsmstek_token_round_trips_total", NULL, NULL, ",op=\"open\"",
     NGX_HSMSTEK_TOKEN_FIELD(open_round_trips), 0},
    {"hsmstek_token_call_latency_seconds",
     "Time of one ticket step's token calls (estimated quantiles).", "gauge",
     ",step=\"encrypt\",quantile=\"0.5\"",
     NGX_HSMSTEK_TOKEN_FIELD(encrypt.p50_ns), 1},
    {"hsmstek_token_call_latency_seconds", NULL, NULL,
     ",step=\"encrypt\",quantile=\"0.99\"",
     NGX_HSMSTEK_TOKEN_FIELD(encrypt.p99_ns), 1},
    {"hsmstek_token_call_latency_seconds", NULL, NULL,
     ",step=\"decrypt\",quantile=\"0.5\"",
     NGX_HSMSTEK_TOKEN_FIELD(decrypt.p50_ns), 1},
    {"hsmstek_token_call_latency_seconds", NULL, NULL,
     ",step=\"decrypt\",quantile=\"0.99\"",
     NGX_HSMSTEK_TOKEN_FIELD(decrypt.p99_ns), 1},
    {"hsmstek_token_call_latency_seconds", NULL, NULL,
     ",step=\"sign\",quantile=\"0.5\"", NGX_HSMSTEK_TOKEN_FIELD(sign.p50_ns),
     1},
    {"hsmstek_token_call_latency_seconds", NULL, NULL,
     ",step=\"sign\",quantile=\"0.99\"", NGX_HSMSTEK_TOKEN_FIELD(sign.p99_ns),
     1},
    {"hsmstek_armed_operations_total",
     "Ticket steps that found an operation initialised ahead of use.",
     "counter", ",result=\"hit\"", NGX_HSMSTEK_TOKEN_FIELD(armed_hits), 0},
    {"hsmstek_armed_operations_total", NULL, NULL, ",result=\"miss\"",
     NGX_HSMSTEK_TOKEN_FIELD(armed_misses), 0},
};

/* Upper bound of one sample line besides the metric's name and labels:
 * '{store="' ["stream:"] name '"' '}' ' ' value '\n'. */
#define NGX_HSMSTEK_SAMPLE_EXTRA \
  (sizeof("stream:") + NGX_HSMSTEK_MAX_NAME + 16 + NGX_INT64_LEN + 12)

/* The stream{} stores of this worker, or NULL. ngx_stream_hsmstek_module
 * lives in another shared object (loaded or not), so it is found by name. */
static ngx_hsmstek_main_conf_t *ngx_http_hsmstek_stream_conf(
    ngx_cycle_t *cycle) {
#if (NGX_HSMSTEK_STREAM)
  ngx_module_t *stream = NULL, *ours = NULL;
  for (ngx_uint_t i = 0; cycle->modules[i] != NULL; i++) {
    const char *name = cycle->modules[i]->name;
    if (name == NULL) {
      continue;
    }
    if (ngx_strcmp(name, "ngx_stream_module") == 0) {
      stream = cycle->modules[i];
    } else if (ngx_strcmp(name, "ngx_stream_hsmstek_module") == 0) {
      ours = cycle->modules[i];
    }
  }
  if (stream == NULL || ours == NULL ||
      cycle->conf_ctx[stream->index] == NULL) {
    return NULL;
  }
  return ((ngx_stream_conf_ctx_t *)cycle->conf_ctx[stream->index])
      ->main_conf[ours->ctx_index];
#else
  (void)cycle;
  return NULL;
#endif
}

/* One store on the status page: http stores under their name, stream
 * stores as "stream:<name>" (store names cannot contain ':'). */
typedef struct {
  ngx_str_t label;
  hsmstek_store *store;
} ngx_http_hsmstek_row_t;

/* ngx_http_hsmstek_health writes the token health families (one sample
 * per token of each open store, token="1" the preferred one) into
 * [p, end) and returns the new end of the text. */
static u_char *ngx_http_hsmstek_health(u_char *p, u_char *end,
                                       const ngx_http_hsmstek_row_t *stores,
                                       ngx_uint_t n) {
  static const struct {
    const char *name, *type, *help;
  } families[] = {
      {"hsmstek_token_up", "gauge",
       "1 if the token is connected in this worker."},
      {"hsmstek_token_active", "gauge",
       "1 for the token this worker's handshakes use now."},
      {"hsmstek_token_verified", "gauge",
       "1 if the token was checked to hold the store's masters."},
      {"hsmstek_token_seconds_since_success", "gauge",
       "Seconds since the token was last used successfully (-1: never)."},
      {"hsmstek_token_failovers_total", "counter",
       "Times this worker's handshakes moved away from the token."},
      {"hsmstek_token_last_error_info", "gauge",
       "The token's last fault or failed connect (1 while there is one)."},
  };
  for (size_t f = 0; f < sizeof(families) / sizeof(families[0]); f++) {
    p = ngx_slprintf(p, end, "# HELP %s %s\n# TYPE %s %s\n", families[f].name,
                     families[f].help, families[f].name, families[f].type);
    for (ngx_uint_t i = 0; i < n; i++) {
      if (stores[i].store == NULL) {
        continue;
      }
      size_t count = hsmstek_store_token_count(stores[i].store);
      for (size_t t = 0; t < count && t < NGX_HSMSTEK_MAX_TOKENS; t++) {
        hsmstek_token_health h;
        if (hsmstek_store_token_health(stores[i].store, t, &h, sizeof(h)) !=
            HSMSTEK_OK) {
          continue;
        }
        if (f == 5 && h.last_error[0] == '\0') {
          continue;
        }
        p = ngx_slprintf(p, end, "%s{store=\"%V\",token=\"%uz\"",
                         families[f].name, &stores[i].label, t + 1);
        switch (f) {
          case 0:
            p = ngx_slprintf(p, end, "} %d\n", h.up);
            break;
          case 1:
            p = ngx_slprintf(p, end, "} %d\n", h.active);
            break;
          case 2:
            p = ngx_slprintf(p, end, "} %d\n", h.verified);
            break;
          case 3:
            if (h.ms_since_success < 0) {
              p = ngx_slprintf(p, end, "} -1\n");
            } else {
              p = ngx_slprintf(p, end, "} %L.%03L\n", h.ms_since_success / 1000,
                               h.ms_since_success % 1000);
            }
            break;
          case 4:
            p = ngx_slprintf(p, end, "} %uL\n", h.failovers);
            break;
          default:
            /* Label value escaping of the text format: \\, \" and \n. */
            p = ngx_slprintf(p, end, ",error=\"");
            for (const char *c = h.last_error; *c != '\0' && p + 2 < end; c++) {
              if (*c == '"' || *c == '\\') {
                *p++ = '\\';
                *p++ = (u_char)*c;
              } else if (*c == '\n') {
                *p++ = '\\';
                *p++ = 'n';
              } else {
                *p++ = (u_char)*c;
              }
            }
            p = ngx_slprintf(p, end, "\"} 1\n");
            break;
        }
      }
    }
  }
  return p;
}

/* ngx_http_hsmstek_forward_secrecy writes the ratchet families (one sample
 * per store whose active master the last maintenance pass saw; read from
 * the store, no token round trip) into [p, end) and returns the new end. */
static u_char *ngx_http_hsmstek_forward_secrecy(
    u_char *p, u_char *end, const ngx_http_hsmstek_row_t *stores,
    ngx_uint_t n) {
  static const struct {
    const char *name, *help;
  } families[] = {
      {"hsmstek_ratchet_link",
       "Index of the ratchet link serving the current epoch of the active "
       "master."},
      {"hsmstek_forward_secrecy_horizon_seconds",
       "Unix time of the oldest epoch whose tickets the store's tokens can "
       "still open (0: a legacy key opens tickets of any age)."},
  };
  for (size_t f = 0; f < sizeof(families) / sizeof(families[0]); f++) {
    p = ngx_slprintf(p, end, "# HELP %s %s\n# TYPE %s gauge\n",
                     families[f].name, families[f].help, families[f].name);
    for (ngx_uint_t i = 0; i < n; i++) {
      hsmstek_forward_secrecy fs;
      if (stores[i].store == NULL ||
          hsmstek_store_forward_secrecy(stores[i].store, &fs, sizeof(fs)) !=
              HSMSTEK_OK) {
        continue;
      }
      p = ngx_slprintf(p, end, "%s{store=\"%V\"} ", families[f].name,
                       &stores[i].label);
      if (f == 0) {
        p = ngx_slprintf(p, end, "%uL\n", fs.current_link);
      } else {
        p = ngx_slprintf(p, end, "%L\n", fs.horizon);
      }
    }
  }
  return p;
}

static ngx_int_t ngx_http_hsmstek_status_handler(ngx_http_request_t *r) {
  if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) {
    return NGX_HTTP_NOT_ALLOWED;
  }
  ngx_int_t rc = ngx_http_discard_request_body(r);
  if (rc != NGX_OK) {
    return rc;
  }

  ngx_hsmstek_main_conf_t *mcf =
      ngx_http_get_module_main_conf(r, ngx_http_hsmstek_module);
  ngx_hsmstek_main_conf_t *smcf =
      ngx_http_hsmstek_stream_conf((ngx_cycle_t *)ngx_cycle);
  ngx_uint_t n_http = mcf->stores.nelts;
  ngx_uint_t n = n_http + (smcf != NULL ? smcf->stores.nelts : 0);
  ngx_http_hsmstek_row_t *stores =
      ngx_pcalloc(r->pool, (n + 1) * sizeof(*stores));
  if (stores == NULL) {
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
  }
  for (ngx_uint_t i = 0; i < n; i++) {
    const ngx_hsmstek_store_conf_t *conf =
        i < n_http
            ? &((ngx_hsmstek_store_conf_t *)mcf->stores.elts)[i]
            : &((ngx_hsmstek_store_conf_t *)smcf->stores.elts)[i - n_http];
    stores[i].store = conf->store;
    if (i < n_http) {
      stores[i].label = conf->name;
      continue;
    }
    static const char prefix[] = "stream:";
    stores[i].label.len = sizeof(prefix) - 1 + conf->name.len;
    stores[i].label.data = ngx_pnalloc(r->pool, stores[i].label.len);
    if (stores[i].label.data == NULL) {
      return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    ngx_memcpy(ngx_cpymem(stores[i].label.data, prefix, sizeof(prefix) - 1),
               conf->name.data, conf->name.len);
  }

  /* Snapshot first so every family shows the same moment. */
  ngx_http_hsmstek_snapshot_t *stats =
      ngx_pcalloc(r->pool, (n + 1) * sizeof(*stats));
  ngx_uint_t *have = ngx_pcalloc(r->pool, (n + 1) * sizeof(*have));
  if (stats == NULL || have == NULL) {
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
  }
  for (ngx_uint_t i = 0; i < n; i++) {
    have[i] =
        stores[i].store != NULL &&
        hsmstek_store_stats(stores[i].store, &stats[i].stats) == HSMSTEK_OK &&
        hsmstek_store_token_stats(stores[i].store, &stats[i].token,
                                  sizeof(stats[i].token)) == HSMSTEK_OK &&
        hsmstek_store_resumption_stats(stores[i].store, &stats[i].resumption,
                                       sizeof(stats[i].resumption)) ==
            HSMSTEK_OK;
  }

  /* Token health: 6 families of at most NGX_HSMSTEK_MAX_TOKENS samples
   * per store, the last error escaped (at most doubled). */
  /* Ratchet: 2 families of one sample per store. */
  size_t size = 256 + n * NGX_HSMSTEK_SAMPLE_EXTRA * 2 + 6 * 160 +
                2 * (256 + n * (48 + NGX_HSMSTEK_SAMPLE_EXTRA)) +
                n * NGX_HSMSTEK_MAX_TOKENS *
                    (6 * NGX_HSMSTEK_SAMPLE_EXTRA +
                     2 * sizeof(((hsmstek_token_health *)0)->last_error));
  for (size_t m = 0; m < sizeof(ngx_http_hsmstek_metrics) /
                             sizeof(ngx_http_hsmstek_metrics[0]);
       m++) {
    const ngx_http_hsmstek_metric_t *metric = &ngx_http_hsmstek_metrics[m];
    size_t name_len = ngx_strlen(metric->name);
    if (metric->help != NULL) {
      size += 2 * name_len + ngx_strlen(metric->help) +
              ngx_strlen(metric->type) + 32;
    }
    size +=
        n * (name_len + ngx_strlen(metric->labels) + NGX_HSMSTEK_SAMPLE_EXTRA);
  }

  ngx_buf_t *b = ngx_create_temp_buf(r->pool, size);
  if (b == NULL) {
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
  }
  u_char *p = b->last;
  u_char *end = b->end;
  p = ngx_slprintf(p, end,
                   "# hsmstek counters of nginx worker %P (each worker "
                   "counts its own handshakes)\n",
                   ngx_pid);
  p = ngx_slprintf(p, end,
                   "# HELP hsmstek_store_open 1 if this worker opened the "
                   "store, 0 if opening failed.\n"
                   "# TYPE hsmstek_store_open gauge\n");
  for (ngx_uint_t i = 0; i < n; i++) {
    p = ngx_slprintf(p, end, "hsmstek_store_open{store=\"%V\"} %ui\n",
                     &stores[i].label, (ngx_uint_t)(stores[i].store != NULL));
  }
  for (size_t m = 0; m < sizeof(ngx_http_hsmstek_metrics) /
                             sizeof(ngx_http_hsmstek_metrics[0]);
       m++) {
    const ngx_http_hsmstek_metric_t *metric = &ngx_http_hsmstek_metrics[m];
    if (metric->help != NULL) {
      p = ngx_slprintf(p, end, "# HELP %s %s\n# TYPE %s %s\n", metric->name,
                       metric->help, metric->name, metric->type);
    }
    for (ngx_uint_t i = 0; i < n; i++) {
      if (!have[i]) {
        continue;
      }
      uint64_t v =
          *(const uint64_t *)((const u_char *)&stats[i] + metric->offset);
      p = ngx_slprintf(p, end, "%s{store=\"%V\"%s} ", metric->name,
                       &stores[i].label, metric->labels);
      if (metric->scale == 1) {
        p = ngx_slprintf(p, end, "%uL.%09uL\n", v / 1000000000, v % 1000000000);
      } else if (metric->scale == 2) {
        p = ngx_slprintf(p, end, "%uL.%03uL\n", v / 1000, v % 1000);
      } else {
        p = ngx_slprintf(p, end, "%uL\n", v);
      }
    }
  }
  p = ngx_http_hsmstek_health(p, end, stores, n);
  p = ngx_http_hsmstek_forward_secrecy(p, end, stores, n);
  b->last = p;
  b->last_buf = (r == r->main) ? 1 : 0;
  b->last_in_chain = 1;

  ngx_str_set(&r->headers_out.content_type,
              "text/plain; version=0.0.4; charset=utf-8");
  r->headers_out.content_type_len = r->headers_out.content_type.len;
  r->headers_out.content_type_lowcase = NULL;
  r->headers_out.status = NGX_HTTP_OK;
  r->headers_out.content_length_n = b->last - b->pos;

  rc = ngx_http_send_header(r);
  if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
    return rc;
  }
  ngx_chain_t out = {b, NULL};
  return ngx_http_output_filter(r, &out);
}

static char *ngx_http_hsmstek_status(ngx_conf_t *cf, ngx_command_t *cmd,
                                     void *conf) {
  (void)cmd;
  (void)conf;
  ngx_http_core_loc_conf_t *clcf =
      ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
  clcf->handler = ngx_http_hsmstek_status_handler;
  return NGX_CONF_OK;
}
