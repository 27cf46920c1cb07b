/* A small, strict JSON parser (RFC 8259) for the container index. Private to the C core.
 *
 * The whole document is parsed into one flat array of nodes (json_doc); values are addressed by node index, children
 * are linked first-child / next-sibling, strings are decoded (escapes resolved, NUL-terminated) into one byte pool.
 * Strict: no comments, no trailing commas, no leading zeros or '+', no control characters or invalid UTF-8 inside
 * strings, no lone surrogates, no \u0000 (NUL) in strings or keys, no key twice in one object, nothing but whitespace
 * after the value, nesting at most max_depth deep (the recursion is bounded by it). The parser
 * never reads outside [text, text + len) (text need not be NUL-terminated) and keeps no global state.
 *
 * json_out writes JSON text (the exported tables: emoe_arch_schema_json, emoe_tensor_table_json).
 *
 * Numbers: an integer literal (no fraction, no exponent) must fit in int64 and is kept exactly (json_int64); every
 * number also has a finite double value (strtod, made locale-independent); anything else is refused.
 */
#ifndef EDGEMOE_JSON_H
#define EDGEMOE_JSON_H
#include <stddef.h>
#include <stdint.h>

/* Private to the library: not exported from the shared object (a host process may have its own json_parse). */
#if defined(__GNUC__) || defined(__clang__)
#define JSON_API __attribute__((visibility("hidden")))
#else
#define JSON_API
#endif

typedef enum { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json_doc json_doc;

#define JSON_NONE (-1) /* "no node": a missing key, the end of a child list */
#define JSON_DEFAULT_MAX_DEPTH 64

/* Parse text[0..len). On success returns 0 and *out (free with json_free); the root is node 0. On failure returns -1,
 * *out = NULL and err receives "byte N: what was expected" (N is the 0-based byte offset of the problem). */
JSON_API int json_parse(const char *text, size_t len, int max_depth, json_doc **out, char *err, size_t errlen);
JSON_API void json_free(json_doc *doc);

JSON_API json_type json_kind(const json_doc *d, int node);
/* Number of elements of an array or members of an object (0 for scalars). */
JSON_API size_t json_len(const json_doc *d, int node);
/* First element/member of an array/object, and the next sibling of a node (JSON_NONE at the end). */
JSON_API int json_first(const json_doc *d, int node);
JSON_API int json_next(const json_doc *d, int node);
/* Member key of a node that is an object member (NULL otherwise). */
JSON_API const char *json_key(const json_doc *d, int node);
/* Value of `key` in object `obj` (keys are unique), or JSON_NONE. */
JSON_API int json_get(const json_doc *d, int obj, const char *key);

/* Decoded string (NUL-terminated, no NUL inside; *len, if given, receives its length). NULL if not a string. */
JSON_API const char *json_str(const json_doc *d, int node, size_t *len);
/* 1 if node is a number written as an integer that fits in int64 (stored in *v), else 0. */
JSON_API int json_int64(const json_doc *d, int node, int64_t *v);
/* 1 if node is a number (its double value in *v), else 0. */
JSON_API int json_double(const json_doc *d, int node, double *v);

/* Writing: text appended to buf[0..cap), always NUL-terminated when cap > 0, and counted past the end too
 * (snprintf's contract: n is the length the whole text needs). For the tables the core exports as JSON. */
typedef struct {
    char *buf;
    size_t cap, n;
} json_out;

JSON_API void json_put(json_out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s as a JSON string literal (quotes, \" and \\ escaped, control characters as \u00XX), or null if s is NULL. */
JSON_API void json_put_string(json_out *o, const char *s);

#endif
