/* Shared parts of the hsmstek nginx modules; see ngx_hsmstek_common.h. */
#include "ngx_hsmstek_common.h"

#include <openssl/err.h>

static const ngx_str_t ngx_hsmstek_scheme = ngx_string("pkcs11:");

/* ngx_hsmstek_valid_name reports whether |name| is a usable store name. */
static ngx_int_t ngx_hsmstek_valid_name(const ngx_str_t *name) {
  if (name->len == 0 || name->len > NGX_HSMSTEK_MAX_NAME) {
    return 0;
  }
  for (size_t i = 0; i < name->len; i++) {
    u_char c = name->data[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.')) {
      return 0;
    }
  }
  /* "off" would be ambiguous in hsmstek_tickets. */
  return !(name->len == 3 && ngx_strncmp(name->data, "off", 3) == 0);
}

/* ngx_hsmstek_check_uri checks the shape of a PKCS#11 URI without parsing
 * it fully (the library does that in the worker) and without any PKCS#11
 * call. Returns NULL if acceptable, else a reason. The URI itself is never
 * echoed: it may carry a pin-value. */
static const char *ngx_hsmstek_check_uri(const ngx_str_t *uri,
                                         ngx_uint_t *pin_value) {
  *pin_value = 0;
  if (uri->len < ngx_hsmstek_scheme.len ||
      ngx_strncasecmp(uri->data, ngx_hsmstek_scheme.data,
                      ngx_hsmstek_scheme.len) != 0) {
    return "it does not start with \"pkcs11:\"";
  }
  for (size_t i = 0; i < uri->len; i++) {
    if (uri->data[i] <= ' ' || uri->data[i] >= 0x7f) {
      return "it contains a space, control or non-ASCII character";
    }
  }

  /* Path attributes: "pkcs11:" attr *( ";" attr ) [ "?" query ]. */
  u_char *p = uri->data + ngx_hsmstek_scheme.len;
  u_char *end = uri->data + uri->len;
  u_char *query = ngx_strlchr(p, end, '?');
  u_char *path_end = query ? query : end;
  ngx_uint_t has_object = 0;
  while (p < path_end) {
    u_char *attr_end = ngx_strlchr(p, path_end, ';');
    if (attr_end == NULL) {
      attr_end = path_end;
    }
    size_t len = (size_t)(attr_end - p);
    if (len > sizeof("object=") - 1 &&
        ngx_strncmp(p, "object=", sizeof("object=") - 1) == 0) {
      has_object = 1;
    }
    p = attr_end + 1;
  }
  if (!has_object) {
    return "it has no \"object=\" path attribute naming the store label";
  }

  /* Query attributes: "?" q *( "&" q ). */
  if (query != NULL) {
    p = query + 1;
    while (p < end) {
      u_char *q_end = ngx_strlchr(p, end, '&');
      if (q_end == NULL) {
        q_end = end;
      }
      if ((size_t)(q_end - p) >= sizeof("pin-value=") - 1 &&
          ngx_strncmp(p, "pin-value=", sizeof("pin-value=") - 1) == 0) {
        *pin_value = 1;
      }
      p = q_end + 1;
    }
  }
  return NULL;
}

ngx_int_t ngx_hsmstek_init_main_conf(ngx_conf_t *cf,
                                     ngx_hsmstek_main_conf_t *mcf,
                                     const char *module) {
  if (ngx_array_init(&mcf->stores, cf->pool, 2,
                     sizeof(ngx_hsmstek_store_conf_t)) != NGX_OK ||
      ngx_array_init(&mcf->installs, cf->pool, 4,
                     sizeof(ngx_hsmstek_install_t)) != NGX_OK) {
    return NGX_ERROR;
  }
  mcf->module = module;
  mcf->opened = 0;
  return NGX_OK;
}

/* ngx_hsmstek_may_echo: whether an argument may be printed in an error.
 * Never one that may be (part of) a PKCS#11 URI: it may carry a pin-value. */
static ngx_uint_t ngx_hsmstek_may_echo(const ngx_str_t *arg) {
  static const char *const bad[] = {"pkcs11", "pin-"};
  for (size_t b = 0; b < sizeof(bad) / sizeof(bad[0]); b++) {
    size_t n = ngx_strlen(bad[b]);
    for (size_t i = 0; i + n <= arg->len; i++) {
      if (ngx_strncasecmp(arg->data + i, (u_char *)bad[b], n) == 0) return 0;
    }
  }
  for (size_t i = 0; i < arg->len; i++) {
    if (arg->data[i] == '?' || arg->data[i] == '%') return 0;
  }
  return 1;
}

/* ngx_hsmstek_store_option parses one "key=value" option of hsmstek_store
 * (argument number |n| of the directive) into |store|. Returns NGX_CONF_OK
 * or NGX_CONF_ERROR (already logged; an argument that may carry a PIN is
 * named by its number, never printed). */
static char *ngx_hsmstek_store_option(ngx_conf_t *cf,
                                      ngx_hsmstek_store_conf_t *store,
                                      ngx_str_t *opt, ngx_uint_t n) {
  static const ngx_str_t skew = ngx_string("clock_skew=");
  static const ngx_str_t renew = ngx_string("tls13_renew=");

  if (!ngx_hsmstek_may_echo(opt)) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter #%ui of hsmstek store \"%V\" (not "
                       "shown: it may carry a PIN); a PKCS#11 URI must come "
                       "before the options",
                       n, &store->name);
    return NGX_CONF_ERROR;
  }

  if (opt->len > skew.len && ngx_strncmp(opt->data, skew.data, skew.len) == 0) {
    if (store->clock_skew != NGX_CONF_UNSET) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "duplicate \"clock_skew\" option of hsmstek store "
                         "\"%V\"",
                         &store->name);
      return NGX_CONF_ERROR;
    }
    ngx_str_t value = {opt->len - skew.len, opt->data + skew.len};
    time_t seconds = ngx_parse_time(&value, 1);
    if (seconds == (time_t)NGX_ERROR || seconds > 3600) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "invalid \"clock_skew\" value \"%V\" of hsmstek "
                         "store \"%V\": a time from 0s to 1h is expected",
                         &value, &store->name);
      return NGX_CONF_ERROR;
    }
    store->clock_skew = (ngx_int_t)seconds;
    return NGX_CONF_OK;
  }

  if (opt->len > renew.len &&
      ngx_strncmp(opt->data, renew.data, renew.len) == 0) {
    if (store->tls13_renew != NGX_CONF_UNSET) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "duplicate \"tls13_renew\" option of hsmstek store "
                         "\"%V\"",
                         &store->name);
      return NGX_CONF_ERROR;
    }
    ngx_str_t value = {opt->len - renew.len, opt->data + renew.len};
    if (value.len == 2 && ngx_strncmp(value.data, "on", 2) == 0) {
      store->tls13_renew = 1;
    } else if (value.len == 3 && ngx_strncmp(value.data, "off", 3) == 0) {
      store->tls13_renew = 0;
    } else {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "invalid \"tls13_renew\" value \"%V\" of hsmstek "
                         "store \"%V\": \"on\" or \"off\" is expected",
                         &value, &store->name);
      return NGX_CONF_ERROR;
    }
    return NGX_CONF_OK;
  }

  ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                     "invalid parameter \"%V\" of hsmstek store \"%V\": "
                     "\"clock_skew=\" or \"tls13_renew=\" is expected",
                     opt, &store->name);
  return NGX_CONF_ERROR;
}

char *ngx_hsmstek_store_directive(ngx_conf_t *cf, ngx_command_t *cmd,
                                  void *conf) {
  ngx_hsmstek_main_conf_t *mcf = conf;
  ngx_str_t *value = cf->args->elts;

  if (cf->args->nelts > 3 + NGX_HSMSTEK_MAX_TOKENS + 1) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid number of arguments in \"%V\" directive",
                       &cmd->name);
    return NGX_CONF_ERROR;
  }

  ngx_str_t *name = &value[1];
  if (!ngx_hsmstek_valid_name(name)) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid store name \"%V\" in \"%V\" directive: 1 to "
                       "%d characters of [A-Za-z0-9_.-] other than \"off\" "
                       "are expected",
                       name, &cmd->name, NGX_HSMSTEK_MAX_NAME);
    return NGX_CONF_ERROR;
  }

  ngx_hsmstek_store_conf_t *stores = mcf->stores.elts;
  for (ngx_uint_t i = 0; i < mcf->stores.nelts; i++) {
    if (stores[i].name.len == name->len &&
        ngx_strncmp(stores[i].name.data, name->data, name->len) == 0) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "duplicate hsmstek store \"%V\" in \"%V\" directive "
                         "(first defined in %s:%ui)",
                         name, &cmd->name, stores[i].file, stores[i].line);
      return NGX_CONF_ERROR;
    }
  }

  /* The URIs: value[2] and every following argument that starts with
   * "pkcs11:" in any case (the scheme is case-insensitive; options never
   * do). */
  ngx_uint_t nuris = 0;
  while (2 + nuris < cf->args->nelts && value[2 + nuris].len >= 7 &&
         ngx_strncasecmp(value[2 + nuris].data, (u_char *)"pkcs11:", 7) == 0) {
    nuris++;
  }
  if (nuris == 0) nuris = 1; /* value[2] is checked (and refused) below */
  if (nuris > NGX_HSMSTEK_MAX_TOKENS) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "hsmstek store \"%V\" names more than %d tokens", name,
                       NGX_HSMSTEK_MAX_TOKENS);
    return NGX_CONF_ERROR;
  }
  for (ngx_uint_t u = 0; u < nuris; u++) {
    ngx_uint_t pin_value;
    const char *why = ngx_hsmstek_check_uri(&value[2 + u], &pin_value);
    if (why != NULL) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "invalid PKCS#11 URI of hsmstek store \"%V\" in "
                         "\"%V\" directive: %s",
                         name, &cmd->name, why);
      return NGX_CONF_ERROR;
    }
    if (pin_value) {
      ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                         "the PKCS#11 URI of hsmstek store \"%V\" carries a "
                         "\"pin-value\": anyone who can read the "
                         "configuration learns the PIN; prefer "
                         "\"pin-source\" or HSMSTEK_PIN",
                         name);
    }
  }

  ngx_hsmstek_store_conf_t *store = ngx_array_push(&mcf->stores);
  if (store == NULL) {
    return NGX_CONF_ERROR;
  }
  ngx_memzero(store, sizeof(*store));
  store->name = *name;
  /* hsmstek_store_open_tokens takes C strings. */
  for (ngx_uint_t u = 0; u < nuris; u++) {
    u_char *copy = ngx_pnalloc(cf->pool, value[2 + u].len + 1);
    if (copy == NULL) {
      return NGX_CONF_ERROR;
    }
    ngx_memcpy(copy, value[2 + u].data, value[2 + u].len);
    copy[value[2 + u].len] = '\0';
    store->uris[u] = (const char *)copy;
    if (u == 0) {
      store->uri.data = copy;
      store->uri.len = value[2].len;
    }
  }
  store->nuris = nuris;
  store->clock_skew = NGX_CONF_UNSET;
  store->tls13_renew = NGX_CONF_UNSET;
  store->file = cf->conf_file->file.name.data;
  store->line = cf->conf_file->line;
  store->store = NULL;

  for (ngx_uint_t i = 2 + nuris; i < cf->args->nelts; i++) {
    if (ngx_hsmstek_store_option(cf, store, &value[i], i) != NGX_CONF_OK) {
      return NGX_CONF_ERROR;
    }
  }
  return NGX_CONF_OK;
}

char *ngx_hsmstek_tickets_directive(ngx_conf_t *cf, ngx_command_t *cmd,
                                    void *conf) {
  ngx_hsmstek_srv_conf_t *scf = conf;
  ngx_str_t *value = cf->args->elts;

  if (scf->enabled != NGX_CONF_UNSET) {
    return "is duplicate";
  }
  if (value[1].len == 3 && ngx_strncmp(value[1].data, "off", 3) == 0) {
    scf->enabled = 0;
  } else if (ngx_hsmstek_valid_name(&value[1])) {
    scf->enabled = 1;
    scf->name = value[1];
  } else {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid store name \"%V\" in \"%V\" directive",
                       &value[1], &cmd->name);
    return NGX_CONF_ERROR;
  }
  scf->file = cf->conf_file->file.name.data;
  scf->line = cf->conf_file->line;
  return NGX_CONF_OK;
}

ngx_hsmstek_srv_conf_t *ngx_hsmstek_create_srv_conf(ngx_conf_t *cf) {
  ngx_hsmstek_srv_conf_t *scf = ngx_pcalloc(cf->pool, sizeof(*scf));
  if (scf == NULL) {
    return NULL;
  }
  scf->enabled = NGX_CONF_UNSET;
  scf->early_data = NGX_CONF_UNSET;
  return scf;
}

char *ngx_hsmstek_merge_srv_conf(ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf,
                                 ngx_hsmstek_srv_conf_t *prev,
                                 ngx_hsmstek_srv_conf_t *conf) {
  /* A plain variable: the merge macro does not parenthesise its argument. */
  ngx_flag_t prev_early_data = prev != NULL ? prev->early_data : NGX_CONF_UNSET;
  ngx_conf_merge_value(conf->early_data, prev_early_data, 0);
  if (conf->enabled == NGX_CONF_UNSET && prev != NULL) {
    conf->enabled = prev->enabled;
    conf->name = prev->name;
    conf->file = prev->file;
    conf->line = prev->line;
  }
  if (conf->enabled != 1) {
    /* Stays NGX_CONF_UNSET if never set: http tells "not configured" from
     * "off" for name-based virtual servers. */
    return NGX_CONF_OK;
  }

  ngx_hsmstek_store_conf_t *stores = mcf->stores.elts;
  for (ngx_uint_t i = 0; i < mcf->stores.nelts; i++) {
    if (stores[i].name.len == conf->name.len &&
        ngx_strncmp(stores[i].name.data, conf->name.data, conf->name.len) ==
            0) {
      conf->store = i;
      return NGX_CONF_OK;
    }
  }
  /* Merging runs after the whole block was read, so cf's position is not
   * the directive's: name the directive's own file:line. */
  ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                "unknown hsmstek store \"%V\" in \"hsmstek_tickets\" "
                "directive in %s:%ui (no \"hsmstek_store %V ...;\" in the %s "
                "block)",
                &conf->name, conf->file, conf->line, &conf->name, mcf->module);
  return NGX_CONF_ERROR;
}

ngx_int_t ngx_hsmstek_add_install(ngx_conf_t *cf, ngx_hsmstek_main_conf_t *mcf,
                                  ngx_hsmstek_srv_conf_t *scf, SSL_CTX *ctx,
                                  ngx_flag_t session_tickets, u_char *file,
                                  ngx_uint_t line) {
  if (scf->enabled != 1) {
    return NGX_OK;
  }
  if (ctx == NULL) {
    /* Typical when hsmstek_tickets is set in http{} for all servers. */
    ngx_log_debug3(NGX_LOG_DEBUG_CORE, cf->log, 0,
                   "hsmstek: server in %s:%ui has no ssl, store \"%V\" unused",
                   file, line, &scf->name);
    return NGX_OK;
  }
  if (!session_tickets) {
    ngx_log_error(NGX_LOG_INFO, cf->log, 0,
                  "hsmstek: \"ssl_session_tickets off\" in the server in "
                  "%s:%ui: hsmstek store \"%V\" is not used there",
                  file, line, &scf->name);
    return NGX_OK;
  }
  return ngx_hsmstek_add_install_store(cf, mcf, ctx, scf->store,
                                       scf->early_data == 1, file, line);
}

ngx_int_t ngx_hsmstek_add_install_store(ngx_conf_t *cf,
                                        ngx_hsmstek_main_conf_t *mcf,
                                        SSL_CTX *ctx, ngx_uint_t store,
                                        ngx_flag_t early_data, u_char *file,
                                        ngx_uint_t line) {
  ngx_hsmstek_install_t *in = mcf->installs.elts;
  for (ngx_uint_t i = 0; i < mcf->installs.nelts; i++) {
    if (in[i].ctx == ctx) {
      return in[i].store == store ? NGX_OK : NGX_DECLINED;
    }
  }

  in = ngx_array_push(&mcf->installs);
  if (in == NULL) {
    return NGX_ERROR;
  }
  in->ctx = ctx;
  in->store = store;
  in->active = 0;
  in->early_data = early_data;
  in->server.data = ngx_pnalloc(cf->pool, ngx_strlen(file) + 64);
  if (in->server.data == NULL) {
    return NGX_ERROR;
  }
  in->server.len =
      ngx_sprintf(in->server.data, "server in %s:%ui", file, line) -
      in->server.data;
  return NGX_OK;
}

/* ngx_hsmstek_no_ticket_cb is the ticket key callback of an SSL_CTX whose
 * store is not usable: issue no ticket and accept none (full handshakes).
 * Installing it keeps OpenSSL from falling back to its own in-memory keys,
 * also for SNI servers reached through this context. */
static int ngx_hsmstek_no_ticket_cb(SSL *ssl, unsigned char *key_name,
                                    unsigned char *iv, EVP_CIPHER_CTX *cctx,
                                    EVP_MAC_CTX *hctx, int enc) {
  (void)ssl;
  (void)key_name;
  (void)iv;
  (void)cctx;
  (void)hctx;
  (void)enc;
  return 0;
}

/* ngx_hsmstek_disable_tickets makes |ctx| issue and accept no tickets. */
static void ngx_hsmstek_disable_tickets(SSL_CTX *ctx) {
  SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ngx_hsmstek_no_ticket_cb);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
}

ngx_int_t ngx_hsmstek_postconfiguration(ngx_conf_t *cf,
                                        ngx_hsmstek_main_conf_t *mcf) {
  if (mcf->installs.nelts == 0) {
    return NGX_OK;
  }
  /* After every server{} was merged, so "ssl_early_data" is applied. With
   * early data, OpenSSL either issues in-memory tickets (anti-replay on)
   * or replayable stateless ones (nginx sets SSL_OP_NO_ANTI_REPLAY). */
  ngx_hsmstek_store_conf_t *stores = mcf->stores.elts;
  ngx_hsmstek_install_t *ins = mcf->installs.elts;
  for (ngx_uint_t i = 0; i < mcf->installs.nelts; i++) {
    if (SSL_CTX_get_max_early_data(ins[i].ctx) > 0 && !ins[i].early_data) {
      ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                    "hsmstek: the %V has \"ssl_early_data on\" and uses "
                    "store \"%V\": stateless tickets give no replay "
                    "protection, so a recorded 0-RTT request could be "
                    "replayed on every server sharing the store; set "
                    "\"ssl_early_data off\", or \"hsmstek_early_data on\" in "
                    "that server to accept the risk (docs/SECURITY.md)",
                    &ins[i].server, &stores[ins[i].store].name);
      return NGX_ERROR;
    }
  }
  /* Only sets the default property query of OpenSSL's default library
   * context; tickets' HMAC is fetched per handshake, so SSL_CTXs created
   * earlier during this configuration are routed too. */
  if (hsmstek_enable_process_wide() != HSMSTEK_OK) {
    ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                  "hsmstek: cannot route OpenSSL to the hsmstek provider: %s",
                  hsmstek_last_error());
    return NGX_ERROR;
  }

  /* master_process off + reload: ngx_init_cycle runs again but no
   * init_process follows, so no store would be opened for the new contexts.
   * Fail closed rather than let OpenSSL use in-memory ticket keys. */
  if (ngx_process == NGX_PROCESS_SINGLE && !ngx_test_config &&
      !ngx_is_init_cycle(ngx_cycle)) {
    ngx_hsmstek_install_t *in = mcf->installs.elts;
    for (ngx_uint_t i = 0; i < mcf->installs.nelts; i++) {
      ngx_hsmstek_disable_tickets(in[i].ctx);
    }
    ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                  "hsmstek: reconfiguration with \"master_process off\": "
                  "session tickets of hsmstek servers are disabled until "
                  "nginx is restarted");
  }
  return NGX_OK;
}

/* ngx_hsmstek_log routes a library message to the current cycle's error
 * log. It may run on any thread; ngx_log_error only formats into a stack
 * buffer and write()s. */
static void ngx_hsmstek_log(int level, const char *msg, void *arg) {
  (void)arg;
  ngx_uint_t ngx_level;
  switch (level) {
    case HSMSTEK_LOG_ERROR:
      ngx_level = NGX_LOG_ERR;
      break;
    case HSMSTEK_LOG_WARNING:
      ngx_level = NGX_LOG_WARN;
      break;
    case HSMSTEK_LOG_INFO:
      ngx_level = NGX_LOG_INFO;
      break;
    case HSMSTEK_LOG_DEBUG:
      ngx_level = NGX_LOG_DEBUG;
      break;
    default:
      ngx_level = NGX_LOG_NOTICE;
      break;
  }
  /* Some library messages already carry the prefix. */
  if (ngx_strncmp(msg, "hsmstek: ", sizeof("hsmstek: ") - 1) == 0) {
    msg += sizeof("hsmstek: ") - 1;
  }
  ngx_log_error(ngx_level, ngx_cycle->log, 0, "hsmstek: %s", msg);
}

/* ngx_hsmstek_open_store opens |sc| and applies its options. On failure
 * the store stays NULL and the error is logged. */
static void ngx_hsmstek_open_store(ngx_cycle_t *cycle,
                                   ngx_hsmstek_main_conf_t *mcf,
                                   ngx_hsmstek_store_conf_t *sc) {
  hsmstek_store *store = NULL;
  if (hsmstek_store_open_tokens(sc->uris, sc->nuris, &store) != HSMSTEK_OK) {
    ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                  "hsmstek: cannot open %s store \"%V\" defined in %s:%ui: "
                  "%s; its servers issue no session tickets",
                  mcf->module, &sc->name, sc->file, sc->line,
                  hsmstek_last_error());
    return;
  }
  if (sc->clock_skew != NGX_CONF_UNSET &&
      hsmstek_store_set_option(store, HSMSTEK_OPT_CLOCK_SKEW_SECONDS,
                               (long)sc->clock_skew) != HSMSTEK_OK) {
    ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                  "hsmstek: store \"%V\": clock_skew: %s", &sc->name,
                  hsmstek_last_error());
    hsmstek_store_close(store);
    return;
  }
  if (sc->tls13_renew != NGX_CONF_UNSET &&
      hsmstek_store_set_option(store, HSMSTEK_OPT_TLS13_RENEW,
                               (long)sc->tls13_renew) != HSMSTEK_OK) {
    ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                  "hsmstek: store \"%V\": tls13_renew: %s", &sc->name,
                  hsmstek_last_error());
    hsmstek_store_close(store);
    return;
  }
  sc->store = store;
}

ngx_int_t ngx_hsmstek_open_stores(ngx_cycle_t *cycle,
                                  ngx_hsmstek_main_conf_t *mcf) {
  /* Cache manager/loader processes serve no TLS: no token sessions there. */
  if (mcf == NULL || mcf->stores.nelts == 0 ||
      (ngx_process != NGX_PROCESS_WORKER &&
       ngx_process != NGX_PROCESS_SINGLE)) {
    return NGX_OK;
  }
  hsmstek_set_log_callback(ngx_hsmstek_log, NULL);
  mcf->opened = 1;

  ngx_hsmstek_store_conf_t *stores = mcf->stores.elts;
  for (ngx_uint_t i = 0; i < mcf->stores.nelts; i++) {
    ngx_hsmstek_open_store(cycle, mcf, &stores[i]);
  }

  ngx_hsmstek_install_t *in = mcf->installs.elts;
  for (ngx_uint_t i = 0; i < mcf->installs.nelts; i++) {
    ngx_hsmstek_store_conf_t *sc = &stores[in[i].store];
    if (sc->store == NULL) {
      ngx_hsmstek_disable_tickets(in[i].ctx);
      continue;
    }
    /* Options are read at install: the early-data opt-in is per server. */
    if (hsmstek_store_set_option(sc->store, HSMSTEK_OPT_EARLY_DATA,
                                 in[i].early_data ? 1 : 0) != HSMSTEK_OK ||
        hsmstek_ssl_ctx_install(sc->store, in[i].ctx) != HSMSTEK_OK) {
      ngx_log_error(NGX_LOG_ERR, cycle->log, 0,
                    "hsmstek: cannot install store \"%V\" on the %V: %s; it "
                    "issues no session tickets",
                    &sc->name, &in[i].server, hsmstek_last_error());
      ngx_hsmstek_disable_tickets(in[i].ctx);
      continue;
    }
    in[i].active = 1;
    ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                  "hsmstek: session tickets of the %V use store \"%V\"",
                  &in[i].server, &sc->name);
  }

  /* Connect now so that token problems show up in the log at start; a
   * failure is not fatal: the library keeps retrying with back-off and
   * handshakes complete without tickets meanwhile. */
  for (ngx_uint_t i = 0; i < mcf->stores.nelts; i++) {
    if (stores[i].store == NULL) {
      continue;
    }
    if (hsmstek_store_check(stores[i].store) != HSMSTEK_OK) {
      ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                    "hsmstek: store \"%V\" is not ready: %s; retrying in "
                    "the background, no session tickets until then",
                    &stores[i].name, hsmstek_last_error());
    } else {
      ngx_log_error(NGX_LOG_INFO, cycle->log, 0,
                    "hsmstek: store \"%V\" is ready", &stores[i].name);
    }
  }
  /* PKCS#11 modules may leave entries on this thread's OpenSSL error queue
   * (SoftHSM 2.6 fails to load OpenSSL 3's "rdrand" engine in
   * C_Initialize); nginx would report them as stale errors on the first
   * handshake. They are not ours to keep. */
  ERR_clear_error();
  return NGX_OK;
}

void ngx_hsmstek_close_stores(ngx_hsmstek_main_conf_t *mcf) {
  if (mcf == NULL || !mcf->opened) {
    return;
  }
  /* Detach the contexts first: no callback may reach a closed store. */
  ngx_hsmstek_install_t *in = mcf->installs.elts;
  for (ngx_uint_t i = 0; i < mcf->installs.nelts; i++) {
    if (in[i].active) {
      ngx_hsmstek_disable_tickets(in[i].ctx);
      in[i].active = 0;
    }
  }
  ngx_hsmstek_store_conf_t *stores = mcf->stores.elts;
  for (ngx_uint_t i = 0; i < mcf->stores.nelts; i++) {
    hsmstek_store_close(stores[i].store);
    stores[i].store = NULL;
  }
  mcf->opened = 0;
}
