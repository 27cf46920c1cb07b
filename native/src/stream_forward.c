/* The streaming engine's forward half: expert prediction and prefetch before each layer's attention, and the MoE block
 * computed from the expert cache (the model's stream hooks); options and statistics. Loading: stream_load.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stream.h"

/* ---- prediction ---- */

/* Per token, the top-n_pred experts of plog (pruned ones excluded), mapped to stored experts (duplicates of a merged
 * group kept once), into out [n_tok, n_pred] (-1 padded). */
static void predict(emoe_model *m, int l, const float *plog, int n_tok, int32_t *out) {
    const emoe_stream *S = m->stream;
    const int E = m->cfg.n_experts, P = S->n_pred;
    const int32_t *emap = m->layers[l].emap;
    for (int t = 0; t < n_tok; t++) {
        const float *z = plog + (size_t)t * E;
        int32_t *o = out + (size_t)t * P;
        int chosen[64], nc = 0;
        for (int j = 0; j < P; j++) o[j] = -1;
        for (int j = 0; j < P && j < 64; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                if (emap && emap[e] < 0) continue;
                int taken = 0;
                for (int i = 0; i < nc; i++) taken |= chosen[i] == e;
                if (!taken && (best < 0 || z[e] > z[best])) best = e;
            }
            if (best < 0) break;
            chosen[nc++] = best;
            const int32_t st = emap ? emap[best] : best;
            int dup = 0;
            for (int i = 0; i < j; i++) dup |= o[i] == st;
            o[j] = dup ? -1 : st;
        }
    }
}

/* Predicted logits of layer l from the hidden state x (the layer input, or layer l-1's post-attention state). */
static void predicted_logits(emoe_model *m, int l, const float *x, int n_tok) {
    emoe_stream *S = m->stream;
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    const int H = c->hidden;
    const tensor_ref *w = L->pre.data ? &L->pre : &L->router;
    if (c->router_input == EMOE_ROUTER_IN_LAYER_INPUT) { /* SmallThinker: the router reads the raw layer input */
        fwd_matmul(m, &L->router, x, n_tok, S->plog, (size_t)c->n_experts);
        return;
    }
    for (int t = 0; t < n_tok; t++)
        fwd_rmsnorm(S->xpre + (size_t)t * H, x + (size_t)t * H, L->attn_norm.data, H, c->norm_eps);
    fwd_matmul(m, w, S->xpre, n_tok, S->plog, (size_t)c->n_experts);
    if (w == &L->router && L->router_b.data) /* gpt-oss: the router's bias shifts the guess as it shifts routing */
        for (int t = 0; t < n_tok; t++)
            for (int e = 0; e < c->n_experts; e++)
                S->plog[(size_t)t * c->n_experts + e] += ((const float *)L->router_b.data)[e];
}

/* P(routed | predicted at rank r while absent), from the predictions scored so far (a uniform prior first). */
static double rank_confidence(const emoe_stream *S, int n_tok, int r) {
    const int b = n_tok > 1;
    return ((double)S->rank_hit[b][r] + 1.0) / ((double)S->rank_n[b][r] + 2.0);
}

/* Queue the predicted experts' pieces: hottest first (tokens predicting them, then best rank). Each expert's
 * confidence (the probability that at least one of the tokens predicting it routes to it, from the measured
 * per-rank precision) decides what its prefetch may evict: above min_confidence, only pieces the cache values less
 * than the guess is worth (emoe_cache_prefetch); at or below it, free memory only. */
static void issue_prefetch(emoe_model *m, int l, const int32_t *pred, unsigned char *absent, int n_tok,
                           uint64_t seq) {
    emoe_stream *S = m->stream;
    const int P = S->n_pred, n_st = m->layers[l].n_stored;
    int *count = S->pf_count, *best = S->pf_best;
    double *miss = S->pf_miss;
    for (int e = 0; e < n_st; e++) count[e] = 0, best[e] = P, miss[e] = 1.0;
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < P; j++) {
            const int32_t e = pred[(size_t)t * P + j];
            if (e < 0 || e >= n_st) continue;
            absent[(size_t)t * P + j] = emoe_cache_state(S->cache, pid(S, l, e, 0, 0)) != EMOE_PIECE_READY;
            count[e]++;
            if (j < best[e]) best[e] = j;
            miss[e] *= 1.0 - rank_confidence(S, n_tok, j);
        }
    const int planes = S->opt.mode == EMOE_MODE_ADAPTIVE ? 1 : S->run; /* adaptive: base planes only */
    for (int rank = 0;; rank++) {
        int pick = -1;
        for (int e = 0; e < n_st; e++)
            if (count[e] && (pick < 0 || count[e] > count[pick] || (count[e] == count[pick] && best[e] < best[pick])))
                pick = e;
        if (pick < 0) break;
        count[pick] = 0;
        int ids[3 * EMOE_STATS_LEVELS], n = 0;
        for (int p = 0; p < planes; p++)
            for (int mat = 0; mat < 3; mat++) ids[n++] = pid(S, l, pick, mat, p);
        const double conf = 1.0 - miss[pick];
        emoe_cache_prefetch(S->cache, ids, n, mkkey(CLS_PREFETCH, seq, (uint64_t)rank),
                            conf > S->min_confidence ? conf : -INFINITY);
    }
}

/* Per-rank precision of the predictions of absent experts, against the true routing (s->topk_idx). */
static void learn_confidence(emoe_model *m, const int32_t *pred, const unsigned char *absent, int n_tok) {
    emoe_stream *S = m->stream;
    const int K = m->cfg.top_k, P = S->n_pred;
    for (int t = 0; t < n_tok; t++)
        for (int j = 0; j < P; j++) {
            const int32_t e = pred[(size_t)t * P + j];
            if (e < 0 || !absent[(size_t)t * P + j]) continue;
            int hit = 0;
            for (int i = 0; i < K; i++) hit |= m->s.topk_idx[(size_t)t * K + i] == e;
            S->rank_n[n_tok > 1][j]++, S->rank_hit[n_tok > 1][j] += (uint64_t)hit;
        }
}

static void stream_before_attention(emoe_model *m, int l, int n_tok) {
    emoe_stream *S = m->stream;
    S->pred_layer = -1;
    /* until its routing is known, layer l is the next one to need its pieces: evict from l-1 backwards */
    emoe_cache_set_position(S->cache, (l + m->cfg.n_layers - 1) % m->cfg.n_layers, S->seq / (uint64_t)m->cfg.n_layers);
    if (!S->opt.prefetch || S->opt.mode == EMOE_MODE_ONDEMAND) return;
    const uint64_t seq = S->seq + (uint64_t)l;
    emoe_cache_cancel_queued(S->cache, mkkey(CLS_PREFETCH, 0, 0), mkkey(CLS_PREFETCH, seq, 0)); /* stale */
    if (m->cfg.router_input == EMOE_ROUTER_IN_LAYER_INPUT) /* forward_block computed the true logits already */
        memcpy(S->plog, m->s.logits_r, (size_t)n_tok * (size_t)m->cfg.n_experts * sizeof(float));
    else
        predicted_logits(m, l, m->s.x, n_tok);
    predict(m, l, S->plog, n_tok, S->pred);
    S->pred_layer = l, S->pred_n = n_tok;
    issue_prefetch(m, l, S->pred, S->absent, n_tok, seq);
}

/* Recall/precision counters of a prediction against the true routing (s->topk_idx, stored ids). */
static void score_prediction(emoe_model *m, const int32_t *pred, int n_tok, uint64_t *n_pred, uint64_t *hits,
                             uint64_t *hits_k, uint64_t *n_true) {
    const emoe_stream *S = m->stream;
    const int K = m->cfg.top_k, P = S->n_pred;
    for (int t = 0; t < n_tok; t++) {
        const int *tr = m->s.topk_idx + (size_t)t * K;
        const int32_t *pr = pred + (size_t)t * P;
        for (int j = 0; j < K; j++) {
            int dup = 0;
            for (int i = 0; i < j; i++) dup |= tr[i] == tr[j];
            if (dup) continue;
            (*n_true)++;
            for (int i = 0; i < P; i++)
                if (pr[i] == tr[j]) {
                    (*hits)++;
                    if (hits_k && i < K) (*hits_k)++;
                    break;
                }
        }
        for (int i = 0; i < P; i++) *n_pred += pr[i] >= 0;
    }
}

/* ---- the MoE block ---- */

/* Point tref[] at the cache's copy of expert e's matrices at k planes and run it on its gathered tokens. */
static void compute_group(emoe_model *m, int l, int g, int k) {
    emoe_stream *S = m->stream;
    run_state *s = &m->s;
    const int H = m->cfg.hidden, F = m->cfg.expert_ffn, e = S->gexp[g];
    const int n_e = S->gtok[g + 1] - S->gtok[g];
    for (int i = 0; i < n_e; i++)
        memcpy(s->xg + (size_t)i * H, s->xn + (size_t)S->etok[S->gtok[g] + i] * H, (size_t)H * sizeof(float));
    for (int mat = 0; mat < 3; mat++) {
        const int64_t rows = mat < 2 ? F : H, cols = mat < 2 ? H : F;
        const char *base = emoe_cache_data(S->cache, pid(S, l, e, mat, 0));
        if (!S->mwq) {
            S->tref[mat] = (tensor_ref){.data = base, .dtype = S->dtype, .rows = rows, .cols = cols};
            continue;
        }
        mwq_layout *ly = &S->lay[mat];
        ly->n_planes = k, ly->base_bits = S->base_bits, ly->group = S->group;
        for (int p = 0; p < k; p++) ly->plane_off[p] = (const char *)emoe_cache_data(S->cache, pid(S, l, e, mat, p)) - base;
        S->tref[mat] = (tensor_ref){.data = base, .dtype = TENSOR_MWQ, .rows = rows, .cols = cols, .mwq = ly};
    }
    fwd_expert_ffn(m, l, e, &S->tref[0], &S->tref[1], &S->tref[2], s->xg, n_e, s->yg, S->mwq ? k : 0);
    memcpy(S->ybuf + (size_t)S->yoff[g] * H, s->yg, (size_t)n_e * H * sizeof(float));
    S->st.experts_run++;
    S->st.experts_at_planes[(k > 0 ? k : 1) - 1 < EMOE_STATS_LEVELS ? (k > 0 ? k : 1) - 1 : EMOE_STATS_LEVELS - 1]++;
}

static int group_size(const emoe_stream *S, int g) { return S->starts[g + 1] - S->starts[g]; }

static int fail_layer(emoe_model *m, int st, int admitted) {
    emoe_stream *S = m->stream;
    for (int g = 0; g < admitted; g++)
        if (!S->done[g]) emoe_cache_release(S->cache, S->ids + S->starts[g], group_size(S, g));
    return model_error(m, st, "%s", emoe_cache_error(S->cache));
}

static int stream_moe(emoe_model *m, int l, int n_tok) {
    emoe_stream *S = m->stream;
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    const int H = c->hidden, K = c->top_k, n_st = L->n_stored;
    const uint64_t seq = S->seq + (uint64_t)l;
    emoe_cache_set_position(S->cache, l, S->seq / (uint64_t)c->n_layers); /* epoch = forward blocks (tokens) */
    if (c->router_input == EMOE_ROUTER_IN_FFN_NORM) fwd_router_logits(m, l, s->xn, n_tok);
    fwd_route(m, l, n_tok);
    if (S->pred_layer == l && S->pred_n == n_tok) {
        score_prediction(m, S->pred, n_tok, &S->st.pred_experts, &S->st.pred_hits, &S->st.pred_hits_k,
                         &S->st.true_experts);
        learn_confidence(m, S->pred, S->absent, n_tok);
    }
    if (S->ahead_layer == l && S->ahead_n == n_tok) {
        uint64_t dummy = 0;
        score_prediction(m, S->ahead, n_tok, &dummy, &S->st.ahead_hits, NULL, &S->st.ahead_experts);
    }
    S->pred_layer = S->ahead_layer = -1;

    /* the groups: one per routed stored expert, in HEBF order of their base planes (ONDEMAND: expert order) */
    const int n_items = emoe_hebf_order(n_tok, K, (const int32_t *)s->topk_idx, s->topk_w, NULL, n_st, S->run,
                                        S->items, S->n_stored_max * S->run, S->hebf_work);
    if (n_items < 0) return model_error(m, n_items, "layer %d: scheduling failed", l);
    for (int e = 0; e < n_st; e++) S->expert_group[e] = -1;
    int n_groups = 0;
    if (S->opt.mode == EMOE_MODE_ONDEMAND) {
        for (int i = 0; i < n_items; i++)
            if (S->items[i].level == 0) S->expert_group[S->items[i].expert] = 1;
        for (int e = 0; e < n_st; e++)
            if (S->expert_group[e] > 0) S->gexp[n_groups] = e, S->expert_group[e] = n_groups++;
    } else {
        for (int i = 0; i < n_items; i++)
            if (S->items[i].level == 0) S->gexp[n_groups] = S->items[i].expert, S->expert_group[S->items[i].expert] = n_groups++;
    }
    int pos = 0, rows = 0;
    for (int g = 0; g < n_groups; g++) {
        const int e = S->gexp[g];
        S->gtok[g] = rows;
        for (int t = 0; t < n_tok; t++) { /* tokens and weights exactly as the resident moe() sums them */
            int hit = 0;
            float w = 0.0f;
            for (int j = 0; j < K; j++)
                if (s->topk_idx[(size_t)t * K + j] == e) hit = 1, w += s->topk_w[(size_t)t * K + j];
            if (hit) S->etok[rows] = t, S->ew[rows++] = w;
        }
        S->yoff[g] = S->gtok[g];
        S->starts[g] = pos;
        for (int p = 0; p < S->run; p++) {
            int rank = 0;
            for (int i = 0; i < n_items; i++)
                if (S->items[i].expert == e && S->items[i].level == p) rank = i;
            for (int mat = 0; mat < 3; mat++) {
                S->ids[pos] = pid(S, l, e, mat, p);
                S->keys[pos++] = mkkey(CLS_DEMAND, seq,
                                       (uint64_t)(S->opt.mode == EMOE_MODE_ONDEMAND ? g * 3 * S->run : rank * 3) +
                                           (uint64_t)mat);
            }
        }
        S->nreq[g] = S->opt.mode == EMOE_MODE_ADAPTIVE ? 3 : 3 * S->run;
        S->done[g] = 0;
    }
    S->gtok[n_groups] = rows;
    S->starts[n_groups] = pos;

    int expired = 0, admitted = 0, n_done = 0, ahead_done = S->opt.prefetch < 2 || S->opt.mode == EMOE_MODE_ONDEMAND;
    const int partial = S->opt.mode == EMOE_MODE_ADAPTIVE;
    while (n_done < n_groups) {
        /* admit experts in order while they fit (ONDEMAND: one at a time, after the previous one ran) */
        while (admitted < n_groups && (S->opt.mode != EMOE_MODE_ONDEMAND || admitted == n_done)) {
            const int st = emoe_cache_acquire(S->cache, S->ids + S->starts[admitted], group_size(S, admitted),
                                              S->keys + S->starts[admitted]);
            if (st == EMOE_CACHE_FULL) break;
            if (st) return fail_layer(m, st, admitted);
            admitted++;
        }
        if (!expired && admitted == n_groups) { /* every routed expert is pinned: what is left of this layer's
                                                    * prefetches was mispredicted and stops costing bandwidth */
            expired = 1;
            emoe_cache_expire_prefetches(S->cache, mkkey(CLS_PREFETCH, 0, 0), mkkey(CLS_PREFETCH, seq + 1, 0));
        }
        if (!ahead_done) { /* layer l+1 from the post-attention state, queued behind this layer's demand */
            ahead_done = 1;
            int nl = l + 1;
            while (nl < c->n_layers && !m->layers[nl].is_moe) nl++;
            if (nl < c->n_layers) {
                predicted_logits(m, nl, s->x, n_tok);
                predict(m, nl, S->plog, n_tok, S->ahead);
                S->ahead_layer = nl, S->ahead_n = n_tok;
                issue_prefetch(m, nl, S->ahead, S->absent + (size_t)EMOE_BLOCK * (size_t)S->n_pred, n_tok,
                               S->seq + (uint64_t)nl);
            }
        }
        if (admitted == n_done) { /* nothing of ours in flight: space frees up when other reads land */
            emoe_cache_wait_io(S->cache);
            continue;
        }
        const int g = emoe_cache_wait_groups(S->cache, S->ids, S->starts, S->nreq, admitted, S->done, partial);
        if (g < -1) return fail_layer(m, g, admitted);
        if (g < 0) break; /* cannot happen: admitted > n_done */
        int k = S->run;
        const int *gi = S->ids + S->starts[g];
        if (partial) { /* the longest prefix of planes resident for all three matrices */
            for (int p = 1; p < S->run && k == S->run; p++)
                for (int mat = 0; mat < 3; mat++)
                    if (emoe_cache_state(S->cache, gi[p * 3 + mat]) != EMOE_PIECE_READY) k = p;
            if (k < S->run) /* the skipped planes keep loading, behind everything else */
                emoe_cache_requeue(S->cache, gi + k * 3, (S->run - k) * 3, mkkey(CLS_BACKGROUND, seq, 0));
        }
        compute_group(m, l, g, S->mwq ? k : 0);
        emoe_cache_release(S->cache, gi, group_size(S, g));
        S->done[g] = 1;
        n_done++;
    }

    /* sum the experts' outputs in expert order: the same additions, in the same order, as the resident moe() */
    memset(s->tmp, 0, (size_t)n_tok * H * sizeof(float));
    for (int e = 0; e < n_st; e++) {
        const int g = S->expert_group[e];
        if (g < 0) continue;
        for (int i = S->gtok[g]; i < S->gtok[g + 1]; i++) {
            float *dst = s->tmp + (size_t)S->etok[i] * H;
            const float *src = S->ybuf + (size_t)i * H;
            const float w = S->ew[i];
            for (int d = 0; d < H; d++) dst[d] += w * src[d];
        }
    }
    fwd_shared_expert(m, l, n_tok);
    /* this layer's mispredicted experts were never used: make them the first to be evicted */
    emoe_cache_expire_prefetches(S->cache, mkkey(CLS_PREFETCH, 0, 0), mkkey(CLS_PREFETCH, seq + 1, 0));
    return EMOE_OK;
}

static void stream_forward_done(emoe_model *m, int n_tok, double seconds) {
    emoe_stream *S = m->stream;
    S->st.tokens += (uint64_t)n_tok;
    S->st.forward_calls++;
    S->st.forward_s += seconds;
    S->seq += (uint64_t)m->cfg.n_layers;
}

void stream_free(emoe_stream *S) {
    if (!S) return;
    emoe_cache_free(S->cache); /* joins the I/O thread first */
    void *bufs[] = {S->dense, S->names, S->items, S->hebf_work, S->ids, S->starts, S->nreq, S->gexp, S->pf_count,
                    S->pf_best, S->yoff, S->gtok, S->expert_group, S->etok, S->keys, S->done, S->ew, S->ybuf, S->xpre, S->plog,
                    S->pred, S->ahead, S->absent, S->pf_miss};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(S);
}

const emoe_stream_ops stream_ops = {
    .before_attention = stream_before_attention,
    .moe = stream_moe,
    .forward_done = stream_forward_done,
    .free = stream_free,
};

/* ---- public: options, statistics ---- */

void emoe_stream_options_init(emoe_stream_options *o) {
    if (!o) return;
    memset(o, 0, sizeof(*o));
    o->mode = EMOE_MODE_EXACT;
    o->prefetch = 1;
    o->prefetch_extra = 1;
    o->io_threads = 2; /* two reads in flight: a demand read need not wait for a prefetch read to finish */
    /* the budget is the memory the model takes: O_DIRECT keeps the file out of the page cache (buffered reads drop
     * their pages after use where O_DIRECT is refused), and is the faster path under a cap (BENCHMARKS.md) */
    o->direct = 1;
    o->drop_cache = 1;
    o->verify = EMOE_VERIFY_READS_FIRST;
    o->n_seq = 1;
    o->evict = EMOE_EVICT_POLICY_AUTO;
    o->prefetch_min_confidence = (float)PREFETCH_MIN_CONFIDENCE;
}

int emoe_model_stats(emoe_model *m, emoe_stats *out) {
    if (!m || !out) return EMOE_ERR_ARG;
    memset(out, 0, sizeof(*out));
    out->mode = -1;
    emoe_stream *S = m->stream;
    if (!S) return EMOE_OK;
    *out = S->st;
    out->budget_bytes = S->budget > 0 ? S->budget : 0;
    out->minimum_bytes = S->minimum;
    out->dense_bytes = S->dense_bytes;
    out->kv_bytes = S->kv_bytes;
    out->scratch_bytes = S->scratch_bytes;
    out->cache_capacity_bytes = S->capacity;
    out->expert_bytes = S->expert_bytes;
    out->mode = S->opt.mode;
    out->n_planes = S->K;
    out->run_planes = S->run;
    emoe_cache_stats cs;
    emoe_cache_get_stats(S->cache, &cs);
    out->cache_used_bytes = (int64_t)cs.used;
    out->cache_peak_bytes = (int64_t)cs.peak_used;
    out->direct = cs.direct;
    out->drop_cache = cs.drop_cache;
    snprintf(out->read_note, sizeof out->read_note, "%s", cs.read_note ? cs.read_note : "");
    for (int i = 0; i < EMOE_STATS_LEVELS; i++)
        out->hits[i] = cs.hits[i], out->misses[i] = cs.misses[i], out->late[i] = cs.late[i];
    out->bytes_read = cs.bytes_read;
    out->demand_bytes = cs.demand_bytes;
    out->read_syscalls = cs.read_syscalls;
    out->pieces_read = cs.pieces_read;
    out->evictions = cs.evictions;
    out->evicted_bytes = cs.evicted_bytes;
    out->cancelled = cs.cancelled;
    out->prefetch_issued = cs.prefetch_issued;
    out->prefetch_used = cs.prefetch_used;
    out->prefetch_wasted = cs.prefetch_wasted;
    out->crc_checked = cs.crc_checked;
    out->crc_failures = cs.crc_failures;
    out->read_errors = cs.read_errors;
    out->stall_s = cs.stall_s;
    out->io_busy_s = cs.io_busy_s;
    return EMOE_OK;
}

void emoe_model_reset_stats(emoe_model *m) {
    if (!m || !m->stream) return;
    memset(&m->stream->st, 0, sizeof m->stream->st);
    emoe_cache_reset_stats(m->stream->cache);
}

int emoe_model_drop_cache(emoe_model *m) {
    if (!m) return EMOE_ERR_ARG;
    if (m->stream) emoe_cache_clear(m->stream->cache);
    return EMOE_OK;
}
