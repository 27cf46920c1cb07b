/* A small, strict JSON parser for the container index (see json.h). Recursive descent over a bounded buffer into a
 * flat node array; every read is checked against the buffer length, every allocation can fail cleanly. */
#include "json.h"

#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_KEY ((size_t)-1)
#define MAX_NUMBER_CHARS 256  /* longer number literals are refused (Python writes at most ~25 characters) */
#define MAX_TEXT ((size_t)1 << 30) /* 1 GiB: keeps node indices and pool offsets far from overflow */

typedef struct {
    uint8_t type;    /* json_type */
    uint8_t is_int;  /* JSON_NUMBER written as an integer that fits int64 */
    int32_t first;   /* first child (arrays, objects) or JSON_NONE */
    int32_t next;    /* next sibling or JSON_NONE */
    uint32_t count;  /* number of children */
    size_t key;      /* pool offset of the member key, NO_KEY if not an object member */
    size_t key_pos;  /* byte offset of the member key in the text (for the duplicate-key message) */
    size_t str, len; /* pool offset and length of a string value */
    int64_t i;       /* integer value (is_int) */
    double d;        /* number value */
} node;

struct json_doc {
    node *nodes; /* [n_nodes], root = 0 */
    size_t n_nodes, cap_nodes;
    char *pool;  /* decoded strings and keys, each NUL-terminated */
    size_t n_pool, cap_pool;
};

typedef struct {
    const unsigned char *s;
    size_t len, pos;
    int max_depth;
    json_doc *d;
    char *err;
    size_t errlen;
} parser;

static int fail(parser *p, size_t pos, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(parser *p, size_t pos, const char *fmt, ...) {
    if (p->err && p->errlen) {
        int n = snprintf(p->err, p->errlen, "byte %zu: ", pos);
        if (n >= 0 && (size_t)n < p->errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return -1;
}

static int new_node(parser *p, json_type type, int *out) {
    json_doc *d = p->d;
    if (d->n_nodes == d->cap_nodes) {
        size_t cap = d->cap_nodes ? d->cap_nodes * 2 : 64;
        node *nn = realloc(d->nodes, cap * sizeof(node));
        if (!nn) return fail(p, p->pos, "out of memory");
        d->nodes = nn;
        d->cap_nodes = cap;
    }
    node *n = &d->nodes[d->n_nodes];
    memset(n, 0, sizeof(*n));
    n->type = (uint8_t)type;
    n->first = n->next = JSON_NONE;
    n->key = NO_KEY;
    *out = (int)d->n_nodes++;
    return 0;
}

static int pool_reserve(parser *p, size_t extra) {
    json_doc *d = p->d;
    if (d->cap_pool - d->n_pool >= extra) return 0;
    size_t cap = d->cap_pool ? d->cap_pool : 256;
    while (cap - d->n_pool < extra) cap *= 2;
    char *np = realloc(d->pool, cap);
    if (!np) return fail(p, p->pos, "out of memory");
    d->pool = np;
    d->cap_pool = cap;
    return 0;
}

static void skip_ws(parser *p) {
    while (p->pos < p->len) {
        const unsigned char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int hex4(parser *p, size_t at, unsigned *out) {
    if (p->len - at < 4) return fail(p, p->len, "unexpected end of input in a \\u escape");
    unsigned v = 0;
    for (size_t i = 0; i < 4; i++) {
        const unsigned char c = p->s[at + i];
        unsigned h;
        if (c >= '0' && c <= '9') h = c - '0';
        else if (c >= 'a' && c <= 'f') h = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') h = c - 'A' + 10;
        else return fail(p, at + i, "expected a hex digit in a \\u escape");
        v = v * 16 + h;
    }
    *out = v;
    return 0;
}

/* Length of the valid UTF-8 sequence starting at s[at] (a byte >= 0x80), or 0 if invalid (RFC 3629: no overlong
 * forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const parser *p, size_t at) {
    const unsigned char *s = p->s + at;
    const size_t avail = p->len - at;
    const unsigned char c = s[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if (avail < n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xC0 | (cp >> 6)), o[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000)
        return o[0] = (char)(0xE0 | (cp >> 12)), o[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
               o[2] = (char)(0x80 | (cp & 0x3F)), 3;
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Parse a string at p->pos (which is at the opening quote) into the pool: *off, *len. */
static int parse_string(parser *p, size_t *off, size_t *len) {
    const size_t start = p->pos++;
    /* The decoded string is never longer than its source text, so reserve that once. */
    size_t end = p->pos;
    while (end < p->len && p->s[end] != '"') end += p->s[end] == '\\' ? 2 : 1;
    if (end >= p->len) return fail(p, start, "unterminated string");
    if (pool_reserve(p, end - p->pos + 1)) return -1;
    char *o = p->d->pool + p->d->n_pool;
    size_t n = 0;
    for (;;) {
        if (p->pos >= p->len) return fail(p, start, "unterminated string");
        const unsigned char c = p->s[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) return fail(p, p->pos, "control character 0x%02x inside a string (must be escaped)", c);
        if (c >= 0x80) {
            const size_t k = utf8_seq(p, p->pos);
            if (!k) return fail(p, p->pos, "invalid UTF-8 inside a string");
            memcpy(o + n, p->s + p->pos, k);
            n += k;
            p->pos += k;
            continue;
        }
        if (c != '\\') {
            o[n++] = (char)c;
            p->pos++;
            continue;
        }
        if (p->pos + 1 >= p->len) return fail(p, p->pos, "unterminated escape");
        const unsigned char e = p->s[p->pos + 1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char repl[] = "\"\\/\b\f\n\r\t";
            o[n++] = repl[simple - "\"\\/bfnrt"];
            p->pos += 2;
            continue;
        }
        if (e != 'u') return fail(p, p->pos, "invalid escape '\\%c'", e >= 0x20 && e < 0x7F ? e : '?');
        unsigned cp;
        if (hex4(p, p->pos + 2, &cp)) return -1;
        size_t used = 6;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return fail(p, p->pos, "lone low surrogate \\u%04X", cp);
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            const size_t q = p->pos + 6;
            unsigned lo;
            if (p->len - q < 2 || p->s[q] != '\\' || p->s[q + 1] != 'u')
                return fail(p, p->pos, "high surrogate \\u%04X not followed by a low surrogate", cp);
            if (hex4(p, q + 2, &lo)) return -1;
            if (lo < 0xDC00 || lo > 0xDFFF)
                return fail(p, q, "high surrogate \\u%04X followed by \\u%04X, not a low surrogate", cp, lo);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            used = 12;
        }
        /* A NUL would end the string for every C reader but not for Python: "vocab\u0000" would be two keys to one
         * reader and one to another. Refused, so a document means one thing to every reader. */
        if (cp == 0) return fail(p, p->pos, "\\u0000 (NUL) inside a string is not allowed");
        /* A \u escape takes 6 (or 12) source bytes and at most 3 (or 4) decoded bytes: still within the reserve. */
        n += put_utf8(o + n, cp);
        p->pos += used;
    }
    o[n] = '\0';
    *off = p->d->n_pool;
    *len = n;
    p->d->n_pool += n + 1;
    return 0;
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int parse_number(parser *p, int idx) {
    const size_t start = p->pos;
    size_t i = p->pos;
    int neg = 0, integer = 1;
    if (i < p->len && p->s[i] == '-') neg = 1, i++;
    if (i >= p->len || !is_digit(p->s[i])) return fail(p, i, "expected a digit");
    if (p->s[i] == '0') {
        i++;
        if (i < p->len && is_digit(p->s[i])) return fail(p, i, "leading zeros are not allowed in numbers");
    } else
        while (i < p->len && is_digit(p->s[i])) i++;
    if (i < p->len && p->s[i] == '.') {
        integer = 0;
        i++;
        if (i >= p->len || !is_digit(p->s[i])) return fail(p, i, "expected a digit after the decimal point");
        while (i < p->len && is_digit(p->s[i])) i++;
    }
    if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
        integer = 0;
        i++;
        if (i < p->len && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->len || !is_digit(p->s[i])) return fail(p, i, "expected a digit in the exponent");
        while (i < p->len && is_digit(p->s[i])) i++;
    }
    const size_t n = i - start;
    if (n > MAX_NUMBER_CHARS) return fail(p, start, "number literal longer than %d characters", MAX_NUMBER_CHARS);
    node *nd = &p->d->nodes[idx];
    if (integer) { /* exact int64, if it fits */
        uint64_t acc = 0, limit = neg ? (uint64_t)INT64_MAX + 1u : (uint64_t)INT64_MAX;
        int fits = 1;
        for (size_t k = start + (size_t)neg; k < i && fits; k++) {
            const unsigned dgt = p->s[k] - '0';
            if (acc > (limit - dgt) / 10) fits = 0;
            else acc = acc * 10 + dgt;
        }
        /* An integer literal is kept exactly or refused: as a double it would silently round. */
        if (!fits) return fail(p, start, "integer %.*s does not fit in 64 bits", n > 40 ? 40 : (int)n,
                               (const char *)p->s + start);
        nd->is_int = 1;
        nd->i = neg ? (acc == (uint64_t)INT64_MAX + 1u ? INT64_MIN : -(int64_t)acc) : (int64_t)acc;
    }
    /* strtod needs a NUL-terminated string and uses the locale's decimal point; give it both. */
    char buf[MAX_NUMBER_CHARS + 8];
    memcpy(buf, p->s + start, n);
    buf[n] = '\0';
    const struct lconv *lc = localeconv();
    const char dp = lc && lc->decimal_point && lc->decimal_point[0] ? lc->decimal_point[0] : '.';
    if (dp != '.')
        for (size_t k = 0; k < n; k++)
            if (buf[k] == '.') buf[k] = dp;
    char *endp = NULL;
    const double v = strtod(buf, &endp);
    if (endp != buf + n) return fail(p, start, "could not convert number");
    if (isinf(v) || isnan(v)) return fail(p, start, "number out of the range of a double");
    nd->d = v;
    p->pos = i;
    return 0;
}

static int parse_value(parser *p, int depth, int *out);

typedef struct {
    const char *key;
    size_t pos;
} key_ref;

static int cmp_key_ref(const void *a, const void *b) {
    return strcmp(((const key_ref *)a)->key, ((const key_ref *)b)->key);
}

/* Refuse an object that names a key twice: Python's json keeps the last value, other readers the first; either way
 * one file would mean two things. Keys hold no NUL (parse_string refuses \u0000), so strcmp compares them fully. */
static int check_unique_keys(parser *p, int obj) {
    const json_doc *d = p->d;
    const size_t n = d->nodes[obj].count;
    if (n < 2) return 0;
    if (n <= 16) {
        for (int a = d->nodes[obj].first; a != JSON_NONE; a = d->nodes[a].next)
            for (int b = d->nodes[a].next; b != JSON_NONE; b = d->nodes[b].next)
                if (!strcmp(d->pool + d->nodes[a].key, d->pool + d->nodes[b].key))
                    return fail(p, d->nodes[b].key_pos, "duplicate key \"%.60s\" in an object", d->pool + d->nodes[b].key);
        return 0;
    }
    key_ref *refs = malloc(n * sizeof(key_ref));
    if (!refs) return fail(p, p->pos, "out of memory");
    size_t i = 0;
    for (int c = d->nodes[obj].first; c != JSON_NONE; c = d->nodes[c].next, i++)
        refs[i] = (key_ref){d->pool + d->nodes[c].key, d->nodes[c].key_pos};
    qsort(refs, n, sizeof(key_ref), cmp_key_ref);
    for (i = 1; i < n; i++)
        if (!strcmp(refs[i - 1].key, refs[i].key)) {
            const key_ref *later = refs[i].pos > refs[i - 1].pos ? &refs[i] : &refs[i - 1];
            int st = fail(p, later->pos, "duplicate key \"%.60s\" in an object", later->key);
            free(refs);
            return st;
        }
    free(refs);
    return 0;
}

static int parse_container(parser *p, int depth, int idx, int is_object) {
    const char close = is_object ? '}' : ']';
    const size_t open_pos = p->pos;
    if (depth >= p->max_depth) return fail(p, p->pos, "nesting deeper than %d levels", p->max_depth);
    p->pos++; /* '{' or '[' */
    skip_ws(p);
    if (p->pos < p->len && p->s[p->pos] == close) {
        p->pos++;
        return 0;
    }
    int last = JSON_NONE;
    uint32_t count = 0;
    for (;;) {
        size_t koff = NO_KEY, klen = 0, kpos = 0;
        if (is_object) {
            skip_ws(p);
            if (p->pos >= p->len) return fail(p, p->pos, "unexpected end of input in the object opened at byte %zu",
                                              open_pos);
            if (p->s[p->pos] != '"') return fail(p, p->pos, "expected a string key");
            kpos = p->pos;
            if (parse_string(p, &koff, &klen)) return -1;
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') return fail(p, p->pos, "expected ':' after an object key");
            p->pos++;
        }
        int child;
        if (parse_value(p, depth + 1, &child)) return -1;
        node *nodes = p->d->nodes; /* may have moved */
        nodes[child].key = koff;
        nodes[child].key_pos = kpos;
        if (last == JSON_NONE) nodes[idx].first = child;
        else nodes[last].next = child;
        last = child;
        if (count == UINT32_MAX) return fail(p, p->pos, "too many elements");
        count++;
        skip_ws(p);
        if (p->pos >= p->len)
            return fail(p, p->pos, "unexpected end of input in the %s opened at byte %zu",
                        is_object ? "object" : "array", open_pos);
        const unsigned char c = p->s[p->pos];
        if (c == ',') {
            p->pos++;
            skip_ws(p);
            if (p->pos < p->len && p->s[p->pos] == close) return fail(p, p->pos, "trailing comma");
            continue;
        }
        if (c == close) {
            p->pos++;
            break;
        }
        return fail(p, p->pos, "expected ',' or '%c'", close);
    }
    p->d->nodes[idx].count = count;
    return is_object ? check_unique_keys(p, idx) : 0;
}

static int parse_literal(parser *p, const char *word, json_type type, int *out) {
    const size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n)) return fail(p, p->pos, "invalid literal");
    if (new_node(p, type, out)) return -1;
    p->pos += n;
    return 0;
}

static int parse_value(parser *p, int depth, int *out) {
    skip_ws(p);
    if (p->pos >= p->len) return fail(p, p->pos, "unexpected end of input, expected a value");
    const unsigned char c = p->s[p->pos];
    switch (c) {
    case '{':
    case '[': {
        if (new_node(p, c == '{' ? JSON_OBJECT : JSON_ARRAY, out)) return -1;
        return parse_container(p, depth, *out, c == '{');
    }
    case '"': {
        if (new_node(p, JSON_STRING, out)) return -1;
        size_t off, len;
        if (parse_string(p, &off, &len)) return -1;
        p->d->nodes[*out].str = off;
        p->d->nodes[*out].len = len;
        return 0;
    }
    case 't': return parse_literal(p, "true", JSON_TRUE, out);
    case 'f': return parse_literal(p, "false", JSON_FALSE, out);
    case 'n': return parse_literal(p, "null", JSON_NULL, out);
    default:
        if (c == '-' || is_digit(c)) {
            if (new_node(p, JSON_NUMBER, out)) return -1;
            return parse_number(p, *out);
        }
        if (c >= 0x20 && c < 0x7F) return fail(p, p->pos, "unexpected character '%c', expected a value", c);
        return fail(p, p->pos, "unexpected byte 0x%02x, expected a value", c);
    }
}

int json_parse(const char *text, size_t len, int max_depth, json_doc **out, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!out) return -1;
    *out = NULL;
    parser p = {.s = (const unsigned char *)text, .len = len, .max_depth = max_depth > 0 ? max_depth : 1,
                .err = err, .errlen = errlen};
    if (!text && len) return fail(&p, 0, "no text");
    if (len > MAX_TEXT) return fail(&p, 0, "document of %zu bytes is larger than the %zu-byte limit", len, MAX_TEXT);
    p.d = calloc(1, sizeof(json_doc));
    if (!p.d) return fail(&p, 0, "out of memory");
    int root;
    if (parse_value(&p, 0, &root)) goto bad;
    skip_ws(&p);
    if (p.pos != p.len) {
        fail(&p, p.pos, "unexpected data after the JSON value");
        goto bad;
    }
    *out = p.d;
    return 0;
bad:
    json_free(p.d);
    return -1;
}

void json_free(json_doc *doc) {
    if (!doc) return;
    free(doc->nodes);
    free(doc->pool);
    free(doc);
}

static const node *get(const json_doc *d, int i) {
    return d && i >= 0 && (size_t)i < d->n_nodes ? &d->nodes[i] : NULL;
}

json_type json_kind(const json_doc *d, int node_i) {
    const node *n = get(d, node_i);
    return n ? (json_type)n->type : JSON_NULL;
}
size_t json_len(const json_doc *d, int node_i) {
    const node *n = get(d, node_i);
    return n ? n->count : 0;
}
int json_first(const json_doc *d, int node_i) {
    const node *n = get(d, node_i);
    return n ? n->first : JSON_NONE;
}
int json_next(const json_doc *d, int node_i) {
    const node *n = get(d, node_i);
    return n ? n->next : JSON_NONE;
}
const char *json_key(const json_doc *d, int node_i) {
    const node *n = get(d, node_i);
    return n && n->key != NO_KEY ? d->pool + n->key : NULL;
}
int json_get(const json_doc *d, int obj, const char *key) {
    const node *o = get(d, obj);
    if (!o || o->type != JSON_OBJECT || !key) return JSON_NONE;
    for (int c = o->first; c != JSON_NONE; c = d->nodes[c].next)
        if (!strcmp(d->pool + d->nodes[c].key, key)) return c;
    return JSON_NONE;
}
const char *json_str(const json_doc *d, int node_i, size_t *len) {
    const node *n = get(d, node_i);
    if (!n || n->type != JSON_STRING) return NULL;
    if (len) *len = n->len;
    return d->pool + n->str;
}
int json_int64(const json_doc *d, int node_i, int64_t *v) {
    const node *n = get(d, node_i);
    if (!n || n->type != JSON_NUMBER || !n->is_int) return 0;
    if (v) *v = n->i;
    return 1;
}
int json_double(const json_doc *d, int node_i, double *v) {
    const node *n = get(d, node_i);
    if (!n || n->type != JSON_NUMBER) return 0;
    if (v) *v = n->d;
    return 1;
}

void json_put(json_out *o, const char *fmt, ...) {
    const size_t room = o->n < o->cap ? o->cap - o->n : 0;
    va_list ap;
    va_start(ap, fmt);
    const int w = vsnprintf(room ? o->buf + o->n : NULL, room, fmt, ap);
    va_end(ap);
    if (w > 0) o->n += (size_t)w;
}

void json_put_string(json_out *o, const char *s) {
    if (!s) {
        json_put(o, "null");
        return;
    }
    json_put(o, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') json_put(o, "\\%c", *p);
        else if (*p < 0x20) json_put(o, "\\u%04x", *p);
        else json_put(o, "%c", *p);
    }
    json_put(o, "\"");
}
