/* Tests of the JSON parser and the container reader, including a fuzz pass: truncate and corrupt containers at many
 * positions (and mutate the index JSON with its checksum repaired, so the parser and the semantic checks see it) and
 * check that opening, loading and running never crash and that every refusal carries a message.
 *
 *   test_container [CONTAINER.emoe ...] [--iters N] [--tmp DIR]
 *
 * Without arguments it builds its own small container (every dtype the core runs, an unused tensor, a blob) and
 * fuzzes that; each CONTAINER given is fuzzed too (a real export: tests/test_devices.py passes one). Run it under
 * ASan + UBSan with native/tests/run_container_asan.sh. Exit status 0 = all passed.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "edgemoe.h"
#include "edgemoe_container.h"
#include "arch.h" /* emoe_container_config */
#include "json.h"
#include "check.h"

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---- growable byte buffer ---- */
typedef struct {
    unsigned char *p;
    size_t n, cap;
} buf;

static void buf_reserve(buf *b, size_t extra) {
    if (b->cap - b->n >= extra) return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap - b->n < extra) cap *= 2;
    unsigned char *np = realloc(b->p, cap);
    if (!np) {
        fprintf(stderr, "out of memory\n");
        exit(2); /* the test program, not the library */
    }
    b->p = np;
    b->cap = cap;
}
static void buf_put(buf *b, const void *data, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->n, data, n);
    b->n += n;
}
static void buf_zero(buf *b, size_t n) {
    buf_reserve(b, n);
    memset(b->p + b->n, 0, n);
    b->n += n;
}
static void buf_printf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf((char *)b->p + b->n, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)n;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* data (>= 4096 bytes, preamble area included) + index -> a complete file image with a valid preamble. */
static void finish_file(buf *file, const buf *data, const char *index, size_t index_len, uint32_t version) {
    file->n = 0;
    buf_put(file, data->p, data->n);
    buf_zero(file, (64 - file->n % 64) % 64);
    const uint64_t off = file->n;
    buf_put(file, index, index_len);
    memset(file->p, 0, 28);
    memcpy(file->p, "EMOE", 4);
    put_u32(file->p + 4, version);
    put_u64(file->p + 8, off);
    put_u64(file->p + 16, index_len);
    put_u32(file->p + 24, emoe_crc32(0, index, index_len));
}

static int write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, n, f);
    return fclose(f) || w != n ? -1 : 0;
}

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    buf b = {0};
    unsigned char tmp[65536];
    size_t k;
    while ((k = fread(tmp, 1, sizeof tmp, f)) > 0) buf_put(&b, tmp, k);
    fclose(f);
    *n = b.n;
    return b.p;
}

/* ==================================================================================================== JSON ==== */

static void test_json(void) {
    char err[256];
    json_doc *d;
    /* valid documents */
    const char *doc = " {\"a\": [1, -2, 3.5, 1e3, -0, true, false, null], \"s\": \"x\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"
                      "\\ud83d\\ude00\xc3\xa9\", \"big\": 9223372036854775807, \"neg\": -9223372036854775808, "
                      "\"b\": {}} ";
    CHECK(!json_parse(doc, strlen(doc), 8, &d, err, sizeof err), "valid doc refused: %s", err);
    if (d) {
        CHECK(json_kind(d, 0) == JSON_OBJECT && json_len(d, 0) == 5, "root");
        int a = json_get(d, 0, "a");
        CHECK(json_kind(d, a) == JSON_ARRAY && json_kind(d, json_get(d, 0, "b")) == JSON_OBJECT, "members");
        int s = json_get(d, 0, "s");
        size_t len;
        const char *str = json_str(d, s, &len);
        CHECK(str && !strcmp(str, "x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80\xc3\xa9"), "string escapes: %s",
              str ? str : "(null)");
        int64_t v;
        CHECK(json_int64(d, json_get(d, 0, "big"), &v) && v == INT64_MAX, "int64 max");
        CHECK(json_int64(d, json_get(d, 0, "neg"), &v) && v == INT64_MIN, "int64 min");
        json_free(d);
    }
    const char *arr = "[1,-2,3.5,1e3,-0,true,false,null]";
    CHECK(!json_parse(arr, strlen(arr), 4, &d, err, sizeof err), "array: %s", err);
    if (d) {
        int e = json_first(d, 0);
        int64_t v;
        double x;
        CHECK(json_int64(d, e, &v) && v == 1, "1");
        e = json_next(d, e);
        CHECK(json_int64(d, e, &v) && v == -2, "-2");
        e = json_next(d, e);
        CHECK(!json_int64(d, e, &v) && json_double(d, e, &x) && x == 3.5, "3.5");
        e = json_next(d, e);
        CHECK(!json_int64(d, e, &v) && json_double(d, e, &x) && x == 1000.0, "1e3 is a double");
        e = json_next(d, e);
        CHECK(json_int64(d, e, &v) && v == 0, "-0");
        e = json_next(d, e);
        CHECK(json_kind(d, e) == JSON_TRUE, "true");
        e = json_next(d, e);
        CHECK(json_kind(d, e) == JSON_FALSE, "false");
        e = json_next(d, e);
        CHECK(json_kind(d, e) == JSON_NULL && json_next(d, e) == JSON_NONE, "null, end");
        json_free(d);
    }
    /* the input is not NUL-terminated: parse a prefix of a longer buffer */
    CHECK(!json_parse("[1]garbage", 3, 4, &d, err, sizeof err), "prefix: %s", err);
    json_free(d);
    /* invalid documents, with the byte position of the problem */
    static const struct {
        const char *text;
        size_t pos;
    } bad[] = {
        {"", 0},           {" ", 1},           {"[1,]", 3},          {"{\"a\":1,}", 7},   {"[01]", 2},
        {"[1.]", 3},       {"[.5]", 1},        {"[+1]", 1},          {"[1e]", 3},          {"[-]", 2},
        {"tru", 0},        {"nul", 0},         {"[1 2]", 3},         {"{\"a\" 1}", 5},     {"{1:2}", 1},
        {"\"abc", 0},      {"\"\\x\"", 1},     {"\"\\u12g4\"", 5},   {"\"\\ud800\"", 1},   {"\"\\udc00\"", 1},
        {"\"\\ud800\\u0041\"", 7}, {"\"a\nb\"", 2}, {"\"\xff\"", 1}, {"\"\xc0\xaf\"", 1}, {"\"\xed\xa0\x80\"", 1},
        {"[1] x", 4},      {"[1e999]", 1},     {"{\"a\":}", 5},      {"[", 1},             {"\"\\", 0},
        /* strict beyond RFC 8259: one meaning for every reader */
        {"{\"a\": 1, \"b\": 2, \"a\": 3}", 17},          /* a key twice (Python keeps the last, others the first) */
        {"{\"k\": {\"x\": 1, \"x\": 1}}", 15},             /* ... also in a nested object, with equal values */
        {"{\"vocab\": 16, \"vocab\\u0000\": 320}", 20},   /* NUL in a key: "vocab" to C, another key to Python */
        {"[\"a\\u0000b\"]", 3},                         /* NUL in a string */
        {"[9223372036854775808]", 1},                     /* integers are exact int64 or refused */
        {"[-9223372036854775809]", 1},
        {"[123456789012345678901234567890]", 1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        d = NULL;
        int st = json_parse(bad[i].text, strlen(bad[i].text), 8, &d, err, sizeof err);
        char want[32];
        snprintf(want, sizeof want, "byte %zu:", bad[i].pos);
        CHECK(st && !d && !strncmp(err, want, strlen(want)), "bad json #%zu '%s': st=%d err='%s', want '%s'", i,
              bad[i].text, st, err, want);
        json_free(d);
    }
    CHECK(json_parse("{\"a\":1,\"a\":2}", 13, 4, &d, err, sizeof err) && strstr(err, "duplicate key \"a\""),
          "duplicate key named: %s", err);
    CHECK(json_parse("[\"\\u0000\"]", 10, 4, &d, err, sizeof err) && strstr(err, "NUL"), "NUL named: %s", err);
    /* duplicate keys in a large object (the sorted check): 40 distinct keys pass, a repeat at the end is refused */
    buf big = {0};
    buf_printf(&big, "{");
    for (int i = 0; i < 40; i++) buf_printf(&big, "%s\"k%d\": %d", i ? ", " : "", i, i);
    buf_printf(&big, "}");
    CHECK(!json_parse((char *)big.p, big.n, 4, &d, err, sizeof err), "40 distinct keys: %s", err);
    json_free(d);
    big.n--;
    buf_printf(&big, ", \"k17\": 0}");
    CHECK(json_parse((char *)big.p, big.n, 4, &d, err, sizeof err) && strstr(err, "duplicate key \"k17\""),
          "repeat in a large object: %s", err);
    free(big.p);
    /* embedded NUL bytes are data, not an end of input */
    CHECK(json_parse("[1]\0", 4, 4, &d, err, sizeof err) && !d, "NUL after the value must be refused");
    /* nesting depth is bounded (a deep document would otherwise overflow the stack) */
    buf deep = {0};
    for (int i = 0; i < 100000; i++) buf_put(&deep, "[", 1);
    CHECK(json_parse((char *)deep.p, deep.n, 64, &d, err, sizeof err) && strstr(err, "deeper than 64"),
          "deep nesting: %s", err);
    deep.n = 0;
    for (int i = 0; i < 64; i++) buf_put(&deep, "[", 1);
    for (int i = 0; i < 64; i++) buf_put(&deep, "]", 1);
    CHECK(!json_parse((char *)deep.p, deep.n, 64, &d, err, sizeof err), "64 levels are allowed: %s", err);
    json_free(d);
    free(deep.p);
    /* random bytes and random JSON-ish soups: never crash, always a message on refusal */
    uint64_t seed = 1;
    const char alphabet[] = "{}[]\",:0123456789.eE+-\\u tfnrl\xc3\xa9" "ab";
    char text[256];
    for (int it = 0; it < 20000; it++) {
        size_t n = rng_next(&seed) % sizeof text;
        for (size_t k = 0; k < n; k++)
            text[k] = it % 2 ? (char)rng_next(&seed) : alphabet[rng_next(&seed) % (sizeof alphabet - 1)];
        err[0] = '\0';
        d = NULL;
        if (json_parse(text, n, 16, &d, err, sizeof err)) CHECK(err[0] && !d, "random json: refusal without message");
        json_free(d);
    }
}

/* ============================================================================= a synthetic container ==== */

typedef struct {
    buf data;  /* preamble area + tensor data */
    buf index; /* JSON */
    int n;
    uint64_t seed;
} builder;

static void add_tensor(builder *b, const char *name, const char *dtype, const char *kind, int rows, int cols,
                       const void *raw, size_t nbytes) {
    const size_t align = !strcmp(kind, "expert") ? 4096 : 64;
    buf_zero(&b->data, (align - b->data.n % align) % align);
    const size_t off = b->data.n;
    buf_put(&b->data, raw, nbytes);
    buf_printf(&b->index, "%s{\"name\": \"%s\", \"dtype\": \"%s\", \"shape\": [%d%s", b->n++ ? ", " : "", name,
               dtype, rows, cols ? "" : "]");
    if (cols) buf_printf(&b->index, ", %d]", cols);
    buf_printf(&b->index, ", \"offset\": %zu, \"nbytes\": %zu, \"crc32\": %u, \"kind\": \"%s\"}", off, nbytes,
               emoe_crc32(0, raw, nbytes), kind);
}

/* A random matrix (rows x cols, or a 1-D vector if cols == 0) stored as dtype. */
static void add_random(builder *b, const char *name, const char *dtype, const char *kind, int rows, int cols,
                       float base, float scale) {
    const int64_t n = (int64_t)rows * (cols ? cols : 1);
    float *f = malloc((size_t)n * sizeof(float));
    void *raw = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        f[i] = base + scale * ((float)(rng_next(&b->seed) >> 11) / 9007199254740992.0f * 2.0f - 1.0f);
    size_t nbytes;
    if (!strcmp(dtype, "f32")) memcpy(raw, f, (size_t)n * 4), nbytes = (size_t)n * 4;
    else if (!strcmp(dtype, "f16")) emoe_f32_to_f16(f, raw, n), nbytes = (size_t)n * 2;
    else emoe_quantize_q8_0(f, raw, n), nbytes = (size_t)n / 32 * 34;
    add_tensor(b, name, dtype, kind, rows, cols, raw, nbytes);
    free(f);
    free(raw);
}

#define H 32
#define V 64
#define NH 2
#define NKV 1
#define HD 16
#define NE 4
#define FF 32

/* One MoE layer, every dtype the core runs: f32 / f16 / q8_0 matrices, a 1-D f16 norm (converted by the loader),
 * an unused tensor (attn_q.bias without qkv_bias: skipped) and a blob. Version 1 file. */
static void build_model(buf *file, const char *extra_arch) {
    builder b = {.seed = 7};
    buf_zero(&b.data, EMOE_CONTAINER_PREAMBLE_SIZE);
    buf_printf(&b.index, "{\"format\": \"edgemoe\", \"version\": 1, \"arch\": {\"family\": \"test\", \"n_layers\": 1, "
               "\"hidden\": %d, \"vocab\": %d, \"n_heads\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, "
               "\"n_experts\": %d, \"top_k\": 2, \"expert_ffn\": %d, \"norm_eps\": 1e-06, \"rope_theta\": 10000.0, "
               "\"qk_norm\": \"head\", \"norm_topk\": true, \"bos_token_id\": 1, \"eos_token_id\": null, "
               "\"max_position\": 4096%s}, \"metadata\": {\"source\": \"test\", \"bits\": 32}, "
               "\"tensors\": [",
               H, V, NH, NKV, HD, NE, FF, extra_arch);
    const char tok[] = "{\"model\": {}}";
    add_tensor(&b, "tokenizer.json", "bytes", "blob", (int)strlen(tok), 0, tok, strlen(tok));
    add_random(&b, "token_embd.weight", "f16", "dense", V, H, 0, 1);
    add_random(&b, "output_norm.weight", "f32", "dense", H, 0, 1, 0.2f);
    add_random(&b, "output.weight", "q8_0", "dense", V, H, 0, 0.5f);
    add_random(&b, "blk.0.attn_norm.weight", "f16", "dense", H, 0, 1, 0.2f);
    add_random(&b, "blk.0.ffn_norm.weight", "f32", "dense", H, 0, 1, 0.2f);
    add_random(&b, "blk.0.attn_q.weight", "f32", "dense", NH * HD, H, 0, 0.3f);
    add_random(&b, "blk.0.attn_q.bias", "f32", "dense", NH * HD, 0, 0, 0.3f);
    add_random(&b, "blk.0.attn_k.weight", "q8_0", "dense", NKV * HD, H, 0, 0.3f);
    add_random(&b, "blk.0.attn_v.weight", "f16", "dense", NKV * HD, H, 0, 0.3f);
    add_random(&b, "blk.0.attn_output.weight", "f32", "dense", H, NH * HD, 0, 0.3f);
    add_random(&b, "blk.0.attn_q_norm.weight", "f32", "dense", HD, 0, 1, 0.2f);
    add_random(&b, "blk.0.attn_k_norm.weight", "f32", "dense", HD, 0, 1, 0.2f);
    add_random(&b, "blk.0.ffn_gate_inp.weight", "f32", "dense", NE, H, 0, 0.5f);
    const char *dts[3] = {"f32", "f16", "q8_0"};
    for (int e = 0; e < NE; e++) {
        char name[64];
        snprintf(name, sizeof name, "blk.0.expert.%d.ffn_gate.weight", e);
        add_random(&b, name, dts[e % 3], "expert", FF, H, 0, 0.3f);
        snprintf(name, sizeof name, "blk.0.expert.%d.ffn_up.weight", e);
        add_random(&b, name, dts[(e + 1) % 3], "expert", FF, H, 0, 0.3f);
        snprintf(name, sizeof name, "blk.0.expert.%d.ffn_down.weight", e);
        add_random(&b, name, dts[(e + 2) % 3], "expert", H, FF, 0, 0.3f);
    }
    buf_printf(&b.index, "]}");
    finish_file(file, &b.data, (char *)b.index.p, b.index.n, 1);
    free(b.data.p);
    free(b.index.p);
}

/* Open, load, run a few tokens; returns 0 if the model ran, 1 if refused (with a message), and counts failures. */
static int open_load_run(const char *path, int verify, float *logits_out) {
    char err[1024] = "";
    emoe_container *c = emoe_container_open(path, verify, err, sizeof err);
    if (!c) {
        CHECK(err[0], "open refused %s without a message", path);
        return 1;
    }
    emoe_model *m = emoe_container_load_model(c, 8, 0, 1, err, sizeof err);
    if (!m) {
        CHECK(err[0], "load refused %s without a message", path);
        emoe_container_close(c);
        return 1;
    }
    const int vocab = emoe_container_config(c)->vocab;
    int32_t tok[5] = {1, 2, 3, 4, 5};
    for (int i = 0; i < 5; i++) tok[i] %= vocab;
    float *logits = malloc((size_t)vocab * sizeof(float));
    int st = logits ? emoe_forward(m, tok, 5, logits, 0) : EMOE_ERR_NOMEM;
    CHECK(st == EMOE_OK || emoe_model_last_error(m)[0], "forward failed without a message");
    if (!st && logits_out) memcpy(logits_out, logits, (size_t)(vocab < V ? vocab : V) * sizeof(float));
    free(logits);
    emoe_model_free(m);
    emoe_container_close(c);
    return st ? 1 : 0;
}

static int expect_error(const char *path, int verify, const char *substring) {
    char err[1024] = "";
    emoe_container *c = emoe_container_open(path, verify, err, sizeof err);
    CHECK(!c && strstr(err, substring), "%s: expected an error containing '%s', got '%s'", path, substring,
          c ? "(opened)" : err);
    emoe_container_close(c);
    return !c;
}

static void test_synthetic(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/synthetic.emoe", dir);
    buf file = {0};
    build_model(&file, "");
    CHECK(!write_file(path, file.p, file.n), "write %s", path);
    char err[1024];
    emoe_container *c = emoe_container_open(path, 1, err, sizeof err);
    CHECK(c, "synthetic container refused: %s", err);
    if (!c) return;
    const emoe_config *cfg = emoe_container_config(c);
    CHECK(cfg->n_layers == 1 && cfg->hidden == H && cfg->vocab == V && cfg->n_heads == NH && cfg->n_kv_heads == NKV &&
              cfg->head_dim == HD && cfg->n_experts == NE && cfg->top_k == 2 && cfg->expert_ffn == FF,
          "config dims");
    CHECK(cfg->rope_dim == HD && cfg->qk_norm == EMOE_QK_NORM_HEAD && cfg->norm_topk == 1 &&
              fabsf(cfg->norm_eps - 1e-6f) < 1e-12f && cfg->rope_theta == 10000.0f && !cfg->expert_map,
          "config fields");
    CHECK(emoe_container_bos_token_id(c) == 1 && emoe_container_eos_token_id(c) == -1, "bos/eos");
    CHECK(!strcmp(emoe_container_family(c), "test") && emoe_container_max_position(c) == 4096, "family, defaults");
    const char *src = emoe_container_metadata_string(c, "source");
    CHECK(src && !strcmp(src, "test") && !emoe_container_metadata_string(c, "bits"), "metadata");
    const emoe_tensor_info *t = emoe_container_find(c, "output.weight");
    CHECK(t && t->dtype == EMOE_Q8_0 && t->ndim == 2 && t->shape[0] == V && t->shape[1] == H &&
              t->nbytes == (uint64_t)V * H / 32 * 34 && t->kind == EMOE_KIND_DENSE,
          "find output.weight");
    t = emoe_container_find(c, "tokenizer.json");
    CHECK(t && t->dtype == EMOE_BYTES && t->kind == EMOE_KIND_BLOB &&
              !memcmp(emoe_container_data(c, t), "{\"model\"", 8), "blob");
    CHECK(!emoe_container_find(c, "nope") && !emoe_container_find(c, "") && emoe_container_n_tensors(c) == 14 + 3 * NE,
          "lookup misses, count");
    for (size_t i = 0; i < emoe_container_n_tensors(c); i++) {
        const emoe_tensor_info *ti = emoe_container_tensor(c, i);
        CHECK(emoe_container_find(c, ti->name) == ti, "find every tensor by name (%s)", ti->name);
    }
    emoe_container_close(c);
    float ref[V];
    CHECK(open_load_run(path, 1, ref) == 0, "synthetic model runs");
    for (int i = 0; i < V; i++) CHECK(isfinite(ref[i]), "finite logits");

    /* expert_map: merged layer, stored names by group */
    build_model(&file, ", \"expert_map\": [[0, 1, 1, -1]]");
    CHECK(!write_file(path, file.p, file.n), "write");
    c = emoe_container_open(path, 1, err, sizeof err);
    CHECK(c && emoe_container_config(c)->expert_map, "expert_map parsed: %s", c ? "" : err);
    if (c) {
        const int32_t *em = emoe_container_config(c)->expert_map;
        CHECK(em[0] == 0 && em[1] == 1 && em[2] == 1 && em[3] == -1, "expert_map values");
        /* stored experts 2 and 3 are not used by the map: the loader skips them; the model runs with 2 groups */
        emoe_model *m = emoe_container_load_model(c, 8, 1, 2, err, sizeof err);
        CHECK(m, "merged model loads: %s", err);
        int32_t tok[3] = {3, 1, 4};
        float lg[V];
        if (m) CHECK(!emoe_forward(m, tok, 3, lg, 0), "merged forward: %s", emoe_model_last_error(m));
        emoe_model_free(m);
        emoe_container_close(c);
    }
    build_model(&file, ", \"expert_map\": [[0, 1, 1]]");
    write_file(path, file.p, file.n);
    expect_error(path, 0, "expected 0 or n_experts");
    build_model(&file, ", \"expert_map\": [[0, 1, 9, 2]]");
    write_file(path, file.p, file.n);
    expect_error(path, 0, "expert_map[0][2] must be an integer in -1..3");
    build_model(&file, ", \"rope_kind\": \"spiral\"");
    write_file(path, file.p, file.n);
    expect_error(path, 0, "'rope_kind' = 'spiral' is not one of 'neox', 'norm'");
    build_model(&file, ", \"qkv_bias\": \"yes\"");
    write_file(path, file.p, file.n);
    expect_error(path, 0, "'qkv_bias' must be true or false");
    /* qkv_bias on: attn_q.bias is now used, attn_k.bias missing -> the model names it */
    build_model(&file, ", \"qkv_bias\": true");
    write_file(path, file.p, file.n);
    c = emoe_container_open(path, 0, err, sizeof err);
    CHECK(c, "open: %s", err);
    if (c) {
        CHECK(!emoe_container_load_model(c, 8, 0, 1, err, sizeof err) && strstr(err, "blk.0.attn_k.bias"),
              "missing bias named: %s", err);
        emoe_container_close(c);
    }
    free(file.p);
}

/* Hand-written indexes over a 4 KiB data region: structural errors of tensor entries and the arch object. */
static void test_index_errors(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/index.emoe", dir);
    buf data = {0}, file = {0};
    buf_zero(&data, EMOE_CONTAINER_PREAMBLE_SIZE + 4096);
    const char *arch = "\"arch\": {\"family\": \"t\", \"n_layers\": 1, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 1, \"n_kv_heads\": 1, "
                       "\"head_dim\": 64, \"n_experts\": 2, \"top_k\": 1, \"expert_ffn\": 64}";
    static const struct {
        const char *tensors;
        const char *want;
        int version;
    } cases[] = {
        {"[]", NULL, 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [4], \"offset\": 4096, \"nbytes\": 16, \"crc32\": 0}]",
         "checksum mismatch in tensor 'a'", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [4], \"offset\": 4096, \"nbytes\": 12, \"crc32\": 0}]",
         "nbytes = 12, but f32 with 4 values takes 16 bytes", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [4], \"offset\": 8190, \"nbytes\": 16, \"crc32\": 0}]",
         "outside the data region", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [4], \"offset\": 0, \"nbytes\": 16, \"crc32\": 0}]",
         "outside the data region", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [4], \"offset\": 9223372036854775800, \"nbytes\": 16, "
         "\"crc32\": 0}]", "outside the data region", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [4294967296, 4294967296, 16], \"offset\": 4096, "
         "\"nbytes\": 16, \"crc32\": 0}]", "'shape' is too large", 1},
        {"[{\"name\": \"a\", \"dtype\": \"q4_k\", \"shape\": [4], \"offset\": 4096, \"nbytes\": 16, \"crc32\": 0}]",
         "unknown dtype 'q4_k'", 1},
        {"[{\"name\": \"a\", \"dtype\": \"q8_0\", \"shape\": [4, 8], \"offset\": 4096, \"nbytes\": 34, \"crc32\": 0}]",
         "", 1}, /* 32 values: one block, a valid entry (crc mismatch only with verify) */
        {"[{\"name\": \"a\", \"dtype\": \"q8_0\", \"shape\": [4, 7], \"offset\": 4096, \"nbytes\": 34, \"crc32\": 0}]",
         "q8_0 needs a multiple of 32 values", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4096, \"nbytes\": 4, \"crc32\": 0}, "
         "{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4100, \"nbytes\": 4, \"crc32\": 0}]",
         "tensor 'a' appears twice", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4096, \"nbytes\": 4, \"crc32\": -1}]",
         "'crc32' a 32-bit unsigned integer", 1},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4096, \"nbytes\": 4, \"crc32\": 0, "
         "\"kind\": \"resident\"}]", "'kind' must be", 1},
        {"[{\"name\": \"\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4096, \"nbytes\": 4, \"crc32\": 0}]",
         "'name' must be a non-empty string", 1},
        {"[{\"name\": \"a\\u0000b\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4096, \"nbytes\": 4, "
         "\"crc32\": 0}]", "NUL", 1},
        {"[7]", "tensor entry 0: not an object", 1},
        {"{}", "'tensors' must be a list", 1},
        /* MWQ (v2): [4, 16], base_bits 2, group_size 8 -> ng = 2: P1 = 4*4*2 + 4*16*2/8 = 48 bytes, P2 = 2*4*2 + 8 =
         * 24 bytes at the next 64-byte boundary (4096 + 64) */
        {"[{\"name\": \"m\", \"dtype\": \"mwq\", \"shape\": [4, 16], \"offset\": 4096, \"nbytes\": 88, \"crc32\": 0, "
         "\"kind\": \"expert\", \"quant\": {\"base_bits\": 2, \"group_size\": 8, \"nesting\": \"msb\"}, \"planes\": "
         "[{\"offset\": 4096, \"nbytes\": 48, \"crc32\": 0, \"bits\": 2}, {\"offset\": 4160, \"nbytes\": 24, "
         "\"crc32\": 0, \"bits\": 1}]}]", "", 2},
        {"[{\"name\": \"m\", \"dtype\": \"mwq\", \"shape\": [4, 16], \"offset\": 4096, \"nbytes\": 88, \"crc32\": 0, "
         "\"kind\": \"expert\", \"quant\": {\"base_bits\": 2, \"group_size\": 8, \"nesting\": \"msb\"}, \"planes\": "
         "[{\"offset\": 4096, \"nbytes\": 48, \"crc32\": 0, \"bits\": 2}, {\"offset\": 4160, \"nbytes\": 24, "
         "\"crc32\": 0, \"bits\": 1}]}]", "dtype 'mwq' needs container version 2", 1},
        {"[{\"name\": \"m\", \"dtype\": \"mwq\", \"shape\": [4, 16], \"offset\": 4096, \"nbytes\": 88, \"crc32\": 0, "
         "\"kind\": \"expert\", \"quant\": {\"base_bits\": 2, \"group_size\": 8, \"nesting\": \"msb\"}, \"planes\": "
         "[{\"offset\": 4096, \"nbytes\": 48, \"crc32\": 0, \"bits\": 2}, {\"offset\": 4150, \"nbytes\": 24, "
         "\"crc32\": 0, \"bits\": 1}]}]", "plane 2 (bytes 4150..4174) should start at byte 4160", 2},
        {"[{\"name\": \"m\", \"dtype\": \"mwq\", \"shape\": [4, 16], \"offset\": 4096, \"nbytes\": 88, \"crc32\": 0, "
         "\"kind\": \"expert\", \"quant\": {\"base_bits\": 2, \"group_size\": 8, \"nesting\": \"msb\"}, \"planes\": "
         "[{\"offset\": 4096, \"nbytes\": 40, \"crc32\": 0, \"bits\": 2}]}]", "plane 1 has 40 bytes, expected 48", 2},
        {"[{\"name\": \"m\", \"dtype\": \"mwq\", \"shape\": [4, 16], \"offset\": 4096, \"nbytes\": 88, \"crc32\": 0, "
         "\"kind\": \"expert\", \"quant\": {\"base_bits\": 3, \"group_size\": 8}, \"planes\": []}]",
         "quant.base_bits must be 2, 4 or 8", 2},
        {"[{\"name\": \"m\", \"dtype\": \"mwq\", \"shape\": [4, 16], \"offset\": 4096, \"nbytes\": 88, \"crc32\": 0, "
         "\"kind\": \"expert\"}]", "MWQ tensor without a 'quant' object", 2},
        {"[{\"name\": \"a\", \"dtype\": \"f32\", \"shape\": [1], \"offset\": 4096, \"nbytes\": 4, \"crc32\": 0, "
         "\"planes\": []}]", "'planes' given for a tensor that is not 'mwq'", 1},
    };
    char index[4096], err[1024];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(index, sizeof index, "{\"format\": \"edgemoe\", \"version\": %d, %s, \"tensors\": %s}",
                 cases[i].version, arch, cases[i].tensors);
        finish_file(&file, &data, index, strlen(index), (uint32_t)cases[i].version);
        write_file(path, file.p, file.n);
        emoe_container *c = emoe_container_open(path, cases[i].want && cases[i].want[0] == 'c', err, sizeof err);
        if (!cases[i].want || !cases[i].want[0]) {
            CHECK(c, "index case %zu should open: %s", i, err);
            if (c && cases[i].version == 2) {
                const emoe_tensor_info *t = emoe_container_find(c, "m");
                CHECK(t && t->dtype == EMOE_MWQ && t->n_planes == 2 && t->planes[1].offset == 4160 &&
                          t->planes[1].bits == 1 && t->mwq_base_bits == 2 && t->mwq_group_size == 8 &&
                          !strcmp(t->mwq_nesting, "msb"), "mwq entry parsed");
                CHECK(emoe_container_verify(c, err, sizeof err) && strstr(err, "plane 1 of 2 of tensor 'm'"),
                      "plane checksum named: %s", err);
            }
        } else
            CHECK(!c && strstr(err, cases[i].want), "index case %zu: expected '%s', got '%s'", i, cases[i].want,
                  c ? "(opened)" : err);
        emoe_container_close(c);
    }
    /* the arch object: every refusal names the field (emoe_arch_read); with a valid base, one field changed */
#define BASE "\"family\": \"t\", \"n_layers\": 2, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, " \
             "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32"
    static const struct {
        const char *arch, *want;
    } arch_cases[] = {
        {"{" BASE "}", NULL},
        {"{" BASE ", \"dense_layers\": [1], \"dense_ffn\": 48, \"nope_layers\": [0, 1], \"sliding_window\": 8, "
         "\"swa_layers\": [0], \"expert_map\": [[0, 0, 1, -1], []], \"bos_token_id\": null, \"eos_token_id\": 3, "
         "\"rope_dim\": 8, \"qk_norm\": \"full\", \"shared_ffn\": 16, \"shared_gate\": true}", NULL},
        {"{\"hidden\": 64}", "required field 'family' is missing"},
        {"{\"family\": \"t\", \"hidden\": 64}", "required field 'n_layers' is missing"},
        {"{" BASE ", \"n_layers\": 0}", "duplicate key \"n_layers\""},
        {"{\"family\": \"t\", \"n_layers\": 0, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "'n_layers' must be an integer in 1..4096"},
        {"{\"family\": \"t\", \"n_layers\": 2147483647, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, "
         "\"n_kv_heads\": 2, \"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}",
         "'n_layers' must be an integer in 1..4096"},
        {"{\"family\": \"t\", \"n_layers\": 1.5, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "'n_layers' must be an integer"},
        {"{\"family\": \"t\", \"n_layers\": \"2\", \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "'n_layers' must be an integer"},
        {"{\"family\": \"t\", \"n_layers\": 2, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 0, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "'n_kv_heads' must be an integer in 1"},
        {"{\"family\": \"t\", \"n_layers\": 2, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 3, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "n_heads = 4 is not a multiple"},
        {"{\"family\": \"t\", \"n_layers\": 2, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 5, \"expert_ffn\": 32}", "top_k = 5 must be in 1..n_experts"},
        {"{\"family\": \"t\", \"n_layers\": 2, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 0, \"expert_ffn\": 32}", "'top_k' must be an integer in 1"},
        {"{\"family\": \"t\", \"n_layers\": 2, \"hidden\": 64, \"vocab\": 99999999, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "'vocab' must be an integer in"},
        {"{" BASE ", \"norm_eps\": -1e-6}", "'norm_eps' = -1e-06 must be a positive number"},
        {"{" BASE ", \"norm_eps\": 0}", "'norm_eps' = 0 must be a positive number"},
        {"{" BASE ", \"norm_eps\": 1e-300}", "fits in a float"},
        {"{" BASE ", \"rope_theta\": -10000.0}", "'rope_theta' = -10000 must be a positive number"},
        {"{" BASE ", \"rope_theta\": 1e39}", "fits in a float"},
        {"{" BASE ", \"rope_theta\": \"1e4\"}", "'rope_theta' must be a number, got a string"},
        {"{" BASE ", \"rope_dim\": 7}", "rope_dim = 7 must be even"},
        {"{" BASE ", \"rope_dim\": 32}", "rope_dim = 32 must be even and at most head_dim = 16"},
        {"{" BASE ", \"rope_kind\": \"spiral\"}", "'rope_kind' = 'spiral' is not one of 'neox', 'norm'"},
        {"{" BASE ", \"activation\": 1}", "'activation' must be one of 'swiglu', 'reglu', 'swiglu_clamp', 'geglu_tanh', got a number"},
        {"{" BASE ", \"qkv_bias\": 1}", "'qkv_bias' must be true or false, got a number"},
        {"{" BASE ", \"tie_embeddings\": null}", "'tie_embeddings' must be true or false, got null"},
        {"{\"family\": 3, \"n_layers\": 2, \"hidden\": 64, \"vocab\": 8, \"n_heads\": 4, \"n_kv_heads\": 2, "
         "\"head_dim\": 16, \"n_experts\": 4, \"top_k\": 2, \"expert_ffn\": 32}", "'family' must be a string"},
        {"{" BASE ", \"dense_layers\": [2]}", "'dense_layers' must hold layer numbers in 0..1"},
        {"{" BASE ", \"dense_layers\": [-1]}", "'dense_layers' must hold layer numbers in 0..1"},
        {"{" BASE ", \"nope_layers\": [1, 1]}", "'nope_layers' names layer 1 twice"},
        {"{" BASE ", \"swa_layers\": 1}", "'swa_layers' must be a list of layer numbers, got a number"},
        {"{" BASE ", \"swa_layers\": [0]}", "swa_layers given but sliding_window = 0"},
        {"{" BASE ", \"dense_layers\": [0]}", "dense_layers given but dense_ffn = 0"},
        {"{" BASE ", \"shared_gate\": true}", "shared_gate is true but shared_ffn = 0"},
        {"{" BASE ", \"expert_map\": [[0, 1, 2]]}", "expert_map[0] has 3 entries, expected 0 or n_experts = 4"},
        {"{" BASE ", \"expert_map\": [[0, 1, 9, 2]]}", "expert_map[0][2] must be an integer in -1..3"},
        {"{" BASE ", \"expert_map\": [[0, -1, -1, -1]]}", "expert_map[0] keeps 1 experts, fewer than top_k = 2"},
        {"{" BASE ", \"expert_map\": [[0, 2, 2, 0]]}", "expert_map[0] uses stored expert 2 but not 1"},
        {"{" BASE ", \"expert_map\": [[], [], []]}", "'expert_map' has 3 rows, more than n_layers = 2"},
        {"{" BASE ", \"expert_map\": [[0, 1, 2, 3]], \"dense_layers\": [0], \"dense_ffn\": 8}",
         "expert_map[0] must be empty: layer 0 is a dense layer"},
        {"{" BASE ", \"expert_map\": null}", "'expert_map' must be a list"},
        {"{" BASE ", \"eos_token_id\": -2}", "'eos_token_id' must be an integer in -1..2147483647 or null"},
        {"{" BASE ", \"max_position\": 0}", "'max_position' must be an integer in 1.."},
        {"{" BASE ", \"sliding_window_size\": 8}", "unknown field 'sliding_window_size' (written by a newer edgemoe?"},
        {"{" BASE ", \"vocab\\u0000\": 320}", "NUL"},
        {"[]", "'arch' (the architecture description) is missing or not an object"},
    };
#undef BASE
    for (size_t i = 0; i < sizeof arch_cases / sizeof arch_cases[0]; i++) {
        snprintf(index, sizeof index, "{\"arch\": %s, \"tensors\": []}", arch_cases[i].arch);
        finish_file(&file, &data, index, strlen(index), 1);
        write_file(path, file.p, file.n);
        int status = 1;
        emoe_container *c = emoe_container_open_status(path, 0, &status, err, sizeof err);
        if (!arch_cases[i].want)
            CHECK(c && status == EMOE_OK, "arch case %zu should open: %s", i, err);
        else
            CHECK(!c && status == EMOE_ERR_INVALID && strstr(err, arch_cases[i].want),
                  "arch case %zu: expected '%s' (invalid), got status %d '%s'", i, arch_cases[i].want, status,
                  c ? "(opened)" : err);
        emoe_container_close(c);
        /* the same text through the public model API: one reader, the same verdict */
        const char *obj = strchr(index, ':') + 2;
        const size_t len = strlen(obj) - strlen(", \"tensors\": []}");
        const int ck = emoe_arch_check(obj, len, err, sizeof err);
        if (!arch_cases[i].want) CHECK(ck == EMOE_OK, "arch case %zu: emoe_arch_check refused: %s", i, err);
        else CHECK(ck == EMOE_ERR_INVALID && err[0], "arch case %zu: emoe_arch_check gave %d", i, ck);
        emoe_model *m = emoe_model_new_json(obj, len, 8, 0, 1, &status, err, sizeof err);
        CHECK(!!m == !arch_cases[i].want && status == (m ? EMOE_OK : EMOE_ERR_INVALID),
              "arch case %zu: emoe_model_new_json %s (status %d): %s", i, m ? "accepted" : "refused", status, err);
        emoe_model_free(m);
    }
    /* the attack of issue 13: "vocab": 16 and "vocab\u0000": 320 once meant 16 to Python and 320 to C */
    CHECK(!emoe_model_new_json("{\"vocab\": 16, \"vocab\\u0000\": 320}", 33, 8, 0, 1, NULL, err, sizeof err) &&
              strstr(err, "NUL"), "NUL key refused by the model API: %s", err);
    CHECK(emoe_arch_check("{\"a\": 1} x", 10, err, sizeof err) == EMOE_ERR_INVALID && strstr(err, "not valid JSON"),
          "trailing garbage: %s", err);
    const char *ok = "{\"family\": \"t\", \"n_layers\": 1, \"hidden\": 8, \"vocab\": 4, \"n_heads\": 1, "
                     "\"n_kv_heads\": 1, \"head_dim\": 8, \"n_experts\": 1, \"top_k\": 1, \"expert_ffn\": 8}";
    int mst = 0;
    CHECK(!emoe_model_new_json(ok, strlen(ok), 0, 0, 1, &mst, err, sizeof err) && mst == EMOE_ERR_ARG &&
              strstr(err, "max_ctx"), "bad max_ctx: %d %s", mst, err);
    emoe_model *okm = emoe_model_new_json(ok, strlen(ok), 8, 1, 1, &mst, err, sizeof err);
    CHECK(okm && mst == EMOE_OK, "valid arch text makes a model: %s", err);
    emoe_model_free(okm);
    snprintf(index, sizeof index, "{\"format\": \"gguf\", %s, \"tensors\": []}", arch);
    finish_file(&file, &data, index, strlen(index), 1);
    write_file(path, file.p, file.n);
    expect_error(path, 0, "format is 'gguf', expected 'edgemoe'");
    snprintf(index, sizeof index, "{\"version\": 2, %s, \"tensors\": []}", arch);
    finish_file(&file, &data, index, strlen(index), 1);
    write_file(path, file.p, file.n);
    expect_error(path, 0, "version does not match the preamble's version 1");
    snprintf(index, sizeof index, "{%s, \"tensors\": [}", arch);
    finish_file(&file, &data, index, strlen(index), 1);
    write_file(path, file.p, file.n);
    expect_error(path, 0, "is not valid JSON: byte");
    /* a file with no tensors: load_model names the first missing one */
    snprintf(index, sizeof index, "{%s, \"tensors\": []}", arch);
    finish_file(&file, &data, index, strlen(index), 1);
    write_file(path, file.p, file.n);
    emoe_container *c = emoe_container_open(path, 1, err, sizeof err);
    CHECK(c, "empty container opens: %s", err);
    if (c) {
        CHECK(!emoe_container_load_model(c, 8, 0, 1, err, sizeof err) && strstr(err, "token_embd.weight"),
              "missing tensor named: %s", err);
        CHECK(!emoe_container_load_model(c, 0, 0, 1, err, sizeof err) && strstr(err, "max_ctx"),
              "bad max_ctx named: %s", err);
        emoe_container_close(c);
    }
    /* files that are not containers, and the kind of each failure as a value */
    expect_error(dir, 0, "is a directory");
    int status = 0;
    CHECK(!emoe_container_open_status(dir, 0, &status, err, sizeof err) && status == EMOE_ERR_IO, "dir: %d", status);
    snprintf(path, sizeof path, "%s/does-not-exist.emoe", dir);
    expect_error(path, 0, "no such file");
    CHECK(!emoe_container_open_status(path, 0, &status, err, sizeof err) && status == EMOE_ERR_IO, "absent: %d",
          status);
    snprintf(path, sizeof path, "%s/index.emoe", dir);
    finish_file(&file, &data, "{}", 2, 1);
    memcpy(file.p, "GGUF", 4);
    write_file(path, file.p, file.n);
    CHECK(!emoe_container_open_status(path, 0, &status, err, sizeof err) && status == EMOE_ERR_FORMAT &&
              strstr(err, "not an edgemoe container"), "magic: %d %s", status, err);
    finish_file(&file, &data, "{}", 2, 9);
    write_file(path, file.p, file.n);
    CHECK(!emoe_container_open_status(path, 0, &status, err, sizeof err) && status == EMOE_ERR_FORMAT,
          "version 9: %d %s", status, err);
    snprintf(index, sizeof index, "{%s, \"tensors\": []}", arch);
    finish_file(&file, &data, index, strlen(index), 1);
    file.p[file.n - 3] ^= 1; /* inside the index: its checksum no longer matches */
    write_file(path, file.p, file.n);
    CHECK(!emoe_container_open_status(path, 0, &status, err, sizeof err) && status == EMOE_ERR_CORRUPT,
          "index checksum: %d %s", status, err);
    write_file(path, file.p, file.n - 1);
    CHECK(!emoe_container_open_status(path, 0, &status, err, sizeof err) && status == EMOE_ERR_CORRUPT &&
              strstr(err, "truncated"), "truncated: %d %s", status, err);
    snprintf(index, sizeof index, "{%s, \"tensors\": [], \"tensors2\": []}", arch);
    finish_file(&file, &data, index, strlen(index), 1);
    write_file(path, file.p, file.n);
    CHECK(!emoe_container_open_status(path, 0, &status, err, sizeof err) && status == EMOE_ERR_INVALID &&
              strstr(err, "unknown field 'tensors2'"), "unknown index key: %d %s", status, err);
    free(data.p);
    free(file.p);
}

/* ==================================================================================================== fuzz ==== */

typedef struct {
    int opened, refused, ran;
} tally;

static void count(tally *t, const char *path, int verify) {
    char err[1024] = "";
    emoe_container *c = emoe_container_open(path, verify, err, sizeof err);
    if (!c) {
        CHECK(err[0], "refused without a message");
        t->refused++;
        return;
    }
    t->opened++;
    emoe_container_close(c);
    if (open_load_run(path, verify, NULL) == 0) t->ran++;
}

/* Truncate, flip bytes, and mutate the index (checksum repaired) of the file image `orig`. */
static void fuzz(const unsigned char *orig, size_t n, const char *dir, int iters, const char *label) {
    char path[512];
    snprintf(path, sizeof path, "%s/fuzz.emoe", dir);
    const uint64_t index_off = (uint64_t)orig[8] | (uint64_t)orig[9] << 8 | (uint64_t)orig[10] << 16 |
                               (uint64_t)orig[11] << 24 | (uint64_t)orig[12] << 32 | (uint64_t)orig[13] << 40;
    const size_t index_len = n - (size_t)index_off;
    uint64_t seed = 12345;
    tally trunc = {0}, flip = {0}, mut = {0}, num = {0};

    /* 1. truncation: every length in the index and the preamble, a spread of lengths in the data. Always refused. */
    CHECK(!write_file(path, orig, n), "write");
    int fd = open(path, O_WRONLY);
    for (size_t len = n; len-- > 0;) {
        if (len > 64 && len < index_off && len % 997) continue; /* sample the data region */
        if (ftruncate(fd, (off_t)len)) break;
        char err[512] = "";
        emoe_container *c = emoe_container_open(path, 0, err, sizeof err);
        CHECK(!c && strstr(err, "truncated"), "%s truncated to %zu bytes: '%s'", label, len, c ? "opened" : err);
        emoe_container_close(c);
        trunc.refused++;
    }
    close(fd);

    /* 2. single byte flips: preamble bytes and the index are always caught (magic, version, offsets, CRC); a flip in
     * the data is caught by verify and otherwise must still not crash the forward pass. */
    unsigned char *img = malloc(n + 65536);
    for (int it = 0; it < iters; it++) {
        memcpy(img, orig, n);
        size_t pos;
        const int where = it % 3;
        if (where == 0) pos = rng_next(&seed) % 28;
        else if (where == 1) pos = (size_t)index_off + rng_next(&seed) % index_len;
        else pos = 4096 + rng_next(&seed) % ((size_t)index_off - 4096);
        img[pos] ^= (unsigned char)(1u << (rng_next(&seed) % 8));
        write_file(path, img, n);
        const int verify = (int)(rng_next(&seed) % 2);
        char err[512] = "";
        emoe_container *c = emoe_container_open(path, verify, err, sizeof err);
        if (where < 2 || verify) {
            /* a data flip inside 64-byte alignment padding is not covered by any CRC */
            if (where < 2 || c == NULL) CHECK(!c && err[0], "%s: flip at %zu accepted", label, pos);
            if (where == 1) CHECK(strstr(err, "checksum mismatch in the tensor index"), "index flip: %s", err);
        }
        emoe_container_close(c);
        count(&flip, path, verify);
    }

    /* 3. index mutations with the checksum repaired: the JSON parser and the entry / arch checks see them */
    const char soup[] = "{}[]\",:0123456789-.e \\";
    for (int it = 0; it < iters; it++) {
        memcpy(img, orig, (size_t)index_off);
        unsigned char *ix = img + index_off;
        memcpy(ix, orig + index_off, index_len);
        size_t len = index_len;
        const int ops = 1 + (int)(rng_next(&seed) % 3);
        for (int op = 0; op < ops; op++) {
            const size_t p = rng_next(&seed) % len;
            switch (rng_next(&seed) % 4) {
            case 0: ix[p] = (unsigned char)soup[rng_next(&seed) % (sizeof soup - 1)]; break;
            case 1: ix[p] = (unsigned char)rng_next(&seed); break;
            case 2: /* delete a short span */
                if (len > 8) {
                    size_t k = 1 + rng_next(&seed) % 8;
                    if (p + k > len) k = len - p;
                    memmove(ix + p, ix + p + k, len - p - k);
                    len -= k;
                }
                break;
            default: /* duplicate a short span */
                if (len + 64 < index_len + 65536) {
                    size_t k = 1 + rng_next(&seed) % 32;
                    if (p + k > len) k = len - p;
                    memmove(ix + p + k, ix + p, len - p);
                    len += k;
                }
            }
        }
        put_u64(img + 16, len);
        put_u32(img + 24, emoe_crc32(0, ix, len));
        write_file(path, img, (size_t)index_off + len);
        count(&mut, path, (int)(rng_next(&seed) % 2));
    }

    /* 4. every number in the index replaced by an extreme value (one at a time; checksum repaired). Numbers are
     * offsets, sizes, shapes, CRCs and the arch's dimensions: the checks must refuse what would read outside the file
     * or allocate nonsense, and anything accepted must run. */
    static const char *const values[] = {"0", "-1", "1", "3", "4097", "65535", "2147483648", "9223372036854775807",
                                         "18446744073709551616", "1e300", "0.5"};
    int n_numbers = 0;
    for (size_t p = 0; p < index_len; p++) {
        const unsigned char ch = orig[index_off + p];
        const unsigned char prev = p ? orig[index_off + p - 1] : ' ';
        if (!((ch >= '0' && ch <= '9') || ch == '-') || (prev >= '0' && prev <= '9') || prev == '.' || prev == '-' ||
            prev == 'e' || prev == '"' || prev == '_' || prev == '\\' || (prev >= 'a' && prev <= 'z'))
            continue;
        size_t q = p + 1;
        while (q < index_len && strchr("0123456789.eE+-", orig[index_off + q])) q++;
        n_numbers++;
        if (n_numbers % (1 + (int)(index_len / 20000)) && iters < 1000) continue; /* keep big indexes quick */
        const char *v = values[rng_next(&seed) % (sizeof values / sizeof values[0])];
        const size_t vl = strlen(v);
        memcpy(img, orig, (size_t)index_off);
        unsigned char *ix = img + index_off;
        memcpy(ix, orig + index_off, p);
        memcpy(ix + p, v, vl);
        memcpy(ix + p + vl, orig + index_off + q, index_len - q);
        const size_t len = index_len - (q - p) + vl;
        put_u64(img + 16, len);
        put_u32(img + 24, emoe_crc32(0, ix, len));
        write_file(path, img, (size_t)index_off + len);
        count(&num, path, 0);
    }
    free(img);
    remove(path);
    printf("fuzz %s (%zu bytes, index %zu bytes): truncations %d refused; byte flips %d opened / %d refused / %d ran; "
           "index mutations %d opened / %d refused / %d ran; number swaps (%d numbers) %d opened / %d refused / %d "
           "ran\n",
           label, n, index_len, trunc.refused, flip.opened, flip.refused, flip.ran, mut.opened, mut.refused, mut.ran,
           n_numbers, num.opened, num.refused, num.ran);
}

int main(int argc, char **argv) {
    const char *dir = NULL;
    int iters = 3000;
    const char *files[16];
    int n_files = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tmp") && i + 1 < argc) dir = argv[++i];
        else if (n_files < 16) files[n_files++] = argv[i];
    }
    char tmpl[] = "/tmp/emoe_test_container_XXXXXX";
    int made_dir = 0;
    if (!dir) {
        const char *td = getenv("TMPDIR");
        static char buf_dir[512];
        snprintf(buf_dir, sizeof buf_dir, "%s/emoe_test_container_XXXXXX", td && td[0] ? td : "/tmp");
        dir = mkdtemp(buf_dir);
        if (!dir) dir = mkdtemp(tmpl);
        made_dir = dir != NULL;
    }
    if (!dir) {
        fprintf(stderr, "cannot create a temporary directory: %s\n", strerror(errno));
        return 2;
    }
    test_json();
    printf("json: %d checks, %d failed\n", n_check, n_fail);
    test_synthetic(dir);
    test_index_errors(dir);
    printf("container: %d checks, %d failed\n", n_check, n_fail);
    char path[512];
    snprintf(path, sizeof path, "%s/synthetic.emoe", dir);
    buf file = {0};
    build_model(&file, "");
    fuzz(file.p, file.n, dir, iters, "synthetic");
    free(file.p);
    for (int i = 0; i < n_files; i++) {
        size_t n;
        unsigned char *data = read_file(files[i], &n);
        CHECK(data && n > 4096, "read %s", files[i]);
        if (!data) continue;
        char err[1024];
        emoe_container *c = emoe_container_open(files[i], 1, err, sizeof err);
        CHECK(c, "%s: %s", files[i], err);
        int has_mwq = 0; /* the core cannot run MWQ planes yet: such a file is only parsed and fuzzed */
        for (size_t k = 0; c && k < emoe_container_n_tensors(c); k++)
            has_mwq |= emoe_container_tensor(c, k)->dtype == EMOE_MWQ;
        emoe_container_close(c);
        CHECK(open_load_run(files[i], 1, NULL) == 0 || has_mwq, "%s runs", files[i]);
        fuzz(data, n, dir, iters, files[i]);
        free(data);
    }
    remove(path);
    snprintf(path, sizeof path, "%s/index.emoe", dir);
    remove(path);
    if (made_dir) rmdir(dir);
    printf("%s: %d checks, %d failed\n", n_fail ? "FAILED" : "all passed", n_check, n_fail);
    return n_fail ? 1 : 0;
}
