"""Builds ``diktyo.proxy.codec._nghttp2_api``: the HTTP/2 codec's C side on libnghttp2, in cffi's
API mode (a compiled extension). ``setup.py`` builds it at install, beside the mypyc hot path;
``http2_nghttp2.py`` uses it when it imports and falls back to cffi's ABI mode (``dlopen``, no
build) or to the `h2` codec when it does not.

What it moves into C (docs/performance.md, "HTTP/2 speed, stop 19"): in ABI mode every header
field of every header block was one Python callback (``on_header``), and every frame one or two
more. Here libnghttp2's callbacks are C functions that

- collect a header block into one per-session buffer, ``name\\0value\\0...`` (HTTP/2 forbids NUL
  in names and values, RFC 9113 8.2.1: a field with one is reported as invalid), and count the
  header list size against the limit;
- call Python once per frame that matters (HEADERS with the whole block, DATA with its whole
  payload and END_STREAM, RST_STREAM, SETTINGS, GOAWAY), with plain integers instead of frame
  structs; a stream Python says it has forgotten closes without a call;
- pass the per-frame flood checks of DATA and HEADERS frames that carry a payload without
  calling Python (the other frames go to the same Python checks as in ABI mode);
- build the ``nghttp2_nv`` array of an outgoing header block from one ``name\\0value\\0`` blob;
- send a response body that is whole when its head goes out (``dk_submit_body``) from a copy in
  C, so that neither its DATA frames nor its stream's close call Python.

No libnghttp2 development headers are needed: the few types and functions used are declared here
by hand against libnghttp2 1.52's public ABI (the same declarations as the ABI mode's), and the
extension links ``libnghttp2.so.14`` (Debian ``libnghttp2-14``).

Run by ``setup.py`` through ``runpy`` (standard library and cffi only; no ``diktyo`` import).
"""

from __future__ import annotations

import zlib
from typing import Any

MODULE = "diktyo.proxy.codec._nghttp2_api"
LIBRARY = "libnghttp2.so.14"

# libnghttp2 1.52's public ABI, declared by hand (no -dev headers needed), written once for the
# extension's C source (SOURCE), its cffi declarations (CDEF) and the ABI mode's declarations
# (``http2_nghttp2._CDEF``)
TYPES_BASE = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;
typedef struct { int age; int version_num; const char *version_str; const char *proto_str; }
    nghttp2_info;
typedef struct { uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen;
    uint8_t flags; } nghttp2_nv;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
"""
TYPES_FRAMES = """typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags;
    uint8_t reserved; } nghttp2_frame_hd;
typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; } nghttp2_priority_spec;
typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec;
    nghttp2_nv *nva; size_t nvlen; int cat; } nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
    uint8_t *opaque_data; size_t opaque_data_len; uint8_t reserved; } nghttp2_goaway;
typedef union { nghttp2_frame_hd hd; nghttp2_headers headers; nghttp2_rst_stream rst_stream;
    nghttp2_goaway goaway; } nghttp2_frame;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(nghttp2_session *, int32_t, uint8_t *,
    size_t, uint32_t *, nghttp2_data_source *, void *);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; }
    nghttp2_data_provider;
"""
SESSION_API = """
nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);
int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int);
void nghttp2_option_set_max_settings(nghttp2_option *, size_t);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *, size_t);
void nghttp2_option_set_max_send_header_block_length(nghttp2_option *, size_t);
void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *, uint32_t);
int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
    const nghttp2_option *);
int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
    const nghttp2_option *);
void nghttp2_session_del(nghttp2_session *);
ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
int nghttp2_session_want_read(nghttp2_session *);
int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t);
int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t);
int nghttp2_session_resume_data(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *);
int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t);
int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *,
    size_t);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *);
uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int);
int nghttp2_session_consume(nghttp2_session *, int32_t, size_t);
"""
SUBMIT_API = """
int32_t nghttp2_submit_request(nghttp2_session *, const nghttp2_priority_spec *,
    const nghttp2_nv *, size_t, const nghttp2_data_provider *, void *);
int32_t nghttp2_submit_headers(nghttp2_session *, uint8_t, int32_t,
    const nghttp2_priority_spec *, const nghttp2_nv *, size_t, void *);
int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);
int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
    const nghttp2_data_provider *);
"""

# what Python sees of the extension
CDEF = (
    TYPES_BASE
    + """
typedef struct {
    void *handle;
    char *buf; size_t len; size_t cap;
    size_t hsize; size_t max_hsize;
    int32_t hsid;
    int overflow;
    size_t empty_run;
    size_t block;
    ...;
} dk_ctx;

int dk_api_version(void);
nghttp2_session_callbacks *dk_callbacks(void);
dk_ctx *dk_ctx_new(void *handle, size_t max_hsize);
void dk_ctx_del(dk_ctx *);
int dk_submit(nghttp2_session *, int kind, int32_t sid, const char *blob, size_t len,
    int with_data);
int dk_submit_body(nghttp2_session *, dk_ctx *, int32_t sid, const char *blob, size_t len,
    const char *body, size_t blen, int py_done);
ssize_t dk_mem_send(nghttp2_session *, dk_ctx *, const char **);

extern "Python" int dk_py_begin_frame(void *, int, int, size_t);
extern "Python" int dk_py_frame(void *, int, int, int32_t, uint32_t, int32_t);
extern "Python" int dk_py_headers(void *, int32_t, int, int, const char *, size_t);
extern "Python" int dk_py_data(void *, int32_t, const char *, size_t, int);
extern "Python" int dk_py_close(void *, int32_t, uint32_t);
extern "Python" int dk_py_invalid_header(void *, int32_t, const char *, size_t);
extern "Python" int dk_py_invalid_frame(void *, int32_t, int, int);
extern "Python" int dk_py_error(void *, const char *, size_t);
extern "Python" ssize_t dk_py_read(void *, int32_t, uint8_t *, size_t, uint32_t *);

"""
    + SESSION_API
)

SOURCE = (
    r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

/* libnghttp2 1.52's public ABI, declared by hand (no -dev headers needed) */
"""
    + TYPES_BASE
    + TYPES_FRAMES
    + r"""
typedef int (*dk_begin_frame_cb)(nghttp2_session *, const nghttp2_frame_hd *, void *);
typedef int (*dk_frame_cb)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*dk_invalid_frame_cb)(nghttp2_session *, const nghttp2_frame *, int, void *);
typedef int (*dk_data_cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *);
typedef int (*dk_close_cb)(nghttp2_session *, int32_t, uint32_t, void *);
typedef int (*dk_header_cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
    const uint8_t *, size_t, uint8_t, void *);
typedef int (*dk_error_cb)(nghttp2_session *, int, const char *, size_t, void *);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
void nghttp2_session_callbacks_set_on_begin_frame_callback(nghttp2_session_callbacks *,
    dk_begin_frame_cb);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    dk_frame_cb);
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *,
    dk_invalid_frame_cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    dk_data_cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
    dk_close_cb);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    dk_header_cb);
void nghttp2_session_callbacks_set_on_invalid_header_callback(nghttp2_session_callbacks *,
    dk_header_cb);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
    dk_frame_cb);
void nghttp2_session_callbacks_set_error_callback2(nghttp2_session_callbacks *, dk_error_cb);
ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
int nghttp2_session_set_stream_user_data(nghttp2_session *, int32_t, void *);
void *nghttp2_session_get_stream_user_data(nghttp2_session *, int32_t);
"""
    + SESSION_API
    + SUBMIT_API
    + r"""
#define DK_API_VERSION @API_VERSION@
#define DK_CALLBACK_FAILURE (-902)
#define DK_DATA 0
#define DK_HEADERS 1
#define DK_RST_STREAM 3
#define DK_SETTINGS 4
#define DK_GOAWAY 7
#define DK_CONTINUATION 9
#define DK_END_STREAM 1

typedef struct {
    void *handle;            /* the Python codec (ffi.new_handle) */
    char *buf; size_t len; size_t cap;  /* the header block being decoded: name\0value\0... */
    size_t hsize; size_t max_hsize;     /* its size as HTTP/2 counts it (32 per field) */
    int32_t hsid;            /* its stream; 0: none (refused or dropped) */
    int overflow;            /* hsize went over max_hsize */
    size_t empty_run;        /* consecutive frames without payload (flood check) */
    size_t block;            /* bytes of the header block on the wire (CONTINUATION flood) */
    char *obuf; size_t ocap; /* what dk_mem_send serialized */
    struct dk_body *bodies;  /* the response bodies dk_submit_body holds (freed at close) */
    char *dbuf; size_t dlen; size_t dcap; int32_t dsid;  /* the DATA frame being received */
} dk_ctx;

/* a stream's user data when Python has forgotten it (dk_py_data returned 1): its close is
   not reported */
static char dk_forgotten;

/* A whole response body, sent from C (dk_submit_body): the stream's user data until it
   closes. py_done: Python has forgotten the stream, so its close is not reported. */
typedef struct dk_body {
    struct dk_body *prev, *next;
    size_t len, off;
    int py_done;
    char data[];
} dk_body;

static void dk_body_free(dk_ctx *c, dk_body *b) {
    if (b->prev) b->prev->next = b->next; else c->bodies = b->next;
    if (b->next) b->next->prev = b->prev;
    free(b);
}

/* the Python side (cffi's extern "Python", defined by the generated code further down) */
static int dk_py_begin_frame(void *, int, int, size_t);
static int dk_py_frame(void *, int, int, int32_t, uint32_t, int32_t);
static int dk_py_headers(void *, int32_t, int, int, const char *, size_t);
static int dk_py_data(void *, int32_t, const char *, size_t, int);
static int dk_py_close(void *, int32_t, uint32_t);
static int dk_py_invalid_header(void *, int32_t, const char *, size_t);
static int dk_py_invalid_frame(void *, int32_t, int, int);
static int dk_py_error(void *, const char *, size_t);
static ssize_t dk_py_read(void *, int32_t, uint8_t *, size_t, uint32_t *);

static int dk_api_version(void) { return DK_API_VERSION; }

static void dk_forget(nghttp2_session *s, int32_t sid) {
    dk_body *b = (dk_body *)nghttp2_session_get_stream_user_data(s, sid);
    if (b == NULL)
        nghttp2_session_set_stream_user_data(s, sid, &dk_forgotten);
    else if ((void *)b != (void *)&dk_forgotten)
        b->py_done = 1;
}

/* The DATA frame's payload so far to Python (end: the frame carried END_STREAM). */
static int dk_data_out(nghttp2_session *s, dk_ctx *c, int end) {
    int32_t sid = c->dsid;
    size_t n = c->dlen;
    int rv;
    c->dlen = 0;
    rv = dk_py_data(c->handle, sid, c->dbuf, n, end);
    if (rv == 1) {
        dk_forget(s, sid);
        return 0;
    }
    return rv;
}

static int dk_begin_frame(nghttp2_session *s, const nghttp2_frame_hd *hd, void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    if (c->dlen) {  /* a DATA frame that never completed (its stream went): hand over its data */
        int rv = dk_data_out(s, c, 0);
        if (rv != 0)
            return rv;
    }
    if ((hd->type == DK_DATA || hd->type == DK_HEADERS)
            && (hd->length || (hd->flags & DK_END_STREAM))) {
        c->empty_run = 0;
        if (hd->type == DK_HEADERS)
            c->block = hd->length;
        return 0;
    }
    return dk_py_begin_frame(c->handle, hd->type, hd->flags, hd->length);
}

static int dk_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    c->len = 0;
    c->hsize = 0;
    c->hsid = f->hd.stream_id;
    return 0;
}

static int dk_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t nlen, const uint8_t *value, size_t vlen, uint8_t fl, void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    size_t need;
    if (c->hsid != f->hd.stream_id)
        return 0;
    if (memchr(name, 0, nlen) || memchr(value, 0, vlen))
        return dk_py_invalid_header(c->handle, f->hd.stream_id, (const char *)name, nlen);
    c->hsize += nlen + vlen + 32;
    if (c->hsize > c->max_hsize) {
        c->overflow = 1;
        return DK_CALLBACK_FAILURE;
    }
    need = c->len + nlen + vlen + 2;
    if (need > c->cap) {
        size_t cap = c->cap ? c->cap : 1024;
        char *nb;
        while (cap < need) cap *= 2;
        nb = (char *)realloc(c->buf, cap);
        if (nb == NULL) return DK_CALLBACK_FAILURE;
        c->buf = nb;
        c->cap = cap;
    }
    memcpy(c->buf + c->len, name, nlen);
    c->len += nlen;
    c->buf[c->len++] = 0;
    memcpy(c->buf + c->len, value, vlen);
    c->len += vlen;
    c->buf[c->len++] = 0;
    return 0;
}

static int dk_invalid_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                             size_t nlen, const uint8_t *value, size_t vlen, uint8_t fl,
                             void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    c->hsid = 0;
    dk_py_invalid_header(c->handle, f->hd.stream_id, (const char *)name, nlen);
    return DK_CALLBACK_FAILURE;  /* stop here: no RST_STREAM, the connection goes */
}

static int dk_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    int32_t sid = f->hd.stream_id;
    switch (f->hd.type) {
    case DK_DATA:  /* its payload and END_STREAM in one call */
        if (c->dlen == 0 && !(f->hd.flags & DK_END_STREAM))
            return 0;
        c->dsid = sid;
        return dk_data_out(s, c, f->hd.flags & DK_END_STREAM);
    case DK_HEADERS:
        if (c->hsid != sid)
            return 0;  /* its block was dropped */
        c->hsid = 0;
        return dk_py_headers(c->handle, sid, f->hd.flags, f->headers.cat, c->buf, c->len);
    case DK_RST_STREAM:
        return dk_py_frame(c->handle, DK_RST_STREAM, f->hd.flags, sid,
                           f->rst_stream.error_code, 0);
    case DK_GOAWAY:
        return dk_py_frame(c->handle, DK_GOAWAY, f->hd.flags, sid, f->goaway.error_code,
                           f->goaway.last_stream_id);
    case DK_SETTINGS:
        break;
    default:
        return 0;
    }
    return dk_py_frame(c->handle, f->hd.type, f->hd.flags, sid, 0, 0);
}

static int dk_invalid_frame(nghttp2_session *s, const nghttp2_frame *f, int err, void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    if (c->hsid == f->hd.stream_id)
        c->hsid = 0;
    return dk_py_invalid_frame(c->handle, f->hd.stream_id, f->hd.type, err);
}

static int dk_data(nghttp2_session *s, uint8_t fl, int32_t sid, const uint8_t *d, size_t n,
                   void *ud) {
    /* collected until the frame is complete (dk_frame_recv): one Python call per DATA frame,
       END_STREAM included */
    dk_ctx *c = (dk_ctx *)ud;
    if (c->dlen && c->dsid != sid) {
        int rv = dk_data_out(s, c, 0);
        if (rv != 0)
            return rv;
    }
    c->dsid = sid;
    if (c->dlen + n > c->dcap) {
        size_t cap = c->dcap ? c->dcap : 16384;
        char *nb;
        while (cap < c->dlen + n) cap *= 2;
        nb = (char *)realloc(c->dbuf, cap);
        if (nb == NULL) return DK_CALLBACK_FAILURE;
        c->dbuf = nb;
        c->dcap = cap;
    }
    memcpy(c->dbuf + c->dlen, d, n);
    c->dlen += n;
    return 0;
}

static int dk_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
    dk_ctx *c = (dk_ctx *)ud;
    dk_body *b = (dk_body *)nghttp2_session_get_stream_user_data(s, sid);
    if (c->hsid == sid)
        c->hsid = 0;
    if ((void *)b == (void *)&dk_forgotten)
        return 0;  /* Python forgot the stream when it heard its end */
    if (b != NULL) {
        int done = b->py_done;
        dk_body_free(c, b);
        if (done)
            return 0;  /* Python dropped the stream when it handed over its last bytes */
    }
    return dk_py_close(c->handle, sid, code);
}

static int dk_error(nghttp2_session *s, int err, const char *msg, size_t n, void *ud) {
    dk_py_error(((dk_ctx *)ud)->handle, msg, n);
    return 0;
}

static ssize_t dk_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
                       uint32_t *flags, nghttp2_data_source *src, void *ud) {
    return dk_py_read(((dk_ctx *)ud)->handle, sid, buf, length, flags);
}

static ssize_t dk_read_body(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length,
                            uint32_t *flags, nghttp2_data_source *src, void *ud) {
    dk_body *b = (dk_body *)src->ptr;
    size_t n = b->len - b->off;
    if (n > length)
        n = length;
    memcpy(buf, b->data + b->off, n);
    b->off += n;
    if (b->off == b->len)
        *flags |= 1;  /* NGHTTP2_DATA_FLAG_EOF */
    return (ssize_t)n;
}

static nghttp2_session_callbacks *dk_cbs = NULL;

static nghttp2_session_callbacks *dk_callbacks(void) {
    if (dk_cbs == NULL) {
        nghttp2_session_callbacks *cbs;
        if (nghttp2_session_callbacks_new(&cbs) != 0)
            return NULL;
        nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, dk_begin_frame);
        nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, dk_begin_headers);
        nghttp2_session_callbacks_set_on_header_callback(cbs, dk_header);
        nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, dk_invalid_header);
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, dk_frame_recv);
        nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, dk_invalid_frame);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, dk_data);
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, dk_close);
        nghttp2_session_callbacks_set_error_callback2(cbs, dk_error);
        dk_cbs = cbs;
    }
    return dk_cbs;
}

static dk_ctx *dk_ctx_new(void *handle, size_t max_hsize) {
    dk_ctx *c = (dk_ctx *)calloc(1, sizeof(dk_ctx));
    if (c != NULL) {
        c->handle = handle;
        c->max_hsize = max_hsize;
    }
    return c;
}

static void dk_ctx_del(dk_ctx *c) {
    if (c != NULL) {
        while (c->bodies != NULL)
            dk_body_free(c, c->bodies);
        free(c->buf);
        free(c->obuf);
        free(c->dbuf);
        free(c);
    }
}

/* Everything nghttp2 has queued, in one buffer (one Python call instead of one per frame). */
static ssize_t dk_mem_send(nghttp2_session *s, dk_ctx *c, const char **out) {
    size_t len = 0;
    for (;;) {
        const uint8_t *p;
        ssize_t n = nghttp2_session_mem_send(s, &p);
        if (n <= 0)
            break;
        if (len + (size_t)n > c->ocap) {
            size_t cap = c->ocap ? c->ocap : 16384;
            char *nb;
            while (cap < len + (size_t)n) cap *= 2;
            nb = (char *)realloc(c->obuf, cap);
            if (nb == NULL) return -901;  /* NGHTTP2_ERR_NOMEM: the frame is lost, Python raises */
            c->obuf = nb;
            c->ocap = cap;
        }
        memcpy(c->obuf + len, p, (size_t)n);
        len += (size_t)n;
    }
    *out = c->obuf;
    return (ssize_t)len;
}

/* Submits a header block given as name\0value\0... (count = number of NULs / 2).
   kind 0: response, 1: request (returns the stream id), 2: headers (100-continue),
   3: trailers. with_data: a DATA source follows (read by dk_py_read). */
static int dk_submit_prd(nghttp2_session *s, int kind, int32_t sid, const char *blob,
                         size_t len, const nghttp2_data_provider *prd) {
    nghttp2_nv stack[64];
    nghttp2_nv *nva = stack;
    size_t n = 0, i, cap = 64, start = 0;
    int rv;
    for (i = 0; i < len; i++)
        if (blob[i] == 0) n++;
    n /= 2;
    if (n > cap) {
        nva = (nghttp2_nv *)malloc(n * sizeof(nghttp2_nv));
        if (nva == NULL) return -901;  /* NGHTTP2_ERR_NOMEM */
    }
    for (i = 0; i < n; i++) {
        size_t nl = strlen(blob + start), vl;
        nva[i].name = (uint8_t *)(blob + start);
        nva[i].namelen = nl;
        start += nl + 1;
        vl = strlen(blob + start);
        nva[i].value = (uint8_t *)(blob + start);
        nva[i].valuelen = vl;
        start += vl + 1;
        nva[i].flags = 0;
    }
    switch (kind) {
    case 0:
        rv = nghttp2_submit_response(s, sid, nva, n, prd);
        break;
    case 1:
        rv = nghttp2_submit_request(s, NULL, nva, n, prd, NULL);
        break;
    case 2:
        rv = nghttp2_submit_headers(s, 0, sid, NULL, nva, n, NULL);
        break;
    default:
        rv = nghttp2_submit_trailer(s, sid, nva, n);
    }
    if (nva != stack) free(nva);
    return rv;
}

static int dk_submit(nghttp2_session *s, int kind, int32_t sid, const char *blob, size_t len,
                     int with_data) {
    nghttp2_data_provider prd;
    prd.source.ptr = NULL;
    prd.read_callback = dk_read;
    return dk_submit_prd(s, kind, sid, blob, len, with_data ? &prd : NULL);
}

/* A response head and its whole body at once (the body is known when the head goes out): the
   body is copied and sent by dk_read_body, without a Python data provider; with py_done the
   stream's close is not reported to Python either. An empty body: END_STREAM on HEADERS. */
static int dk_submit_body(nghttp2_session *s, dk_ctx *c, int32_t sid, const char *blob,
                          size_t len, const char *body, size_t blen, int py_done) {
    nghttp2_data_provider prd;
    dk_body *b;
    int rv;
    if (blen == 0)
        return dk_submit_prd(s, 0, sid, blob, len, NULL);
    b = (dk_body *)malloc(sizeof(dk_body) + blen);
    if (b == NULL)
        return -901;  /* NGHTTP2_ERR_NOMEM */
    memcpy(b->data, body, blen);
    b->len = blen;
    b->off = 0;
    b->py_done = py_done;
    b->prev = NULL;
    b->next = c->bodies;
    if (c->bodies != NULL)
        c->bodies->prev = b;
    c->bodies = b;
    rv = nghttp2_session_set_stream_user_data(s, sid, b);  /* fails: the stream is gone */
    if (rv == 0) {
        prd.source.ptr = b;
        prd.read_callback = dk_read_body;
        rv = dk_submit_prd(s, 0, sid, blob, len, &prd);
        if (rv != 0)
            nghttp2_session_set_stream_user_data(s, sid, NULL);
    }
    if (rv != 0)
        dk_body_free(c, b);
    return rv;
}
"""
)

# a checksum of the declarations and the C source, compiled into the extension: an extension
# built from other sources (an editable install not rebuilt after an edit here) is refused by
# ``http2_nghttp2.py``, which then runs cffi's ABI mode and says how to rebuild
API_VERSION = zlib.crc32((CDEF + SOURCE).encode()) & 0x7FFFFFFF


def ffibuilder() -> Any:
    """The cffi builder (``setup.py`` compiles it; ``python -m`` this file builds in place)."""
    import cffi  # type: ignore[import-untyped]  # cffi ships no type stubs

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    source = SOURCE.replace("@API_VERSION@", str(API_VERSION))
    ffi.set_source(MODULE, source, extra_link_args=[f"-l:{LIBRARY}"])
    return ffi


if __name__ == "__main__":  # build in place, for a quick try: python _nghttp2_build.py OUTDIR
    import sys

    ffibuilder().compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".", verbose=True)
