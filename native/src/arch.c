/* The architecture description: the `arch` JSON object -> emoe_config, every field checked (see arch.h). */
#include "arch.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FAMILY 256      /* bytes of the informational family name */
#define MAX_FLOAT_FIELD 3.0e38 /* a float field's largest value: finite as an f32 */

typedef enum { F_INT, F_FLOAT, F_BOOL, F_ENUM, F_STRING, F_ID, F_LIST, F_MAP } field_kind;

/* Allowed strings of the enum fields (index = the stored value: arch.h's EMOE_* enums) */
static const char *const EMOE_ROPE_KINDS[] = {"neox", "norm", NULL};
static const char *const EMOE_QK_NORMS[] = {"none", "head", "full", NULL};
static const char *const EMOE_ROUTER_FNS[] = {"softmax", "sigmoid", NULL};
static const char *const EMOE_ROUTER_INPUTS[] = {"ffn_norm", "layer_input", "residual_norm", NULL};
static const char *const EMOE_ACTIVATIONS[] = {"swiglu", "reglu", "swiglu_clamp", "geglu_tanh", NULL};
static const char *const EMOE_GROUP_SCORES[] = {"top2_sum", "max", NULL};
static const char *const EMOE_ROPE_SCALINGS[] = {"none", "yarn", NULL};

/* The layer lists, numbered in arch_fields.h order (their storage in emoe_arch.ints follows it). */
enum {
#define ARCH_LIST(name, doc) LIST_##name,
#include "arch_fields.h"
    N_LISTS
};
static const struct layer_list {
    const char *key;
    size_t n_off, ptr_off; /* of n_<name> and <name> in emoe_config */
} LISTS[] = {
#define ARCH_LIST(name, doc) {#name, offsetof(emoe_config, n_##name), offsetof(emoe_config, name)},
#include "arch_fields.h"
};

/* Every key an arch object may hold (arch_fields.h), as the parser reads it. Integers are checked against lo..hi here
 * and against each other in check_relations. */
#define AOFF(f) offsetof(emoe_arch, f)
static const struct field {
    const char *key;
    field_kind kind;
    int required;
    size_t off;              /* into emoe_arch (scalars and ids); F_LIST: the list's number */
    int64_t lo, hi, def;     /* F_INT / F_ID range and default; F_FLOAT: lo = 1 also allows 0 (a derived default) */
    double fdef;             /* F_FLOAT default */
    const char *const *names; /* F_ENUM: allowed strings (index = stored value; absent -> 0) */
    const char *doc;          /* arch_fields.h's doc: the schema's (emoe_arch_schema_json) */
} FIELDS[] = {
#define ARCH_STRING(n, doc) {#n, F_STRING, 1, AOFF(n), 0, 0, 0, 0, NULL, doc},
#define ARCH_INT(n, required, lo, hi, def, doc) {#n, F_INT, required, AOFF(cfg.n), lo, hi, def, 0, NULL, doc},
#define ARCH_FLOAT(n, zero_ok, def, doc) {#n, F_FLOAT, 0, AOFF(cfg.n), zero_ok, 0, 0, def, NULL, doc},
#define ARCH_BOOL(n, def, doc) {#n, F_BOOL, 0, AOFF(cfg.n), 0, 0, def, 0, NULL, doc},
#define ARCH_ENUM(n, names, doc) {#n, F_ENUM, 0, AOFF(cfg.n), 0, 0, 0, 0, names, doc},
#define ARCH_LIST(n, doc) {#n, F_LIST, 0, LIST_##n, 0, 0, 0, 0, NULL, doc},
#define ARCH_MAP(n, doc) {#n, F_MAP, 0, 0, 0, 0, 0, 0, NULL, doc},
#define ARCH_ID(n, lo, hi, def, doc) {#n, F_ID, 0, AOFF(n), lo, hi, def, 0, NULL, doc},
#include "arch_fields.h"
};
#undef AOFF
#define N_FIELDS (sizeof FIELDS / sizeof FIELDS[0])

static int invalid(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int invalid(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        int n = snprintf(err, errlen, "arch: ");
        if (n >= 0 && (size_t)n < errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return EMOE_ERR_INVALID;
}

static const char *kind_name(json_type t) {
    static const char *const names[] = {"null", "false", "true", "a number", "a string", "a list", "an object"};
    return (unsigned)t < 7 ? names[t] : "?";
}

static int32_t *arch_i32(emoe_arch *a, size_t off) { return (int32_t *)((char *)a + off); }
static float *arch_f32(emoe_arch *a, size_t off) { return (float *)((char *)a + off); }
static int64_t *arch_i64(emoe_arch *a, size_t off) { return (int64_t *)((char *)a + off); }

/* An absent optional field takes the table's default (ints, bools and enums default to 0). */
static void set_default(const struct field *f, emoe_arch *a) {
    if (f->kind == F_FLOAT) *arch_f32(a, f->off) = (float)f->fdef;
    else if (f->kind == F_ID) *arch_i64(a, f->off) = f->def;
    else if (f->kind == F_INT || f->kind == F_BOOL || f->kind == F_ENUM) *arch_i32(a, f->off) = (int32_t)f->def;
}

/* One scalar field (present: node != JSON_NONE) into the config / arch. */
static int read_scalar(const json_doc *d, int node, const struct field *f, emoe_arch *a, char *err, size_t errlen) {
    const json_type t = json_kind(d, node);
    switch (f->kind) {
    case F_INT:
    case F_ID: {
        int64_t v;
        if (f->kind == F_ID && t == JSON_NULL && f->lo < 0) v = -1; /* bos/eos: null = none */
        else if (!json_int64(d, node, &v) || v < f->lo || v > f->hi) {
            char got[64];
            double x = 0;
            if (json_int64(d, node, &v)) snprintf(got, sizeof got, "%lld", (long long)v);
            else if (json_double(d, node, &x)) snprintf(got, sizeof got, "%g (not an integer)", x);
            else snprintf(got, sizeof got, "%s", kind_name(t));
            return invalid(err, errlen, "'%s' must be an integer in %lld..%lld%s, got %s", f->key, (long long)f->lo,
                           (long long)f->hi, f->kind == F_ID && f->lo < 0 ? " or null" : "", got);
        }
        if (f->kind == F_INT) *arch_i32(a, f->off) = (int32_t)v;
        else *arch_i64(a, f->off) = v;
        return EMOE_OK;
    }
    case F_FLOAT: {
        double v;
        if (!json_double(d, node, &v))
            return invalid(err, errlen, "'%s' must be a number, got %s", f->key, kind_name(t));
        /* finite (the parser refuses inf/nan literals), positive, and still positive and finite as a float */
        if (f->lo == 1 && v == 0.0) {
            *arch_f32(a, f->off) = 0.0f;
            return EMOE_OK;
        }
        if (!(v > 0.0) || v > MAX_FLOAT_FIELD || (float)v <= 0.0f)
            return invalid(err, errlen, "'%s' = %g must be a positive number%s that fits in a float", f->key, v,
                           f->lo == 1 ? " (or 0: the default)" : "");
        *arch_f32(a, f->off) = (float)v;
        return EMOE_OK;
    }
    case F_BOOL:
        if (t != JSON_TRUE && t != JSON_FALSE)
            return invalid(err, errlen, "'%s' must be true or false, got %s", f->key, kind_name(t));
        *arch_i32(a, f->off) = t == JSON_TRUE;
        return EMOE_OK;
    case F_ENUM: {
        const char *s = json_str(d, node, NULL);
        for (int i = 0; s && f->names[i]; i++)
            if (!strcmp(s, f->names[i])) {
                *arch_i32(a, f->off) = i;
                return EMOE_OK;
            }
        char allowed[160] = "";
        for (int i = 0; f->names[i]; i++) {
            const size_t used = strlen(allowed);
            snprintf(allowed + used, sizeof allowed - used, "%s'%s'", i ? ", " : "", f->names[i]);
        }
        if (!s) return invalid(err, errlen, "'%s' must be one of %s, got %s", f->key, allowed, kind_name(t));
        return invalid(err, errlen, "'%s' = '%.40s' is not one of %s", f->key, s, allowed);
    }
    case F_STRING: {
        size_t n;
        const char *s = json_str(d, node, &n);
        if (!s || n > MAX_FAMILY)
            return invalid(err, errlen, "'%s' must be a string of at most %d bytes, got %s", f->key, MAX_FAMILY,
                           s ? "a longer one" : kind_name(t));
        char **dst = (char **)((char *)a + f->off);
        *dst = malloc(n + 1);
        if (!*dst) return EMOE_ERR_NOMEM;
        memcpy(*dst, s, n + 1);
        return EMOE_OK;
    }
    default: return EMOE_OK; /* lists: read_lists */
    }
}

/* A list of layer numbers: integers in 0..n_layers-1, each at most once. Written to dst (n_layers entries at most). */
static int read_layer_list(const json_doc *d, int node, const char *key, int32_t n_layers, int32_t *dst, int32_t *n,
                           char *err, size_t errlen) {
    *n = 0;
    if (node == JSON_NONE) return EMOE_OK;
    if (json_kind(d, node) != JSON_ARRAY)
        return invalid(err, errlen, "'%s' must be a list of layer numbers, got %s", key, kind_name(json_kind(d, node)));
    for (int e = json_first(d, node); e != JSON_NONE; e = json_next(d, e)) {
        int64_t v;
        if (!json_int64(d, e, &v) || v < 0 || v >= n_layers)
            return invalid(err, errlen, "'%s' must hold layer numbers in 0..%d (n_layers = %d)", key, n_layers - 1,
                           n_layers);
        for (int32_t i = 0; i < *n; i++)
            if (dst[i] == v) return invalid(err, errlen, "'%s' names layer %d twice", key, (int)v);
        dst[(*n)++] = (int32_t)v; /* at most n_layers distinct values fit */
    }
    return EMOE_OK;
}

static int in_list(const int32_t *list, int32_t n, int32_t v) {
    for (int32_t i = 0; i < n; i++)
        if (list[i] == v) return 1;
    return 0;
}

/* expert_map: a list of at most n_layers rows; row l empty (identity) or n_experts entries in -1..n_experts-1, with
 * at least top_k experts kept; dense layers' rows empty. dst: n_layers * n_experts entries. *used = 0 if all rows are
 * empty (no map). */
static int read_expert_map(const json_doc *d, int node, const emoe_config *c, int32_t *dst, unsigned char *seen,
                           int *used, char *err, size_t errlen) {
    *used = 0;
    if (node == JSON_NONE) return EMOE_OK;
    if (json_kind(d, node) != JSON_ARRAY)
        return invalid(err, errlen, "'expert_map' must be a list (one list per layer), got %s",
                       kind_name(json_kind(d, node)));
    if (json_len(d, node) > (size_t)c->n_layers)
        return invalid(err, errlen, "'expert_map' has %zu rows, more than n_layers = %d", json_len(d, node),
                       c->n_layers);
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int32_t e = 0; e < c->n_experts; e++) dst[(size_t)l * (size_t)c->n_experts + (size_t)e] = e;
    int32_t l = 0;
    for (int row = json_first(d, node); row != JSON_NONE; row = json_next(d, row), l++) {
        if (json_kind(d, row) != JSON_ARRAY)
            return invalid(err, errlen, "expert_map[%d] must be a list, got %s", l, kind_name(json_kind(d, row)));
        const size_t n = json_len(d, row);
        if (!n) continue;
        if (n != (size_t)c->n_experts)
            return invalid(err, errlen, "expert_map[%d] has %zu entries, expected 0 or n_experts = %d", l, n,
                           c->n_experts);
        if (in_list(c->dense_layers, c->n_dense_layers, l))
            return invalid(err, errlen, "expert_map[%d] must be empty: layer %d is a dense layer", l, l);
        int32_t e = 0, live = 0;
        for (int v = json_first(d, row); v != JSON_NONE; v = json_next(d, v), e++) {
            int64_t g;
            if (!json_int64(d, v, &g) || g < -1 || g >= c->n_experts)
                return invalid(err, errlen, "expert_map[%d][%d] must be an integer in -1..%d", l, e, c->n_experts - 1);
            dst[(size_t)l * (size_t)c->n_experts + (size_t)e] = (int32_t)g;
            live += g >= 0;
        }
        if (live < c->top_k)
            return invalid(err, errlen, "expert_map[%d] keeps %d experts, fewer than top_k = %d", l, live, c->top_k);
        /* stored experts are numbered 0..G-1 without gaps: every group below the largest is used (seen[] is
         * n_experts bytes, allocated once by the caller) */
        const int32_t *row_v = dst + (size_t)l * (size_t)c->n_experts;
        int32_t top = -1;
        memset(seen, 0, (size_t)c->n_experts);
        for (int32_t i = 0; i < c->n_experts; i++) {
            if (row_v[i] >= 0) seen[row_v[i]] = 1;
            top = row_v[i] > top ? row_v[i] : top;
        }
        for (int32_t g = 0; g < top; g++)
            if (!seen[g])
                return invalid(err, errlen, "expert_map[%d] uses stored expert %d but not %d (numbers must have no "
                               "gaps)", l, top, g);
        *used = 1;
    }
    if (*used && c->n_group > 1) /* merging would change which experts fill a group */
        return invalid(err, errlen, "'expert_map' with n_group = %d: merged experts with group-limited routing are "
                       "not supported (merge a model with n_group = 1)", c->n_group);
    return EMOE_OK;
}

static int check_groups(const emoe_config *c, char *err, size_t errlen);
static int check_mla(const emoe_config *c, char *err, size_t errlen);

/* Rules that tie fields together (ArchSpec.__post_init__ and what the forward pass needs). */
static int check_relations(const emoe_config *c, char *err, size_t errlen) {
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads)
        return invalid(err, errlen, "n_heads = %d is not a multiple of n_kv_heads = %d", c->n_heads, c->n_kv_heads);
    if (c->top_k > c->n_experts)
        return invalid(err, errlen, "top_k = %d must be in 1..n_experts = %d", c->top_k, c->n_experts);
    if (c->rope_dim > c->head_dim || c->rope_dim % 2)
        return invalid(err, errlen, "rope_dim = %d must be even and at most head_dim = %d (0 = head_dim)",
                       c->rope_dim, c->head_dim);
    if (c->n_dense_layers < c->n_layers && c->expert_ffn < 1)
        return invalid(err, errlen, "expert_ffn = %d: MoE layers need expert_ffn >= 1", c->expert_ffn);
    if (c->n_dense_layers && c->dense_ffn < 1)
        return invalid(err, errlen, "dense_layers given but dense_ffn = %d (expected >= 1)", c->dense_ffn);
    if (c->shared_gate && !c->shared_ffn) return invalid(err, errlen, "shared_gate is true but shared_ffn = 0");
    if (c->rope_scaling == EMOE_ROPE_SCALING_YARN && !(c->yarn_beta_fast > c->yarn_beta_slow))
        return invalid(err, errlen, "yarn_beta_fast = %g must be greater than yarn_beta_slow = %g",
                       (double)c->yarn_beta_fast, (double)c->yarn_beta_slow);
    if (c->n_swa_layers && !c->sliding_window)
        return invalid(err, errlen, "swa_layers given but sliding_window = 0 (expected >= 1)");
    if (c->n_linear_attn_layers &&
        (c->linear_k_heads < 1 || c->linear_v_heads < 1 || c->linear_k_dim < 1 || c->linear_v_dim < 1 ||
         c->linear_conv < 1 || c->linear_v_heads % c->linear_k_heads))
        return invalid(err, errlen, "linear_attn_layers given: linear_k_heads, linear_v_heads (a multiple of "
                       "linear_k_heads), linear_k_dim, linear_v_dim and linear_conv must be >= 1 (got %d, %d, %d, %d, "
                       "%d)", c->linear_k_heads, c->linear_v_heads, c->linear_k_dim, c->linear_v_dim, c->linear_conv);
    if (c->global_kv_heads && c->n_heads % c->global_kv_heads)
        return invalid(err, errlen, "n_heads = %d is not a multiple of global_kv_heads = %d", c->n_heads,
                       c->global_kv_heads);
    const int32_t ghd = c->global_head_dim ? c->global_head_dim : c->head_dim;
    if (2 * c->global_rope_angles > ghd)
        return invalid(err, errlen, "global_rope_angles = %d exceeds half the global head size %d",
                       c->global_rope_angles, ghd);
    if (ghd != c->head_dim && !c->global_rope_angles)
        return invalid(err, errlen, "global_head_dim = %d differs from head_dim = %d: give global_rope_angles (its "
                       "RoPE)", ghd, c->head_dim);
    if (c->global_head_dim % 2) return invalid(err, errlen, "global_head_dim = %d must be even", ghd);
    if (c->dense_beside_moe && c->dense_ffn < 1)
        return invalid(err, errlen, "dense_beside_moe is true but dense_ffn = %d (expected >= 1)", c->dense_ffn);
    if (c->n_conv_layers && c->conv_kernel < 1)
        return invalid(err, errlen, "conv_layers given but conv_kernel = %d (expected >= 1)", c->conv_kernel);
    const int st = check_mla(c, err, errlen);
    return st ? st : check_groups(c, err, errlen);
}

/* MLA: the q/k head is qk_nope_dim + rope_dim (RoPE on its last rope_dim dims: rope_dim given, not the default), every
 * head has its own expanded key and value (n_kv_heads = n_heads), and the plain-attention options it has no tensors
 * for are off. */
static int check_mla(const emoe_config *c, char *err, size_t errlen) {
    if (c->q_lora_rank && !c->kv_lora_rank)
        return invalid(err, errlen, "q_lora_rank = %d needs Multi-head Latent Attention (kv_lora_rank > 0)",
                       c->q_lora_rank);
    if (!c->kv_lora_rank) return EMOE_OK;
    const int32_t rope = c->rope_dim ? c->rope_dim : c->head_dim;
    if (c->qk_nope_dim + rope != c->head_dim || c->v_head_dim < 1)
        return invalid(err, errlen, "MLA needs head_dim = %d == qk_nope_dim = %d + rope_dim = %d and v_head_dim >= 1 "
                       "(got %d)", c->head_dim, c->qk_nope_dim, rope, c->v_head_dim);
    if (c->n_kv_heads != c->n_heads)
        return invalid(err, errlen, "MLA expands its latent for every head: n_kv_heads = %d must equal n_heads = %d",
                       c->n_kv_heads, c->n_heads);
    if (c->qkv_bias || c->qk_norm || c->attn_sinks || c->sliding_window)
        return invalid(err, errlen, "MLA (kv_lora_rank = %d) has no qkv_bias, qk_norm, attn_sinks or sliding_window",
                       c->kv_lora_rank);
    return EMOE_OK;
}

/* Group-limited routing: n_group equal groups (at least 2 experts each for the top-2 score), topk_group of them kept,
 * and enough experts in the kept groups for top_k. */
static int check_groups(const emoe_config *c, char *err, size_t errlen) {
    if (c->topk_group > c->n_group)
        return invalid(err, errlen, "topk_group = %d must be in 1..n_group = %d", c->topk_group, c->n_group);
    if (c->n_group == 1) return EMOE_OK;
    const int32_t per = c->n_experts / c->n_group;
    if (c->n_experts % c->n_group || (c->group_score == EMOE_GROUP_TOP2_SUM && per < 2))
        return invalid(err, errlen, "n_group = %d must divide n_experts = %d into groups of at least %d experts",
                       c->n_group, c->n_experts, c->group_score == EMOE_GROUP_TOP2_SUM ? 2 : 1);
    if (c->top_k > c->topk_group * per)
        return invalid(err, errlen, "top_k = %d exceeds the %d experts of topk_group = %d groups", c->top_k,
                       c->topk_group * per, c->topk_group);
    return EMOE_OK;
}

int emoe_arch_read(const json_doc *d, int obj, emoe_arch *a, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    memset(a, 0, sizeof(*a));
    if (json_kind(d, obj) != JSON_OBJECT)
        return invalid(err, errlen, "the architecture description must be an object, got %s",
                       kind_name(json_kind(d, obj)));
    /* unknown keys first: a newer writer's option must not be ignored */
    for (int m = json_first(d, obj); m != JSON_NONE; m = json_next(d, m)) {
        const char *key = json_key(d, m);
        size_t i = 0;
        while (i < N_FIELDS && strcmp(FIELDS[i].key, key)) i++;
        if (i == N_FIELDS)
            return invalid(err, errlen, "unknown field '%.60s' (written by a newer edgemoe? upgrade edgemoe, or "
                           "re-export the model with this version)", key);
    }
    emoe_config *c = &a->cfg;
    int lists[N_LISTS], map = JSON_NONE;
    for (int i = 0; i < N_LISTS; i++) lists[i] = JSON_NONE;
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct field *f = &FIELDS[i];
        const int node = json_get(d, obj, f->key);
        if (node == JSON_NONE) {
            if (f->required) return invalid(err, errlen, "required field '%s' is missing", f->key);
            set_default(f, a);
            continue;
        }
        if (f->kind == F_LIST) lists[f->off] = node;
        else if (f->kind == F_MAP) map = node;
        else {
            const int st = read_scalar(d, node, f, a, err, errlen);
            if (st) return st;
        }
    }
    /* storage: the lists, of at most n_layers each, and the expert map (bounded: n_layers * n_experts <= 2^26 only
     * matters when a map is given) */
    const int with_map = map != JSON_NONE && json_len(d, map) > 0;
    const size_t cells = (size_t)c->n_layers * (size_t)c->n_experts;
    if (with_map && cells > EMOE_MAX_LAYER_EXPERTS)
        return invalid(err, errlen, "'expert_map' with n_layers = %d and n_experts = %d is too large (at most %d "
                       "entries)", c->n_layers, c->n_experts, EMOE_MAX_LAYER_EXPERTS);
    a->ints = malloc((N_LISTS * (size_t)c->n_layers + (with_map ? cells : 0)) * sizeof(int32_t));
    if (!a->ints) return EMOE_ERR_NOMEM;
    for (int i = 0; i < N_LISTS; i++) {
        int32_t *dst = a->ints + (size_t)i * (size_t)c->n_layers;
        int32_t *n = (int32_t *)((char *)c + LISTS[i].n_off);
        const int st = read_layer_list(d, lists[i], LISTS[i].key, c->n_layers, dst, n, err, errlen);
        if (st) return st;
        *(const int32_t **)((char *)c + LISTS[i].ptr_off) = *n ? dst : NULL;
    }
    int st = check_relations(c, err, errlen);
    if (st) return st;
    if (with_map) {
        int32_t *dst = a->ints + N_LISTS * (size_t)c->n_layers;
        int used;
        unsigned char *seen = malloc((size_t)c->n_experts);
        if (!seen) return EMOE_ERR_NOMEM;
        st = read_expert_map(d, map, c, dst, seen, &used, err, errlen);
        free(seen);
        if (st) return st;
        c->expert_map = used ? dst : NULL;
    } else if (map != JSON_NONE && json_kind(d, map) != JSON_ARRAY)
        return invalid(err, errlen, "'expert_map' must be a list (one list per layer), got %s",
                       kind_name(json_kind(d, map)));
    if (c->rope_dim == 0) c->rope_dim = c->head_dim; /* ArchSpec.__post_init__ */
    if (c->rope_dim % 2)
        return invalid(err, errlen, "rope_dim = head_dim = %d must be even (give an even rope_dim)", c->rope_dim);
    return EMOE_OK;
}

int emoe_arch_parse(const char *json, size_t len, emoe_arch *a, char *err, size_t errlen) {
    memset(a, 0, sizeof(*a));
    json_doc *d = NULL;
    char jerr[200];
    if (json_parse(json, len, JSON_DEFAULT_MAX_DEPTH, &d, jerr, sizeof jerr))
        return invalid(err, errlen, "not valid JSON: %s", jerr);
    const int st = emoe_arch_read(d, 0, a, err, errlen);
    json_free(d);
    return st;
}

void emoe_arch_free(emoe_arch *a) {
    if (!a) return;
    free(a->family);
    free(a->ints);
    memset(a, 0, sizeof(*a));
}

int emoe_arch_layer_kind(const emoe_config *c, int layer) {
    if (in_list(c->linear_attn_layers, c->n_linear_attn_layers, layer)) return EMOE_LAYER_LINEAR;
    return in_list(c->conv_layers, c->n_conv_layers, layer) ? EMOE_LAYER_CONV : EMOE_LAYER_ATTENTION;
}

int emoe_arch_is_attention_layer(const emoe_config *c, int layer) {
    return emoe_arch_layer_kind(c, layer) == EMOE_LAYER_ATTENTION;
}

int emoe_arch_is_global_layer(const emoe_config *c, int layer) {
    return !(c->sliding_window > 0 && in_list(c->swa_layers, c->n_swa_layers, layer));
}

int64_t emoe_arch_kv_dim(const emoe_config *c) {
    int64_t kv = (int64_t)c->n_kv_heads * c->head_dim;
    if (c->global_head_dim || c->global_kv_heads) {
        const int64_t g = (int64_t)(c->global_kv_heads ? c->global_kv_heads : c->n_kv_heads) *
                          (c->global_head_dim ? c->global_head_dim : c->head_dim);
        for (int l = 0; l < c->n_layers; l++)
            if (emoe_arch_is_global_layer(c, l) && g > kv) kv = g;
    }
    return kv;
}

/* ---- the schema (emoe_arch_schema_json) ---- */

/* One field: name, kind, Python type, required, default, range / allowed names, doc. */
static void put_field(json_out *o, const struct field *f) {
    static const char *const kinds[] = {"int", "float", "bool", "enum", "string", "id", "list", "map"};
    static const char *const types[] = {"int", "float", "bool", "str", "str", "int", "list[int]", "list[list[int]]"};
    const int nullable = f->kind == F_ID && f->lo < 0; /* -1 = null */
    json_put(o, "{\"name\": ");
    json_put_string(o, f->key);
    json_put(o, ", \"kind\": \"%s\", \"type\": \"%s%s\", \"required\": %s, \"default\": ", kinds[f->kind],
             types[f->kind], nullable ? " | None" : "", f->required ? "true" : "false");
    if (f->required) json_put(o, "null");
    else if (f->kind == F_FLOAT) json_put(o, "%.17g", f->fdef);
    else if (f->kind == F_BOOL) json_put(o, "%s", f->def ? "true" : "false");
    else if (f->kind == F_ENUM) json_put_string(o, f->names[f->def]);
    else if (f->kind == F_LIST || f->kind == F_MAP) json_put(o, "[]");
    else if (nullable && f->def == -1) json_put(o, "null");
    else json_put(o, "%lld", (long long)f->def);
    if (f->kind == F_INT || f->kind == F_ID)
        json_put(o, ", \"lo\": %lld, \"hi\": %lld", (long long)f->lo, (long long)f->hi);
    if (f->kind == F_FLOAT) /* 0 < value <= hi (or 0 when zero_ok) */
        json_put(o, ", \"lo\": 0, \"hi\": %.17g, \"zero_ok\": %s", MAX_FLOAT_FIELD, f->lo ? "true" : "false");
    if (f->kind == F_STRING) json_put(o, ", \"max_bytes\": %d", MAX_FAMILY);
    if (f->kind == F_ENUM) {
        json_put(o, ", \"names\": [");
        for (int i = 0; f->names[i]; i++) {
            if (i) json_put(o, ", ");
            json_put_string(o, f->names[i]);
        }
        json_put(o, "]");
    }
    json_put(o, ", \"doc\": ");
    json_put_string(o, f->doc);
    json_put(o, "}");
}

size_t emoe_arch_schema_json(char *buf, size_t len) {
    json_out o = {buf, buf ? len : 0, 0};
    if (o.cap) buf[0] = '\0';
    json_put(&o, "[");
    for (size_t i = 0; i < N_FIELDS; i++) {
        if (i) json_put(&o, ",\n ");
        put_field(&o, &FIELDS[i]);
    }
    json_put(&o, "]");
    return o.n;
}

/* ---- public entry points (edgemoe.h) ---- */

int emoe_arch_check(const char *arch_json, size_t len, char *err, size_t errlen) {
    emoe_arch a;
    const int st = emoe_arch_parse(arch_json, len, &a, err, errlen);
    emoe_arch_free(&a);
    if (st == EMOE_ERR_NOMEM && err && errlen) snprintf(err, errlen, "arch: out of memory");
    return st;
}

emoe_model *emoe_model_new_json(const char *arch_json, size_t len, int max_ctx, int kv_f16, int n_threads, int *status,
                                char *err, size_t errlen) {
    int dummy;
    if (!status) status = &dummy;
    emoe_arch a;
    int st = emoe_arch_parse(arch_json, len, &a, err, errlen);
    emoe_model *m = NULL;
    if (st == EMOE_OK) {
        m = emoe_model_new(&a.cfg, max_ctx, kv_f16, n_threads);
        if (!m) {
            st = EMOE_ERR_NOMEM;
            if (err && errlen)
                snprintf(err, errlen, "out of memory creating the model (max_ctx = %d, %d threads; the KV cache takes "
                         "2 * attention layers * max_ctx * kv_dim values: lower max_ctx or use an f16 KV "
                         "cache)", max_ctx, n_threads);
        } else if ((st = emoe_model_status(m))) {
            if (err && errlen) snprintf(err, errlen, "%s", emoe_model_last_error(m));
            emoe_model_free(m);
            m = NULL;
        }
    } else if (st == EMOE_ERR_NOMEM && err && errlen)
        snprintf(err, errlen, "arch: out of memory");
    emoe_arch_free(&a);
    *status = st;
    return m;
}
