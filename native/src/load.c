/* One loader (see load.h): the tensor table walked over a container with every check, and the resident storage
 * policy (emoe_container_load_model: tensors borrowed from the container's mapping). */
#include "load.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

typedef struct {
    const emoe_container *c;
    load_item *items;
    size_t n, cap;
    char *err;
    size_t errlen;
    int status;
} plan_ctx;

static int plan_fail(plan_ctx *p, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int plan_fail(plan_ctx *p, int status, const char *fmt, ...) {
    if (p->err && p->errlen) {
        int n = snprintf(p->err, p->errlen, "%s: ", emoe_container_path(p->c));
        if (n < 0 || (size_t)n >= p->errlen) n = 0;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    p->status = status;
    return 1;
}

/* The checks of one tensor against its table item. */
static int plan_item(void *ctx, const tt_item *it) {
    plan_ctx *p = ctx;
    const emoe_tensor_info *t = emoe_container_find(p->c, it->name);
    if (!t) {
        if (!it->required) return 0;
        return plan_fail(p, EMOE_ERR_NOT_READY, "missing tensor '%s' (the model needs it: [%lld, %lld]%s)", it->name,
                         (long long)it->rows, (long long)it->cols,
                         tt_table[it->entry].need == TN_UNLESS_TIED ? ", tie_embeddings is off" : "");
    }
    const int expert = tt_table[it->entry].scope == TT_EXPERT;
    if (t->kind == EMOE_KIND_BLOB)
        return plan_fail(p, EMOE_ERR_ARG, "tensor '%s' is stored as a byte string, expected weights", t->name);
    if (t->dtype != EMOE_F32 && t->dtype != EMOE_F16 && t->dtype != EMOE_Q8_0 && !(expert && t->dtype == EMOE_MWQ))
        return plan_fail(p, EMOE_ERR_ARG, "tensor '%s' is stored as %s, which the C core cannot run for it%s", t->name,
                         t->dtype_name, t->dtype == EMOE_MWQ ? " (MWQ bit planes are for expert matrices only)" : "");
    const int shape_ok = it->one_d ? t->ndim == 1 && t->shape[0] == it->cols
                                   : t->ndim == 2 && t->shape[0] == it->rows && t->shape[1] == it->cols;
    if (!shape_ok) {
        char got[96] = "[";
        for (int d = 0; d < t->ndim && d < EMOE_MAX_DIMS; d++) {
            const size_t l = strlen(got);
            snprintf(got + l, sizeof got - l, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        }
        strncat(got, "]", sizeof got - strlen(got) - 1);
        if (it->one_d)
            return plan_fail(p, EMOE_ERR_ARG, "tensor '%s' has shape %s, expected [%lld]", t->name, got,
                             (long long)it->cols);
        return plan_fail(p, EMOE_ERR_ARG, "tensor '%s' has shape %s, expected [%lld, %lld]", t->name, got,
                         (long long)it->rows, (long long)it->cols);
    }
    if (t->dtype == EMOE_Q8_0 && it->cols % 32)
        return plan_fail(p, EMOE_ERR_ARG, "tensor '%s': q8_0 needs a multiple of 32 columns, it has %lld", t->name,
                         (long long)it->cols);
    if (t->dtype == EMOE_MWQ) {
        const int b = t->mwq_base_bits, g = t->mwq_group_size;
        if (t->n_planes < 1 || t->n_planes > EMOE_MWQ_MAX_PLANES || (b != 2 && b != 4 && b != 8) || g <= 0 || g % 8 ||
            it->cols % g)
            return plan_fail(p, EMOE_ERR_ARG, "tensor '%s': MWQ with %d planes, base_bits %d, group %d: expected 1..%d "
                             "planes, base_bits 2/4/8 and a group that is a multiple of 8 dividing %lld", t->name,
                             t->n_planes, b, g, EMOE_MWQ_MAX_PLANES, (long long)it->cols);
        for (int q = 0; q < t->n_planes; q++) {
            const int64_t want = emoe_mwq_plane_bytes(q + 1, b, g, it->rows, it->cols);
            if ((int64_t)t->planes[q].nbytes != want || t->planes[q].offset < t->offset ||
                t->planes[q].offset + t->planes[q].nbytes > t->offset + t->nbytes)
                return plan_fail(p, EMOE_ERR_ARG, "tensor '%s': MWQ plane %d has %llu bytes at offset %llu, expected "
                                 "%lld bytes inside the tensor's span", t->name, q + 1,
                                 (unsigned long long)t->planes[q].nbytes, (unsigned long long)t->planes[q].offset,
                                 (long long)want);
        }
    } else {
        const uint64_t want = (uint64_t)emoe_row_bytes(t->dtype, it->cols) * (uint64_t)it->rows;
        if (t->nbytes != want)
            return plan_fail(p, EMOE_ERR_ARG, "tensor '%s': %llu bytes stored, expected %llu for %s [%lld, %lld]",
                             t->name, (unsigned long long)t->nbytes, (unsigned long long)want, t->dtype_name,
                             (long long)it->rows, (long long)it->cols);
    }
    if (p->n == p->cap) {
        const size_t cap = p->cap ? 2 * p->cap : 64;
        load_item *grown = realloc(p->items, cap * sizeof(load_item));
        if (!grown) return plan_fail(p, EMOE_ERR_NOMEM, "out of memory");
        p->items = grown, p->cap = cap;
    }
    p->items[p->n++] = (load_item){.it = *it, .t = t};
    return 0;
}

int load_plan(const emoe_container *c, const emoe_model *m, load_item **items, size_t *n, char *err, size_t errlen) {
    plan_ctx p = {.c = c, .err = err, .errlen = errlen};
    tt_walk(m, plan_item, &p);
    if (p.status) {
        free(p.items);
        *items = NULL, *n = 0;
        return p.status;
    }
    *items = p.items, *n = p.n;
    return EMOE_OK;
}

/* ---- the resident policy ---- */

#define RFAIL(...)                                                                                                    \
    do {                                                                                                              \
        if (err) snprintf(err, errlen, __VA_ARGS__);                                                                  \
        goto fail;                                                                                                    \
    } while (0)

emoe_model *emoe_container_load_model(emoe_container *c, int max_ctx, int kv_f16, int n_threads, char *err,
                                      size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!c) {
        if (err) snprintf(err, errlen, "emoe_container_load_model: container is NULL");
        return NULL;
    }
    const char *path = emoe_container_path(c);
    load_item *items = NULL;
    size_t n = 0;
    emoe_model *m = emoe_model_new(emoe_container_config(c), max_ctx, kv_f16, n_threads);
    if (!m) {
        if (err) snprintf(err, errlen, "%s: out of memory creating the model (max_ctx = %d, %d threads)", path,
                          max_ctx, n_threads);
        return NULL;
    }
    if (emoe_model_status(m)) RFAIL("%s: %s", path, emoe_model_last_error(m));
    if (load_plan(c, m, &items, &n, err, errlen)) goto fail;
    for (size_t i = 0; i < n; i++) {
        const emoe_tensor_info *t = items[i].t;
        const tt_item *it = &items[i].it;
        const char *data = emoe_container_data(c, t);
        int st;
        if (t->dtype == EMOE_MWQ) {
            int64_t off[EMOE_MWQ_MAX_PLANES];
            int aligned = 1;
            for (int q = 0; q < t->n_planes; q++)
                off[q] = (int64_t)(t->planes[q].offset - t->offset), aligned &= (uintptr_t)(data + off[q]) % 2 == 0;
            if (!aligned) { /* a hand-made file: copy the span to aligned memory */
                char *cp = model_own(m, (size_t)t->nbytes + 1);
                if (!cp) goto nomem;
                memcpy(cp + (t->offset % 2), data, (size_t)t->nbytes); /* keeps every plane's parity: now even */
                data = cp + (t->offset % 2);
            }
            st = emoe_model_set_expert_mwq(m, it->name, data, off, t->n_planes, t->mwq_base_bits, t->mwq_group_size,
                                           it->rows, it->cols);
        } else {
            int dtype = t->dtype;
            if (it->one_d && dtype == EMOE_F16) { /* the core reads norms and biases as f32 */
                float *f = model_own(m, (size_t)it->cols * sizeof(float));
                uint16_t *h = malloc((size_t)it->cols * sizeof(uint16_t));
                if (!f || !h) {
                    free(h);
                    goto nomem;
                }
                memcpy(h, data, (size_t)it->cols * sizeof(uint16_t)); /* the mapping may be only 1-aligned here */
                emoe_f16_to_f32(h, f, it->cols);
                free(h);
                data = (const char *)f, dtype = EMOE_F32;
            } else if ((uintptr_t)data % (dtype == EMOE_F32 ? 4 : 2)) { /* f16 and q8_0 (its f16 scale) need 2 */
                char *cp = model_own(m, (size_t)t->nbytes);
                if (!cp) goto nomem;
                memcpy(cp, data, (size_t)t->nbytes);
                data = cp;
            }
            st = emoe_model_set_tensor(m, it->name, dtype, data, it->rows, it->cols);
        }
        if (st) RFAIL("%s: %s", path, emoe_model_last_error(m));
    }
    if (emoe_model_ready(m)) RFAIL("%s: %s", path, emoe_model_last_error(m));
    free(items);
    return m;
nomem:
    if (err) snprintf(err, errlen, "%s: out of memory", path);
fail:
    free(items);
    emoe_model_free(m);
    return NULL;
}
#undef RFAIL
