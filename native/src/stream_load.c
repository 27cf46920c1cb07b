/* The streaming engine's loader: the budget plan (dense + KV cache + scratch + expert cache) and the load under it
 * (dense weights read into anonymous memory, expert pieces given to the expert cache). The tensors come from the one
 * table walk of load.c; this file is the storage policy "under a budget". Forward hooks: stream_forward.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "edgemoe_container.h"
#include "load.h"
#include "stream.h"

static void fmt_mb(char *out, size_t n, int64_t b) { snprintf(out, n, "%.1f MiB", (double)b / 1048576.0); }

/* pread all of [off, off + n) into dst. 0 or -errno; a short read is -EIO. */
static int read_all(int fd, void *dst, uint64_t n, uint64_t off) {
    char *p = dst;
    while (n) {
        const ssize_t r = pread(fd, p, n > (1u << 30) ? (1u << 30) : (size_t)n, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -errno;
        if (r == 0) return -EIO;
        p += r, off += (uint64_t)r, n -= (uint64_t)r;
    }
    return 0;
}

static int check_options(const emoe_stream_options *o, char *err, size_t errlen) {
#define OPT(cond, ...)                                                                                                \
    do {                                                                                                              \
        if (!(cond)) {                                                                                                \
            if (err) snprintf(err, errlen, __VA_ARGS__);                                                              \
            return EMOE_ERR_ARG;                                                                                      \
        }                                                                                                             \
    } while (0)
    OPT(o->mode >= EMOE_MODE_EXACT && o->mode <= EMOE_MODE_ONDEMAND,
        "mode %d: expected 0 (exact), 1 (adaptive) or 2 (ondemand)", o->mode);
    OPT(o->prefetch >= 0 && o->prefetch <= 2, "prefetch %d: expected 0, 1 or 2", o->prefetch);
    OPT(o->prefetch_extra >= 0, "prefetch_extra %d: expected >= 0", o->prefetch_extra);
    OPT(o->io_threads >= 1 && o->io_threads <= 16, "io_threads %d: expected 1..16", o->io_threads);
    OPT(o->verify >= 0 && o->verify <= 2, "verify %d: expected 0, 1 or 2", o->verify);
    OPT(o->n_seq >= 1 && o->n_seq <= 65536, "n_seq %d: expected 1..65536 sequences", o->n_seq);
    OPT(o->precision >= 0 && o->precision <= MWQ_MAX_PLANES, "precision %d: expected 0..%d", o->precision,
        MWQ_MAX_PLANES);
    OPT(o->evict >= EMOE_EVICT_POLICY_AUTO && o->evict <= EMOE_EVICT_POLICY_FREQ,
        "evict %d: expected 0 (auto), 1 (lru), 2 (cyclic) or 3 (freq)", o->evict);
    OPT(o->prefetch_min_confidence >= 0.0f && o->prefetch_min_confidence <= 1.0f,
        "prefetch_min_confidence %g: expected 0..1", (double)o->prefetch_min_confidence);
    return EMOE_OK;
#undef OPT
}

typedef struct {
    const emoe_tensor_info *t;
    const char *name;
    int64_t rows, cols;
    size_t off, bytes; /* in the dense buffer */
    int to_f32;        /* 1-D f16 -> f32 */
} dense_item;

#define LFAIL(...)                                                                                                    \
    do {                                                                                                              \
        if (err) snprintf(err, errlen, __VA_ARGS__);                                                                  \
        goto fail;                                                                                                    \
    } while (0)

/* The plan (always) and, unless plan_only, the model. *status: EMOE_OK or the failure's kind. */
static emoe_model *load_streaming(emoe_container *c, int max_ctx, int kv_f16, int n_threads,
                                  const emoe_stream_options *opts, int plan_only, emoe_stream_plan *plan, int *status,
                                  char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    *status = EMOE_ERR_ARG;
    if (plan) memset(plan, 0, sizeof *plan);
    if (!c) {
        if (err) snprintf(err, errlen, "emoe_container_load_streaming: container is NULL");
        return NULL;
    }
    emoe_stream_options opt;
    if (opts) opt = *opts;
    else emoe_stream_options_init(&opt);
    if (opt.n_seq == 0) opt.n_seq = 1; /* options not from emoe_stream_options_init */
    if (check_options(&opt, err, errlen)) return NULL;
    const char *path = emoe_container_path(c);
    const emoe_config *cfg = emoe_container_config(c);
    emoe_model *m = NULL;
    emoe_stream *S = NULL;
    emoe_piece_desc *desc = NULL;
    load_item *items = NULL;
    dense_item *dense = NULL;
    uint64_t *eb = NULL, *ef = NULL; /* per (layer, stored expert): slot bytes of its base planes / run planes */
    size_t n_items = 0;
    int fd = -1;
    m = emoe_model_new(cfg, max_ctx, kv_f16, n_threads);
    if (!m) LFAIL("%s: out of memory creating the model (max_ctx = %d)", path, max_ctx);
    if (emoe_model_status(m)) LFAIL("%s: %s", path, emoe_model_last_error(m));
    S = calloc(1, sizeof(*S));
    if (!S) goto nomem;
    S->opt = opt;
    S->n_layers = cfg->n_layers;
    S->top_k = cfg->top_k;
    S->pred_layer = S->ahead_layer = -1;
    for (int l = 0; l < cfg->n_layers; l++)
        if (m->layers[l].is_moe && m->layers[l].n_stored > S->n_stored_max) S->n_stored_max = m->layers[l].n_stored;
    S->n_pred = cfg->top_k + opt.prefetch_extra;
    if (S->n_pred > cfg->n_experts) S->n_pred = cfg->n_experts;
    if (S->n_pred > 64) S->n_pred = 64;
    S->min_confidence = opt.prefetch_min_confidence;

    /* ---- the table walk (load.c): every tensor checked; experts must share one storage ---- */
    if ((*status = load_plan(c, m, &items, &n_items, err, errlen))) goto fail_status;
    *status = EMOE_ERR_ARG;
    const emoe_tensor_info *first = NULL;
    size_t names_size = 1;
    for (size_t i = 0; i < n_items; i++)
        if (tt_table[items[i].it.entry].scope == TT_EXPERT) {
            if (!first) first = items[i].t;
            names_size += strlen(items[i].it.name) + 1;
        }
    if (S->n_stored_max > 0 && !first) LFAIL("%s: no expert tensors (blk.L.expert.E.ffn_gate.weight)", path);
    if (first) {
        S->mwq = first->dtype == EMOE_MWQ;
        S->dtype = S->mwq ? TENSOR_MWQ : first->dtype;
        S->K = S->mwq ? first->n_planes : 1;
        S->base_bits = first->mwq_base_bits;
        S->group = first->mwq_group_size;
        if (S->K > EMOE_STATS_LEVELS) LFAIL("%s: %d planes per matrix (at most %d supported here)", path, S->K,
                                            EMOE_STATS_LEVELS);
        S->run = S->mwq ? (opt.precision ? opt.precision : S->K) : 1;
        if (S->mwq && S->run > S->K)
            LFAIL("precision %d: %s stores %d planes per expert matrix", opt.precision, path, S->K);
        if (!S->mwq && opt.precision) LFAIL("precision %d: %s stores no MWQ experts", opt.precision, path);
    }
    const int n_pieces = cfg->n_layers * S->n_stored_max * 3 * (S->K ? S->K : 1);
    const size_t n_exp = (size_t)cfg->n_layers * (size_t)S->n_stored_max + 1;
    desc = calloc((size_t)(n_pieces ? n_pieces : 1), sizeof(emoe_piece_desc));
    S->names = malloc(names_size);
    dense = calloc(n_items + 1, sizeof(dense_item));
    eb = calloc(n_exp, sizeof(uint64_t)), ef = calloc(n_exp, sizeof(uint64_t));
    if (!desc || !S->names || !dense || !eb || !ef) goto nomem;
    size_t names_used = 0, n_dense = 0, dense_size = 0;
    uint64_t all_slots = 0;
    for (size_t i = 0; i < n_items; i++) {
        const tt_item *it = &items[i].it;
        const emoe_tensor_info *t = items[i].t;
        if (tt_table[it->entry].scope != TT_EXPERT) { /* dense: its place in the resident copy */
            dense_item *d = &dense[n_dense++];
            d->t = t, d->name = it->name, d->rows = it->rows, d->cols = it->cols;
            d->to_f32 = it->one_d && t->dtype == EMOE_F16;
            d->bytes = d->to_f32 ? (size_t)it->cols * sizeof(float) : (size_t)t->nbytes;
            dense_size = (dense_size + 63) / 64 * 64;
            d->off = dense_size;
            dense_size += d->bytes + (d->to_f32 ? (size_t)t->nbytes : 0); /* f16 staging right after */
            continue;
        }
        const int tm = t->dtype == EMOE_MWQ;
        if (tm != S->mwq || (!tm && t->dtype != S->dtype) ||
            (tm && (t->n_planes != S->K || t->mwq_base_bits != S->base_bits || t->mwq_group_size != S->group)))
            LFAIL("%s: tensor '%s' is stored differently from '%s' (%s); the streaming engine needs one expert "
                  "storage for the whole model", path, it->name, first->name, t->dtype_name);
        const char *nm = strcpy(S->names + names_used, it->name);
        names_used += strlen(nm) + 1;
        S->expert_bytes += (int64_t)t->nbytes;
        const int l = it->layer, e = it->expert, mat = (int)tt_table[it->entry].slot;
        const size_t x = (size_t)l * (size_t)S->n_stored_max + (size_t)e;
        for (int p = 0; p < S->K; p++) {
            emoe_piece_desc *d = &desc[pid(S, l, e, mat, p)];
            if (tm) *d = (emoe_piece_desc){t->planes[p].offset, t->planes[p].nbytes, t->planes[p].crc32, p, l, nm};
            else *d = (emoe_piece_desc){t->offset, t->nbytes, t->crc32, 0, l, nm};
            const uint64_t sb = emoe_cache_slot_bytes(d->nbytes);
            if (p == 0) eb[x] += sb;
            if (p < S->run) ef[x] += sb, all_slots += sb;
        }
    }
    uint64_t base_slot = 0, full_slot = 0; /* the largest expert at base precision / at the run precision */
    for (size_t x = 0; x < n_exp; x++) {
        if (eb[x] > base_slot) base_slot = eb[x];
        if (ef[x] > full_slot) full_slot = ef[x];
    }
    S->dense_bytes = (int64_t)dense_size;

    /* ---- the budget ---- */
    S->kv_bytes = (int64_t)model_kv_bytes(m, opt.n_seq, max_ctx); /* MLA: its latent cache */
    const size_t B = EMOE_BLOCK, H = (size_t)cfg->hidden, Kt = (size_t)cfg->top_k, NS = (size_t)S->n_stored_max;
    const size_t R = (size_t)(S->run ? S->run : 1), E = (size_t)cfg->n_experts, P = (size_t)S->n_pred;
    const size_t stream_scratch = NS * R * sizeof(emoe_hebf_item) + emoe_hebf_work_bytes((int)NS ? (int)NS : 1, (int)R) +
                                  NS * 3 * R * (sizeof(int) + sizeof(uint64_t)) + (NS + 1) * 8 * sizeof(int) + NS +
                                  B * Kt * (sizeof(int) + sizeof(float)) + B * Kt * H * sizeof(float) +
                                  B * H * sizeof(float) + B * E * sizeof(float) + 2 * B * P * (sizeof(int32_t) + 1) +
                                  (NS + 1) * sizeof(double) +
                                  (size_t)cfg->n_layers * sizeof(tensor_ref) /* predictors */ + names_used + sizeof(*S);
    static const int policies[] = {EMOE_EVICT_FREQ, EMOE_EVICT_LRU, EMOE_EVICT_CYCLIC, EMOE_EVICT_FREQ};
    emoe_cache_config cc = {.path = path, .n_pieces = n_pieces, .pieces = desc, .io_threads = opt.io_threads,
                            .direct = opt.direct, .drop_cache = opt.drop_cache, .verify = opt.verify,
                            .n_groups = cfg->n_layers,
                            .policy = opt.evict == EMOE_EVICT_POLICY_AUTO && opt.mode == EMOE_MODE_ONDEMAND
                                          ? EMOE_EVICT_LRU : policies[opt.evict]};
    S->scratch_bytes = (int64_t)(model_scratch_bytes(m, S->mwq) + stream_scratch + emoe_cache_overhead_bytes(&cc) +
                                 (size_t)(n_threads + opt.io_threads) * THREAD_STACK_ALLOWANCE);
    const int64_t min_cache = (int64_t)(base_slot * (uint64_t)cfg->top_k > full_slot ? base_slot * (uint64_t)cfg->top_k
                                                                                       : full_slot);
    const int64_t fixed = S->dense_bytes + S->kv_bytes + S->scratch_bytes;
    S->minimum = fixed + min_cache;
    S->budget = opt.budget_bytes > 0 ? opt.budget_bytes : 0;
    if (plan)
        *plan = (emoe_stream_plan){.minimum_bytes = S->minimum, .dense_bytes = S->dense_bytes,
                                   .kv_bytes = S->kv_bytes, .scratch_bytes = S->scratch_bytes,
                                   .min_cache_bytes = min_cache, .full_cache_bytes = (int64_t)all_slots,
                                   .expert_bytes = S->expert_bytes};
    if (S->budget && S->budget < S->minimum) {
        char b[32], mn[32], d[32], kv[32], sc[32], ec[32], ns[32] = "";
        if (opt.n_seq > 1) snprintf(ns, sizeof ns, " x %d sequences", opt.n_seq);
        fmt_mb(b, sizeof b, S->budget), fmt_mb(mn, sizeof mn, S->minimum), fmt_mb(d, sizeof d, S->dense_bytes);
        fmt_mb(kv, sizeof kv, S->kv_bytes), fmt_mb(sc, sizeof sc, S->scratch_bytes), fmt_mb(ec, sizeof ec, min_cache);
        if (err)
            snprintf(err, errlen, "memory budget %s (%lld bytes) is below the minimum %s (%lld bytes) for %s with "
                     "max_ctx %d%s: dense weights %s + KV cache %s + scratch %s + expert cache %s (one layer's top-%d "
                     "experts at base precision)%s; raise the budget, or lower max_ctx%s", b, (long long)S->budget, mn,
                     (long long)S->minimum, path, max_ctx, ns, d, kv, sc, ec, cfg->top_k,
                     S->budget < S->dense_bytes ? "; it is smaller than the dense part alone, which must stay "
                                                  "resident" : "", opt.n_seq > 1 ? " or n_seq" : "");
        *status = EMOE_ERR_BUDGET;
        goto fail_status;
    }
    if (plan_only) {
        *status = EMOE_OK;
        goto fail_status; /* frees everything: the plan is all the caller wants */
    }
    S->capacity = (int64_t)all_slots;
    if (S->budget && S->budget - fixed < S->capacity) S->capacity = S->budget - fixed;
    cc.capacity = (uint64_t)S->capacity;
    if (emoe_model_set_n_seq(m, opt.n_seq)) LFAIL("%s: %s", path, emoe_model_last_error(m));
    m->n_seq_max = opt.n_seq; /* the KV caches the budget counted */

    /* ---- read the dense weights into anonymous memory (checked) ---- */
    if (posix_memalign(&S->dense, 64, dense_size ? dense_size : 64)) {
        S->dense = NULL;
        goto nomem;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) LFAIL("%s: %s", path, strerror(errno));
    for (size_t i = 0; i < n_dense; i++) {
        const dense_item *d = &dense[i];
        const emoe_tensor_info *t = d->t;
        char *dst = (char *)S->dense + d->off;
        char *raw = d->to_f32 ? dst + d->bytes : dst;
        const int rc = read_all(fd, raw, t->nbytes, t->offset);
        if (rc) {
            *status = EMOE_ERR_IO;
            LFAIL("%s: reading tensor '%s' (offset %llu, %llu bytes) failed: %s", path, t->name,
                  (unsigned long long)t->offset, (unsigned long long)t->nbytes,
                  rc == -EIO ? "short read (truncated file?)" : strerror(-rc));
        }
        if (opt.verify != EMOE_VERIFY_READS_NEVER && emoe_crc32_fast(0, raw, (size_t)t->nbytes) != t->crc32) {
            *status = EMOE_ERR_CORRUPT;
            LFAIL("%s: checksum mismatch in tensor '%s' (the file is damaged: re-export or re-download it)", path,
                  t->name);
        }
        int dtype = t->dtype;
        if (d->to_f32) {
            uint16_t *h = malloc((size_t)t->nbytes);
            if (!h) goto nomem;
            memcpy(h, raw, (size_t)t->nbytes);
            emoe_f16_to_f32(h, (float *)dst, d->cols);
            free(h);
            dtype = EMOE_F32;
        }
        if (emoe_model_set_tensor(m, d->name, dtype, dst, d->rows, d->cols))
            LFAIL("%s: %s", path, emoe_model_last_error(m));
    }
    close(fd);
    fd = -1;

    /* ---- the cache, the work buffers, the hooks ---- */
    S->cache = emoe_cache_new(&cc, err, errlen);
    if (!S->cache) goto fail;
    const size_t ns1 = NS + 1;
    S->items = calloc(NS * R + 1, sizeof(emoe_hebf_item));
    S->hebf_work = malloc(emoe_hebf_work_bytes((int)(NS ? NS : 1), (int)R));
    S->ids = calloc(NS * 3 * R + 1, sizeof(int));
    S->keys = calloc(NS * 3 * R + 1, sizeof(uint64_t));
    S->starts = calloc(ns1, sizeof(int)), S->nreq = calloc(ns1, sizeof(int)), S->gexp = calloc(ns1, sizeof(int));
    S->pf_count = calloc(ns1, sizeof(int)), S->pf_best = calloc(ns1, sizeof(int)), S->yoff = calloc(ns1, sizeof(int));
    S->gtok = calloc(ns1, sizeof(int));
    S->expert_group = calloc(ns1, sizeof(int));
    S->done = calloc(ns1, 1);
    S->etok = calloc(B * Kt, sizeof(int));
    S->ew = calloc(B * Kt, sizeof(float));
    S->ybuf = malloc(B * Kt * H * sizeof(float));
    S->xpre = malloc(B * H * sizeof(float));
    S->plog = malloc(B * E * sizeof(float));
    S->pred = malloc(B * P * sizeof(int32_t));
    S->ahead = malloc(B * P * sizeof(int32_t));
    S->absent = calloc(2 * B * P, 1); /* the pre-attention prediction's flags, then the layer-ahead one's */
    S->pf_miss = calloc(ns1, sizeof(double));
    if (!S->items || !S->hebf_work || !S->ids || !S->keys || !S->starts || !S->nreq || !S->gexp || !S->pf_count ||
        !S->pf_best || !S->yoff || !S->gtok || !S->expert_group || !S->done || !S->etok || !S->ew || !S->ybuf ||
        !S->xpre || !S->plog || !S->pred || !S->ahead || !S->absent || !S->pf_miss)
        goto nomem;
    m->stream = S;
    m->stream_ops = &stream_ops;
    S = NULL; /* owned by the model now */
    if (m->stream->mwq && model_mwq_buffers(m)) goto nomem;
    if (emoe_model_ready(m)) LFAIL("%s: %s", path, emoe_model_last_error(m));
    free(desc), free(dense), free(items), free(eb), free(ef);
    *status = EMOE_OK;
    return m;
nomem:
    if (err) snprintf(err, errlen, "%s: out of memory loading the model", path);
    *status = EMOE_ERR_NOMEM;
    goto fail_status;
fail:
    if (*status == EMOE_OK) *status = EMOE_ERR_ARG;
fail_status:
    if (fd >= 0) close(fd);
    free(desc), free(dense), free(items), free(eb), free(ef);
    if (S) stream_free(S);
    emoe_model_free(m);
    return NULL;
}
#undef LFAIL

emoe_model *emoe_container_load_streaming(emoe_container *c, int max_ctx, int kv_f16, int n_threads,
                                          const emoe_stream_options *opts, char *err, size_t errlen) {
    int status;
    return load_streaming(c, max_ctx, kv_f16, n_threads, opts, 0, NULL, &status, err, errlen);
}

int emoe_container_stream_load(emoe_container *c, int max_ctx, int kv_f16, int n_threads,
                               const emoe_stream_options *opts, emoe_model **model, emoe_stream_plan *plan, char *err,
                               size_t errlen) {
    int status;
    emoe_model *m = load_streaming(c, max_ctx, kv_f16, n_threads, opts, model == NULL, plan, &status, err, errlen);
    if (model) *model = m;
    return status;
}
