/* ngx_stream_hsmstek_module: TLS session tickets of nginx stream (TCP/TLS)
 * servers sealed and opened in a PKCS#11 token through libhsmstek.
 *
 *   stream {
 *     hsmstek_store tcp "pkcs11:token=tickets;object=tcp?module-path=...";
 *     server {
 *       listen 127.0.0.1:8443 ssl;
 *       hsmstek_tickets tcp;           # or "off"
 *     }
 *   }
 *
 * Needs ngx_stream_module loaded first. Configuration makes no PKCS#11 call;
 * workers open the stores in init_process. See docs/NGINX.md. */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_stream.h>

#include "ngx_hsmstek_common.h"

static ngx_int_t ngx_stream_hsmstek_postconfiguration(ngx_conf_t *cf);
static void *ngx_stream_hsmstek_create_main_conf(ngx_conf_t *cf);
static void *ngx_stream_hsmstek_create_srv_conf(ngx_conf_t *cf);
static char *ngx_stream_hsmstek_merge_srv_conf(ngx_conf_t *cf, void *parent,
                                               void *child);
static ngx_int_t ngx_stream_hsmstek_init_process(ngx_cycle_t *cycle);
static void ngx_stream_hsmstek_exit_process(ngx_cycle_t *cycle);

static ngx_command_t ngx_stream_hsmstek_commands[] = {
    {ngx_string("hsmstek_store"), NGX_STREAM_MAIN_CONF | NGX_CONF_2MORE,
     ngx_hsmstek_store_directive, NGX_STREAM_MAIN_CONF_OFFSET, 0, NULL},

    {ngx_string("hsmstek_tickets"), NGX_STREAM_SRV_CONF | NGX_CONF_TAKE1,
     ngx_hsmstek_tickets_directive, NGX_STREAM_SRV_CONF_OFFSET, 0, NULL},

    ngx_null_command};

static ngx_stream_module_t ngx_stream_hsmstek_module_ctx = {
    NULL,                                 /* preconfiguration */
    ngx_stream_hsmstek_postconfiguration, /* postconfiguration */
    ngx_stream_hsmstek_create_main_conf,  /* create main configuration */
    NULL,                                 /* init main configuration */
    ngx_stream_hsmstek_create_srv_conf,   /* create server configuration */
    ngx_stream_hsmstek_merge_srv_conf     /* merge server configuration */
};

ngx_module_t ngx_stream_hsmstek_module = {
    NGX_MODULE_V1,
    &ngx_stream_hsmstek_module_ctx,  /* module context */
    ngx_stream_hsmstek_commands,     /* module directives */
    NGX_STREAM_MODULE,               /* module type */
    NULL,                            /* init master */
    NULL,                            /* init module */
    ngx_stream_hsmstek_init_process, /* init process */
    NULL,                            /* init thread */
    NULL,                            /* exit thread */
    ngx_stream_hsmstek_exit_process, /* exit process */
    NULL,                            /* exit master */
    NGX_MODULE_V1_PADDING};

static void *ngx_stream_hsmstek_create_main_conf(ngx_conf_t *cf) {
  ngx_hsmstek_main_conf_t *mcf = ngx_pcalloc(cf->pool, sizeof(*mcf));
  if (mcf == NULL || ngx_hsmstek_init_main_conf(cf, mcf, "stream") != NGX_OK) {
    return NULL;
  }
  return mcf;
}

static void *ngx_stream_hsmstek_create_srv_conf(ngx_conf_t *cf) {
  return ngx_hsmstek_create_srv_conf(cf);
}

static char *ngx_stream_hsmstek_merge_srv_conf(ngx_conf_t *cf, void *parent,
                                               void *child) {
  ngx_hsmstek_main_conf_t *mcf =
      ngx_stream_conf_get_module_main_conf(cf, ngx_stream_hsmstek_module);
  return ngx_hsmstek_merge_srv_conf(cf, mcf, parent, child);
}

static ngx_int_t ngx_stream_hsmstek_postconfiguration(ngx_conf_t *cf) {
  ngx_hsmstek_main_conf_t *mcf =
      ngx_stream_conf_get_module_main_conf(cf, ngx_stream_hsmstek_module);
  ngx_stream_core_main_conf_t *cmcf =
      ngx_stream_conf_get_module_main_conf(cf, ngx_stream_core_module);

  /* Stream servers have no SNI switching in nginx 1.22: every server's own
   * SSL_CTX is the one its connections use. */
  ngx_stream_core_srv_conf_t **servers = cmcf->servers.elts;
  for (ngx_uint_t i = 0; i < cmcf->servers.nelts; i++) {
    ngx_hsmstek_srv_conf_t *scf =
        servers[i]->ctx->srv_conf[ngx_stream_hsmstek_module.ctx_index];
    ngx_stream_ssl_conf_t *sslcf =
        servers[i]->ctx->srv_conf[ngx_stream_ssl_module.ctx_index];
    if (ngx_hsmstek_add_install(cf, mcf, scf, sslcf->ssl.ctx,
                                sslcf->session_tickets, servers[i]->file_name,
                                servers[i]->line) != NGX_OK) {
      return NGX_ERROR;
    }
  }
  return ngx_hsmstek_postconfiguration(cf, mcf);
}

static ngx_int_t ngx_stream_hsmstek_init_process(ngx_cycle_t *cycle) {
  return ngx_hsmstek_open_stores(cycle, ngx_stream_cycle_get_module_main_conf(
                                            cycle, ngx_stream_hsmstek_module));
}

static void ngx_stream_hsmstek_exit_process(ngx_cycle_t *cycle) {
  ngx_hsmstek_close_stores(
      ngx_stream_cycle_get_module_main_conf(cycle, ngx_stream_hsmstek_module));
}
