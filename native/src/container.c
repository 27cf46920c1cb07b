/* The `.emoe` container reader (docs/FORMAT.md): preamble, read-only mapping, JSON index -> tensor table (the arch
 * object goes to arch.c, the one reader of the architecture), CRC checks, failures as typed statuses, and model
 * creation with every tensor pointer borrowed from the mapping.
 *
 * Everything read from the file is treated as hostile: every size is checked for overflow and every range against the
 * file before it is touched, and every failure returns a message naming the file and what was expected. */
#define _POSIX_C_SOURCE 200809L
#include "edgemoe_container.h"

#include "crc32.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arch.h"
#include "json.h"

#define MAX_PLANES 16             /* MWQ: base plane + up to 15 residual planes */
#define MAX_INDEX_BYTES ((uint64_t)256 << 20) /* a 256 MiB index is ~1M tensor entries: far beyond any model */

struct emoe_container {
    char *path;
    const unsigned char *map; /* the whole file, read-only */
    size_t size;
    int version;
    uint64_t index_offset, index_nbytes;
    json_doc *doc; /* the parsed index, only while opening (its nodes take ~10x the index size) */
    int metadata;  /* node of the metadata object, or JSON_NONE (while opening) */
    char *strings; /* every string kept after opening: names, family, nesting, string-valued metadata */
    const char **meta; /* [2 * n_meta]: key, value of each string-valued metadata entry */
    size_t n_meta;
    emoe_arch arch; /* the architecture (arch.c), owned */
    emoe_tensor_info *tensors; /* [n_tensors], file (index) order */
    size_t n_tensors;
    emoe_plane *planes; /* all MWQ planes, back to back */
    size_t *by_name;    /* tensor indices sorted by name */
    void **owned;       /* buffers made by load_model (f16 -> f32 1-D tensors, realigned copies) */
    size_t n_owned;
};

/* ---- errors ---- */

static void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- little helpers ---- */

static uint32_t rd_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd_u64(const unsigned char *p) { return (uint64_t)rd_u32(p) | (uint64_t)rd_u32(p + 4) << 32; }

/* a * b, or 0 with *ovf set when it does not fit in uint64. */
static uint64_t mul_u64(uint64_t a, uint64_t b, int *ovf) {
    if (a && b > UINT64_MAX / a) {
        *ovf = 1;
        return 0;
    }
    return a * b;
}

/* [off, off + n) inside [lo, hi), without overflow */
static int range_ok(uint64_t off, uint64_t n, uint64_t lo, uint64_t hi) {
    return off >= lo && off <= hi && n <= hi - off;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* ---- the tensor table ---- */

static const struct {
    const char *name;
    int dtype;
    uint64_t block_bytes, block_values;
} DTYPES[] = {
    {"f32", EMOE_F32, 4, 1},  {"f16", EMOE_F16, 2, 1},    {"q8_0", EMOE_Q8_0, EMOE_Q8_0_BLOCK_BYTES, EMOE_QK8_0},
    {"bytes", EMOE_BYTES, 1, 1}, {"mwq", EMOE_MWQ, 0, 0},
};
static const char *const KINDS[] = {"dense", "expert", "blob"};

typedef struct {
    emoe_container *c;
    size_t idx; /* entry number, for messages */
    const char *name;
    char *err;
    size_t errlen;
} entry_ctx;

static int entry_fail(entry_ctx *e, const char *what) {
    if (e->name) set_err(e->err, e->errlen, "%s: tensor '%s': %s", e->c->path, e->name, what);
    else set_err(e->err, e->errlen, "%s: tensor entry %zu: %s", e->c->path, e->idx, what);
    return EMOE_ERR_INVALID;
}

/* Refuse keys outside `known` (NULL-terminated) in object obj: a newer writer's field must not be ignored. */
static int unknown_key(const json_doc *d, int obj, const char *const *known, const char **which) {
    for (int m = json_first(d, obj); m != JSON_NONE; m = json_next(d, m)) {
        const char *key = json_key(d, m);
        int i = 0;
        while (known[i] && strcmp(known[i], key)) i++;
        if (!known[i]) {
            *which = key;
            return 1;
        }
    }
    return 0;
}

static int get_u64(const json_doc *d, int obj, const char *key, uint64_t max, uint64_t *out) {
    int64_t v;
    int n = json_get(d, obj, key);
    if (!json_int64(d, n, &v) || v < 0 || (uint64_t)v > max) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* MWQ plane sizes (edgemoe/mwq.py plane_nbytes): P1 = f16 scales + f16 mins + packed codes, Pk = f16 scales + signs. */
static int read_planes(entry_ctx *e, int entry, emoe_tensor_info *t, emoe_plane *planes) {
    const json_doc *d = e->c->doc;
    char msg[200];
    int q = json_get(d, entry, "quant");
    if (json_kind(d, q) != JSON_OBJECT) return entry_fail(e, "MWQ tensor without a 'quant' object");
    uint64_t bb, gs;
    if (get_u64(d, q, "base_bits", 8, &bb) || (bb != 2 && bb != 4 && bb != 8))
        return entry_fail(e, "quant.base_bits must be 2, 4 or 8");
    if (get_u64(d, q, "group_size", 1 << 20, &gs) || gs == 0 || gs % 8)
        return entry_fail(e, "quant.group_size must be a positive multiple of 8");
    t->mwq_base_bits = (int32_t)bb;
    t->mwq_group_size = (int32_t)gs;
    const char *nesting = json_str(d, json_get(d, q, "nesting"), NULL);
    t->mwq_nesting = nesting ? nesting : "";
    if (t->ndim != 2 || t->shape[0] <= 0 || t->shape[1] <= 0 || (uint64_t)t->shape[1] % gs)
        return entry_fail(e, "MWQ tensors must be 2-D [out, in] with in a multiple of quant.group_size");
    const uint64_t out = (uint64_t)t->shape[0], in = (uint64_t)t->shape[1], ng = in / gs;
    int pl = json_get(d, entry, "planes");
    if (json_kind(d, pl) != JSON_ARRAY || json_len(d, pl) == 0 || json_len(d, pl) > MAX_PLANES) {
        snprintf(msg, sizeof msg, "MWQ tensor needs a 'planes' list of 1..%d planes", MAX_PLANES);
        return entry_fail(e, msg);
    }
    int k = 0;
    for (int p = json_first(d, pl); p != JSON_NONE; p = json_next(d, p), k++) {
        emoe_plane *P = &planes[k];
        uint64_t crc, bits;
        if (json_kind(d, p) != JSON_OBJECT || get_u64(d, p, "offset", UINT64_MAX >> 1, &P->offset) ||
            get_u64(d, p, "nbytes", UINT64_MAX >> 1, &P->nbytes) || get_u64(d, p, "crc32", 0xFFFFFFFFu, &crc) ||
            get_u64(d, p, "bits", 8, &bits)) {
            snprintf(msg, sizeof msg, "plane %d needs integer 'offset', 'nbytes', 'crc32' and 'bits'", k + 1);
            return entry_fail(e, msg);
        }
        P->crc32 = (uint32_t)crc;
        P->bits = (int32_t)bits;
        if (bits != (k == 0 ? bb : 1)) {
            snprintf(msg, sizeof msg, "plane %d has bits = %d, expected %d", k + 1, (int)bits, k == 0 ? (int)bb : 1);
            return entry_fail(e, msg);
        }
        int ovf = 0;
        const uint64_t scales = mul_u64(out, ng, &ovf), weights = mul_u64(out, in, &ovf);
        const uint64_t want = k == 0 ? mul_u64(scales, 4, &ovf) + mul_u64(weights, bb, &ovf) / 8
                                     : mul_u64(scales, 2, &ovf) + weights / 8;
        if (ovf || P->nbytes != want) {
            snprintf(msg, sizeof msg, "plane %d has %llu bytes, expected %llu for [%llu, %llu] with base_bits %d, "
                     "group_size %d", k + 1, (unsigned long long)P->nbytes, (unsigned long long)want,
                     (unsigned long long)out, (unsigned long long)in, (int)bb, (int)gs);
            return entry_fail(e, msg);
        }
        /* Plane 1 starts the tensor's span; each later plane starts at the next 64-byte boundary (FORMAT.md). */
        const uint64_t want_off = k == 0 ? t->offset : (planes[k - 1].offset + planes[k - 1].nbytes + 63) / 64 * 64;
        if (P->offset != want_off || !range_ok(P->offset, P->nbytes, t->offset, t->offset + t->nbytes)) {
            snprintf(msg, sizeof msg, "plane %d (bytes %llu..%llu) should start at byte %llu and lie inside the "
                     "tensor's span %llu..%llu", k + 1, (unsigned long long)P->offset,
                     (unsigned long long)(P->offset + P->nbytes), (unsigned long long)want_off,
                     (unsigned long long)t->offset, (unsigned long long)(t->offset + t->nbytes));
            return entry_fail(e, msg);
        }
    }
    if (planes[k - 1].offset + planes[k - 1].nbytes != t->offset + t->nbytes)
        return entry_fail(e, "'nbytes' must end where the last plane ends");
    t->n_planes = k;
    return 0;
}

static int read_entry(emoe_container *c, int entry, size_t idx, emoe_tensor_info *t, emoe_plane *planes, char *err,
                      size_t errlen) {
    const json_doc *d = c->doc;
    entry_ctx e = {c, idx, NULL, err, errlen};
    char msg[256];
    memset(t, 0, sizeof(*t));
    t->mwq_nesting = "";
    if (json_kind(d, entry) != JSON_OBJECT) return entry_fail(&e, "not an object");
    static const char *const known[] = {"name", "dtype", "shape", "offset", "nbytes", "crc32", "kind", "planes",
                                        "quant", NULL};
    const char *odd;
    if (unknown_key(d, entry, known, &odd)) {
        snprintf(msg, sizeof msg, "unknown field '%.60s' (written by a newer edgemoe?)", odd);
        return entry_fail(&e, msg);
    }
    size_t nlen;
    const char *name = json_str(d, json_get(d, entry, "name"), &nlen);
    if (!name || !nlen || nlen != strlen(name)) return entry_fail(&e, "'name' must be a non-empty string");
    t->name = e.name = name;
    const char *dt = json_str(d, json_get(d, entry, "dtype"), NULL);
    t->dtype = -1;
    for (size_t i = 0; dt && i < sizeof(DTYPES) / sizeof(DTYPES[0]); i++)
        if (!strcmp(dt, DTYPES[i].name)) t->dtype = DTYPES[i].dtype, t->dtype_name = DTYPES[i].name;
    if (t->dtype < 0) {
        snprintf(msg, sizeof msg, "unknown dtype '%.40s' (this reader knows f32, f16, q8_0, bytes, mwq)",
                 dt ? dt : "(not a string)");
        return entry_fail(&e, msg);
    }
    int kn = json_get(d, entry, "kind");
    const char *kind = kn == JSON_NONE ? "dense" : json_str(d, kn, NULL);
    t->kind = -1;
    for (int i = 0; kind && i < 3; i++)
        if (!strcmp(kind, KINDS[i])) t->kind = i;
    if (t->kind < 0) return entry_fail(&e, "'kind' must be \"dense\", \"expert\" or \"blob\"");
    int sh = json_get(d, entry, "shape");
    if (json_kind(d, sh) != JSON_ARRAY || json_len(d, sh) > EMOE_MAX_DIMS) {
        snprintf(msg, sizeof msg, "'shape' must be a list of at most %d integers", EMOE_MAX_DIMS);
        return entry_fail(&e, msg);
    }
    uint64_t count = 1;
    int ovf = 0;
    for (int s = json_first(d, sh); s != JSON_NONE; s = json_next(d, s)) {
        int64_t v;
        if (!json_int64(d, s, &v) || v < 0) return entry_fail(&e, "'shape' must hold non-negative integers");
        t->shape[t->ndim++] = v;
        count = mul_u64(count, (uint64_t)v, &ovf);
    }
    if (ovf) return entry_fail(&e, "'shape' is too large");
    uint64_t crc;
    if (get_u64(d, entry, "offset", UINT64_MAX >> 1, &t->offset) ||
        get_u64(d, entry, "nbytes", UINT64_MAX >> 1, &t->nbytes) || get_u64(d, entry, "crc32", 0xFFFFFFFFu, &crc))
        return entry_fail(&e, "'offset', 'nbytes' must be non-negative integers and 'crc32' a 32-bit unsigned integer");
    t->crc32 = (uint32_t)crc;
    if (!range_ok(t->offset, t->nbytes, EMOE_CONTAINER_PREAMBLE_SIZE, c->index_offset)) {
        snprintf(msg, sizeof msg, "bytes %llu..%llu lie outside the data region %d..%llu",
                 (unsigned long long)t->offset, (unsigned long long)t->offset + t->nbytes, EMOE_CONTAINER_PREAMBLE_SIZE,
                 (unsigned long long)c->index_offset);
        return entry_fail(&e, msg);
    }
    if (t->dtype == EMOE_MWQ) {
        if (c->version < 2) return entry_fail(&e, "dtype 'mwq' needs container version 2");
        return read_planes(&e, entry, t, planes);
    }
    if (json_get(d, entry, "planes") != JSON_NONE && json_kind(d, json_get(d, entry, "planes")) != JSON_NULL)
        return entry_fail(&e, "'planes' given for a tensor that is not 'mwq'");
    for (size_t i = 0; i < sizeof(DTYPES) / sizeof(DTYPES[0]); i++) {
        if (DTYPES[i].dtype != t->dtype) continue;
        if (count % DTYPES[i].block_values) {
            snprintf(msg, sizeof msg, "%s needs a multiple of %llu values, shape has %llu", t->dtype_name,
                     (unsigned long long)DTYPES[i].block_values, (unsigned long long)count);
            return entry_fail(&e, msg);
        }
        const uint64_t want = mul_u64(count / DTYPES[i].block_values, DTYPES[i].block_bytes, &ovf);
        if (ovf || want != t->nbytes) {
            snprintf(msg, sizeof msg, "nbytes = %llu, but %s with %llu values takes %llu bytes",
                     (unsigned long long)t->nbytes, t->dtype_name, (unsigned long long)count, (unsigned long long)want);
            return entry_fail(&e, msg);
        }
    }
    return 0;
}

static int cmp_names_of(const emoe_container *c, size_t a, size_t b) {
    return strcmp(c->tensors[a].name, c->tensors[b].name);
}

/* Insertion into a sorted index would be O(n^2); a heap sort keeps it O(n log n) without qsort's global context. */
static void sift(const emoe_container *c, size_t *v, size_t root, size_t n) {
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && cmp_names_of(c, v[child], v[child + 1]) < 0) child++;
        if (cmp_names_of(c, v[root], v[child]) >= 0) return;
        size_t tmp = v[root];
        v[root] = v[child];
        v[child] = tmp;
        root = child;
    }
}
static void sort_by_name(const emoe_container *c, size_t *v, size_t n) {
    for (size_t i = n / 2; i-- > 0;) sift(c, v, i, n);
    for (size_t end = n; end-- > 1;) {
        size_t tmp = v[0];
        v[0] = v[end];
        v[end] = tmp;
        sift(c, v, 0, end);
    }
}

static int read_tensors(emoe_container *c, int arr, char *err, size_t errlen) {
    const json_doc *d = c->doc;
    if (json_kind(d, arr) != JSON_ARRAY) {
        set_err(err, errlen, "%s: index: 'tensors' must be a list", c->path);
        return EMOE_ERR_INVALID;
    }
    const size_t n = json_len(d, arr);
    size_t n_planes = 0;
    for (int e = json_first(d, arr); e != JSON_NONE; e = json_next(d, e)) {
        int pl = json_get(d, e, "planes");
        if (json_kind(d, pl) == JSON_ARRAY) n_planes += json_len(d, pl) < MAX_PLANES ? json_len(d, pl) : MAX_PLANES;
    }
    c->tensors = calloc(n ? n : 1, sizeof(emoe_tensor_info));
    c->by_name = calloc(n ? n : 1, sizeof(size_t));
    c->planes = calloc(n_planes ? n_planes : 1, sizeof(emoe_plane));
    if (!c->tensors || !c->by_name || !c->planes) {
        set_err(err, errlen, "%s: out of memory reading %zu tensor entries", c->path, n);
        return EMOE_ERR_NOMEM;
    }
    size_t i = 0, used_planes = 0;
    for (int e = json_first(d, arr); e != JSON_NONE; e = json_next(d, e), i++) {
        const int st = read_entry(c, e, i, &c->tensors[i], c->planes + used_planes, err, errlen);
        if (st) return st;
        c->tensors[i].planes = c->tensors[i].n_planes ? c->planes + used_planes : NULL;
        used_planes += (size_t)c->tensors[i].n_planes;
        c->by_name[i] = i;
    }
    c->n_tensors = n;
    sort_by_name(c, c->by_name, n);
    for (size_t k = 1; k < n; k++)
        if (!cmp_names_of(c, c->by_name[k - 1], c->by_name[k])) {
            set_err(err, errlen, "%s: index: tensor '%s' appears twice", c->path, c->tensors[c->by_name[k]].name);
            return EMOE_ERR_INVALID;
        }
    return 0;
}

/* ---- open / close ---- */

static int read_index(emoe_container *c, char *err, size_t errlen) {
    const unsigned char *idx = c->map + c->index_offset;
    const uint32_t want = rd_u32(c->map + 24);
    if (c->index_nbytes > MAX_INDEX_BYTES) {
        set_err(err, errlen, "%s: the tensor index has %llu bytes, more than the %llu this reader accepts (corrupt "
                "preamble?)", c->path, (unsigned long long)c->index_nbytes, (unsigned long long)MAX_INDEX_BYTES);
        return EMOE_ERR_INVALID;
    }
    if (emoe_crc32(0, idx, (size_t)c->index_nbytes) != want) {
        set_err(err, errlen, "%s: checksum mismatch in the tensor index (the file is corrupt; re-export it)", c->path);
        return EMOE_ERR_CORRUPT;
    }
    char jerr[200];
    if (json_parse((const char *)idx, (size_t)c->index_nbytes, JSON_DEFAULT_MAX_DEPTH, &c->doc, jerr, sizeof jerr)) {
        set_err(err, errlen, "%s: the tensor index (file bytes %llu..%llu) is not valid JSON: %s", c->path,
                (unsigned long long)c->index_offset, (unsigned long long)(c->index_offset + c->index_nbytes), jerr);
        return strstr(jerr, "out of memory") ? EMOE_ERR_NOMEM : EMOE_ERR_INVALID;
    }
    const json_doc *d = c->doc;
    if (json_kind(d, 0) != JSON_OBJECT) {
        set_err(err, errlen, "%s: the tensor index must be a JSON object", c->path);
        return EMOE_ERR_INVALID;
    }
    static const char *const known[] = {"format", "version", "arch", "metadata", "tensors", NULL};
    const char *odd;
    if (unknown_key(d, 0, known, &odd)) {
        set_err(err, errlen, "%s: index: unknown field '%.60s' (written by a newer edgemoe? upgrade edgemoe)", c->path,
                odd);
        return EMOE_ERR_INVALID;
    }
    int f = json_get(d, 0, "format");
    const char *fmt = json_str(d, f, NULL);
    if (f != JSON_NONE && (!fmt || strcmp(fmt, "edgemoe"))) {
        set_err(err, errlen, "%s: index: format is '%.40s', expected 'edgemoe'", c->path, fmt ? fmt : "(not a string)");
        return EMOE_ERR_INVALID;
    }
    int v = json_get(d, 0, "version");
    int64_t iv;
    if (v != JSON_NONE && (!json_int64(d, v, &iv) || iv != c->version)) {
        set_err(err, errlen, "%s: index: version does not match the preamble's version %d", c->path, c->version);
        return EMOE_ERR_INVALID;
    }
    int arch = json_get(d, 0, "arch");
    if (json_kind(d, arch) != JSON_OBJECT) {
        set_err(err, errlen, "%s: index: 'arch' (the architecture description) is missing or not an object", c->path);
        return EMOE_ERR_INVALID;
    }
    c->metadata = json_get(d, 0, "metadata");
    if (c->metadata != JSON_NONE && json_kind(d, c->metadata) != JSON_OBJECT) {
        set_err(err, errlen, "%s: index: 'metadata' must be an object", c->path);
        return EMOE_ERR_INVALID;
    }
    int tensors = json_get(d, 0, "tensors");
    if (tensors == JSON_NONE) {
        set_err(err, errlen, "%s: index: 'tensors' is missing", c->path);
        return EMOE_ERR_INVALID;
    }
    char aerr[400];
    const int st = emoe_arch_read(d, arch, &c->arch, aerr, sizeof aerr);
    if (st) {
        set_err(err, errlen, "%s: %s", c->path, st == EMOE_ERR_NOMEM ? "out of memory" : aerr);
        return st;
    }
    return read_tensors(c, tensors, err, errlen);
}

/* Copy the strings that outlive opening into one block and drop the parsed index (the tensor table, config and
 * these strings are all a container keeps; for a large MoE the JSON nodes would be tens of MB). */
static int compact(emoe_container *c, char *err, size_t errlen) {
    const json_doc *d = c->doc;
    size_t total = strlen(c->arch.family) + 1;
    for (size_t i = 0; i < c->n_tensors; i++)
        total += strlen(c->tensors[i].name) + 1 + strlen(c->tensors[i].mwq_nesting) + 1;
    for (int m = json_first(d, c->metadata); m != JSON_NONE; m = json_next(d, m))
        if (json_kind(d, m) == JSON_STRING) total += strlen(json_key(d, m)) + 1 + strlen(json_str(d, m, NULL)) + 1,
                                            c->n_meta++;
    c->strings = malloc(total);
    c->meta = malloc((c->n_meta ? c->n_meta : 1) * 2 * sizeof(char *));
    if (!c->strings || !c->meta) {
        set_err(err, errlen, "%s: out of memory", c->path);
        return EMOE_ERR_NOMEM;
    }
    char *p = c->strings;
#define KEEP(dst, src)                                                                                                \
    do {                                                                                                              \
        const size_t n_ = strlen(src) + 1;                                                                            \
        memcpy(p, (src), n_);                                                                                         \
        (dst) = p;                                                                                                    \
        p += n_;                                                                                                      \
    } while (0)
    for (size_t i = 0; i < c->n_tensors; i++) {
        KEEP(c->tensors[i].name, c->tensors[i].name);
        KEEP(c->tensors[i].mwq_nesting, c->tensors[i].mwq_nesting);
    }
    size_t k = 0;
    for (int m = json_first(d, c->metadata); m != JSON_NONE; m = json_next(d, m))
        if (json_kind(d, m) == JSON_STRING) {
            KEEP(c->meta[2 * k], json_key(d, m));
            KEEP(c->meta[2 * k + 1], json_str(d, m, NULL));
            k++;
        }
#undef KEEP
    json_free(c->doc);
    c->doc = NULL;
    c->metadata = JSON_NONE;
    return 0;
}

emoe_container *emoe_container_open_status(const char *path, int verify, int *status, char *err, size_t errlen) {
    int dummy;
    if (!status) status = &dummy;
    *status = EMOE_OK;
    set_err(err, errlen, "%s", "");
    if (!path) {
        set_err(err, errlen, "emoe_container_open: path is NULL");
        *status = EMOE_ERR_ARG;
        return NULL;
    }
    emoe_container *c = calloc(1, sizeof(*c));
    if (!c || !(c->path = dup_str(path))) {
        free(c);
        set_err(err, errlen, "%s: out of memory", path);
        *status = EMOE_ERR_NOMEM;
        return NULL;
    }
    c->metadata = JSON_NONE;
    int st_code = EMOE_ERR_IO; /* the kind of the next failure */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* O_NONBLOCK: a FIFO is refused below, not waited on */
    if (fd < 0) {
        set_err(err, errlen, "%s: %s", path, errno == ENOENT ? "no such file" : strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st)) {
        set_err(err, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        set_err(err, errlen, "%s: is a directory, expected an .emoe container file", path);
        close(fd);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s: not a regular file, expected an .emoe container file", path);
        close(fd);
        goto fail;
    }
    if (st.st_size < EMOE_CONTAINER_PREAMBLE_SIZE) {
        st_code = EMOE_ERR_CORRUPT;
        set_err(err, errlen, "%s: truncated (%lld bytes; a container is at least %d)", path, (long long)st.st_size,
                EMOE_CONTAINER_PREAMBLE_SIZE);
        close(fd);
        goto fail;
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        set_err(err, errlen, "%s: %lld bytes do not fit in this process's address space", path, (long long)st.st_size);
        close(fd);
        goto fail;
    }
    c->size = (size_t)st.st_size;
    st_code = EMOE_ERR_IO;
    void *map = mmap(NULL, c->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        set_err(err, errlen, "%s: mmap of %zu bytes failed: %s", path, c->size, strerror(errno));
        goto fail;
    }
    c->map = map;
    st_code = EMOE_ERR_FORMAT;
    if (memcmp(c->map, "EMOE", 4)) {
        char shown[20];
        for (int i = 0; i < 4; i++) shown[i] = c->map[i] >= 0x20 && c->map[i] < 0x7F ? (char)c->map[i] : '?';
        shown[4] = '\0';
        set_err(err, errlen, "%s: not an edgemoe container (magic '%s', expected 'EMOE')", path, shown);
        goto fail;
    }
    const uint32_t version = rd_u32(c->map + 4);
    if (version < 1 || version > EMOE_CONTAINER_MAX_VERSION) {
        set_err(err, errlen, "%s: container version %u, this edgemoe reads versions 1..%d (a newer edgemoe wrote it?)",
                path, version, EMOE_CONTAINER_MAX_VERSION);
        goto fail;
    }
    c->version = (int)version;
    st_code = EMOE_ERR_CORRUPT;
    c->index_offset = rd_u64(c->map + 8);
    c->index_nbytes = rd_u64(c->map + 16);
    if (c->index_offset > c->size || c->index_nbytes > c->size - c->index_offset) {
        set_err(err, errlen, "%s: truncated (index ends at byte %llu, file has %zu)", path,
                (unsigned long long)c->index_offset + (unsigned long long)c->index_nbytes, c->size);
        goto fail;
    }
    if (c->index_offset + c->index_nbytes != c->size) { /* FORMAT.md: the file ends with its index */
        set_err(err, errlen, "%s: %llu bytes follow the index (the file ends with its index: damaged or appended "
                "to; re-export it)", path, (unsigned long long)(c->size - c->index_offset - c->index_nbytes));
        goto fail;
    }
    if (c->index_offset < EMOE_CONTAINER_PREAMBLE_SIZE) {
        set_err(err, errlen, "%s: the index offset %llu lies inside the %d-byte preamble (corrupt preamble)", path,
                (unsigned long long)c->index_offset, EMOE_CONTAINER_PREAMBLE_SIZE);
        goto fail;
    }
    if ((st_code = read_index(c, err, errlen)) || (st_code = compact(c, err, errlen))) goto fail;
    if (verify && (st_code = emoe_container_verify(c, err, errlen))) goto fail;
    return c;
fail:
    *status = st_code;
    emoe_container_close(c);
    return NULL;
}

emoe_container *emoe_container_open(const char *path, int verify, char *err, size_t errlen) {
    return emoe_container_open_status(path, verify, NULL, err, errlen);
}

void emoe_container_close(emoe_container *c) {
    if (!c) return;
    if (c->map) munmap((void *)c->map, c->size);
    json_free(c->doc);
    free(c->strings);
    free(c->meta);
    for (size_t i = 0; i < c->n_owned; i++) free(c->owned[i]);
    free(c->owned);
    free(c->tensors);
    free(c->by_name);
    free(c->planes);
    emoe_arch_free(&c->arch);
    free(c->path);
    free(c);
}

int emoe_container_verify(const emoe_container *c, char *err, size_t errlen) {
    if (!c) return EMOE_ERR_ARG;
    for (size_t i = 0; i < c->n_tensors; i++) {
        const emoe_tensor_info *t = &c->tensors[i];
        for (int k = 0; k < t->n_planes; k++) /* per-plane checksums first: they say which plane is damaged */
            if (emoe_crc32_fast(0, c->map + t->planes[k].offset, (size_t)t->planes[k].nbytes) != t->planes[k].crc32) {
                set_err(err, errlen, "%s: checksum mismatch in plane %d of %d of tensor '%s' (the file is corrupt; "
                        "re-export it)", c->path, k + 1, t->n_planes, t->name);
                return EMOE_ERR_CORRUPT;
            }
        if (emoe_crc32_fast(0, c->map + t->offset, (size_t)t->nbytes) != t->crc32) {
            set_err(err, errlen, "%s: checksum mismatch in tensor '%s' (the file is corrupt; re-export it)", c->path,
                    t->name);
            return EMOE_ERR_CORRUPT;
        }
    }
    return EMOE_OK;
}

/* ---- accessors ---- */

int emoe_container_version(const emoe_container *c) { return c ? c->version : 0; }
const char *emoe_container_path(const emoe_container *c) { return c ? c->path : NULL; }
uint64_t emoe_container_file_size(const emoe_container *c) { return c ? c->size : 0; }
const emoe_config *emoe_container_config(const emoe_container *c) { return c ? &c->arch.cfg : NULL; }
const char *emoe_container_family(const emoe_container *c) { return c ? c->arch.family : NULL; }
int64_t emoe_container_max_position(const emoe_container *c) { return c ? c->arch.max_position : 0; }
int64_t emoe_container_bos_token_id(const emoe_container *c) { return c ? c->arch.bos_token_id : -1; }
int64_t emoe_container_eos_token_id(const emoe_container *c) { return c ? c->arch.eos_token_id : -1; }
size_t emoe_container_n_tensors(const emoe_container *c) { return c ? c->n_tensors : 0; }

const char *emoe_container_metadata_string(const emoe_container *c, const char *key) {
    const char *found = NULL;
    for (size_t i = 0; c && key && i < c->n_meta; i++)
        if (!strcmp(c->meta[2 * i], key)) found = c->meta[2 * i + 1]; /* the last one, like Python's json */
    return found;
}

const emoe_tensor_info *emoe_container_tensor(const emoe_container *c, size_t i) {
    return c && i < c->n_tensors ? &c->tensors[i] : NULL;
}

const emoe_tensor_info *emoe_container_find(const emoe_container *c, const char *name) {
    if (!c || !name) return NULL;
    size_t lo = 0, hi = c->n_tensors;
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        const int r = strcmp(c->tensors[c->by_name[mid]].name, name);
        if (!r) return &c->tensors[c->by_name[mid]];
        if (r < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const void *emoe_container_data(const emoe_container *c, const emoe_tensor_info *t) {
    return c && t ? c->map + t->offset : NULL;
}

uint64_t emoe_container_kind_bytes(const emoe_container *c, int kind) {
    uint64_t s = 0;
    for (size_t i = 0; c && i < c->n_tensors; i++)
        if (c->tensors[i].kind == kind) s += c->tensors[i].nbytes;
    return s;
}

/* ---- model creation ---- */

/* emoe_container_load_model (the resident loader) lives in load.c, next to the table walk it shares with the
 * streaming loader. */
