/* HEBF load order for one layer, and the streaming engine that runs it. See hebf.h. */
#define _GNU_SOURCE
#include "hebf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "edgemoe.h"
#include "edgemoe_container.h"
#include "expert_cache.h"
#include "model.h"

size_t emoe_hebf_work_bytes(int n_experts, int max_levels) {
    if (n_experts <= 0 || max_levels <= 0) return 0;
    /* count [E * L] int32, weight [E * L] float, per-token level/weight [E] */
    return (size_t)n_experts * (size_t)max_levels * (sizeof(int32_t) + sizeof(float)) +
           (size_t)n_experts * (sizeof(int32_t) + sizeof(float));
}

static int item_cmp(const void *a, const void *b) {
    const emoe_hebf_item *x = a, *y = b;
    if (x->level != y->level) return x->level < y->level ? -1 : 1;
    if (x->n_tok != y->n_tok) return x->n_tok > y->n_tok ? -1 : 1;
    if (x->weight != y->weight) return x->weight > y->weight ? -1 : 1;
    return (x->expert > y->expert) - (x->expert < y->expert);
}

int emoe_hebf_order(int n_tok, int k, const int32_t *experts, const float *weights, const int32_t *levels,
                    int n_experts, int max_levels, emoe_hebf_item *out, int max_out, void *work) {
    if (n_tok < 0 || k < 0 || n_experts <= 0 || max_levels <= 0 || max_out < 0 || (n_tok && k && !experts) ||
        (max_out && !out))
        return EMOE_ERR_ARG;
    const size_t EL = (size_t)n_experts * (size_t)max_levels;
    void *buf = work ? work : malloc(emoe_hebf_work_bytes(n_experts, max_levels));
    if (!buf) return EMOE_ERR_NOMEM;
    int32_t *count = buf;                        /* [E][L] tokens needing expert e at >= level l */
    float *wsum = (float *)(count + EL);         /* [E][L] */
    int32_t *tok_level = (int32_t *)(wsum + EL); /* [E] this token's level for e (0 = not routed) */
    float *tok_w = (float *)(tok_level + n_experts); /* [E] */
    memset(count, 0, EL * sizeof(int32_t));
    memset(wsum, 0, EL * sizeof(float));
    memset(tok_level, 0, (size_t)n_experts * sizeof(int32_t));
    int rc = 0;
    for (int t = 0; t < n_tok && !rc; t++) {
        for (int j = 0; j < k; j++) { /* gather this token's experts (merged duplicates collapse) */
            const int32_t e = experts[(size_t)t * k + j];
            if (e < 0) continue;
            if (e >= n_experts) {
                rc = EMOE_ERR_ARG;
                break;
            }
            int32_t lv = levels ? levels[(size_t)t * k + j] : max_levels;
            lv = lv < 1 ? 1 : lv > max_levels ? max_levels : lv;
            const float w = weights ? weights[(size_t)t * k + j] : 1.0f;
            if (!tok_level[e]) tok_w[e] = 0.0f;
            tok_w[e] += w;
            if (lv > tok_level[e]) tok_level[e] = lv;
        }
        for (int j = 0; j < k; j++) { /* count each expert once, then clear for the next token */
            const int32_t e = experts[(size_t)t * k + j];
            if (e < 0 || e >= n_experts || !tok_level[e]) continue;
            for (int l = 0; l < tok_level[e]; l++) {
                count[(size_t)e * max_levels + l]++;
                wsum[(size_t)e * max_levels + l] += tok_w[e];
            }
            tok_level[e] = 0;
        }
    }
    int n_out = 0;
    for (int e = 0; e < n_experts && !rc; e++)
        for (int l = 0; l < max_levels; l++) {
            const size_t i = (size_t)e * max_levels + l;
            if (!count[i]) continue;
            if (n_out == max_out) {
                rc = EMOE_ERR_ARG;
                break;
            }
            out[n_out++] = (emoe_hebf_item){.expert = e, .level = l, .n_tok = count[i], .weight = wsum[i]};
        }
    if (!work) free(buf);
    if (rc) return rc;
    qsort(out, (size_t)n_out, sizeof(emoe_hebf_item), item_cmp);
    return n_out;
}

/* =====================================================================================================================
 * The streaming engine: a model whose experts live in an emoe_cache (expert_cache.c) filled by the I/O thread.
 *
 * Per MoE layer l of a block of tokens:
 *   before attention   predict the layer's experts (top-(k+extra) of a router applied to attn_norm(x): the fitted
 *                      blk.l.ffn_gate_inp_pre.weight if the container has one, else the layer's router; SmallThinker's
 *                      router already reads the layer input) and queue their pieces at prefetch priority;
 *   after attention    route; order the routed experts' pieces HEBF-style (above); pin them expert by expert (admission:
 *                      all of an expert's pieces or none, so a small cache never deadlocks); then repeatedly compute
 *                      whichever admitted expert has all its pieces (ADAPTIVE: its base planes) resident, release it,
 *                      admit more. Optionally (prefetch = 2) predict layer l+1 from the post-attention state and queue
 *                      its pieces behind this layer's demand. Expert outputs go to per-expert rows and are summed in
 *                      expert-index order at the end, exactly like the resident path, so EXACT mode is bit-identical.
 * Priority keys (lower = sooner): class << 60 | layer pass << 20 | rank; class 0 = demand, 1 = prefetch,
 * 2 = background (refinement planes ADAPTIVE skipped). Prefetches for layers already passed are cancelled.
 * ===================================================================================================================*/
enum { CLS_DEMAND = 0, CLS_PREFETCH = 1, CLS_BACKGROUND = 2 };
/* A prefetch may evict only when the expert is more likely used than not: below that, wrong guesses (each an
 * expert read, plus the piece it displaced, read again later) outnumber right ones, whose only gain is latency a
 * demand read would pay anyway. On the random OLMoE-shaped benchmark model at 50 % budget, absent experts predicted
 * at rank 0 are routed ~36 % of the time in decode (88 % in prefill): prefetch with eviction read 52 MB/token for
 * the 42 MB of demand, this rule 42 MB (BENCHMARKS.md "Under a memory budget"). */
#define PREFETCH_MIN_CONFIDENCE 0.5
#define THREAD_STACK_ALLOWANCE ((size_t)256 << 10) /* touched stack per thread, counted against the budget */

static uint64_t mkkey(int cls, uint64_t seq, uint64_t rank) {
    return ((uint64_t)cls << 60) | ((seq & ((1ull << 40) - 1)) << 20) | (rank & 0xFFFFFu);
}

struct emoe_stream {
    emoe_cache *cache;
    emoe_stream_options opt;
    int n_layers, n_stored_max, top_k, n_pred; /* n_pred = top_k + prefetch_extra (<= n_experts) */
    int K, run;                                /* planes stored per matrix, planes computed */
    int mwq, base_bits, group, dtype;          /* dtype: EMOE_F32/F16/Q8_0 or TENSOR_MWQ */
    void *dense;                               /* the resident dense weights (anonymous memory) */
    char *names;                               /* expert tensor names (piece descriptors point here) */
    tensor_ref *pre;                           /* [n_layers] fitted predictors (data NULL: use the router) */
    uint64_t seq;                              /* layer passes before the current block */
    int64_t budget, minimum, dense_bytes, kv_bytes, scratch_bytes, capacity, expert_bytes;
    /* per-layer work, sized for EMOE_BLOCK tokens */
    emoe_hebf_item *items;
    void *hebf_work;
    int *ids, *starts, *nreq, *gexp, *pf_count, *pf_best, *yoff, *gtok, *expert_group, *etok;
    double *pf_miss; /* [n_stored_max] issue_prefetch: P(no token routes to the expert) */
    uint64_t *keys;
    unsigned char *done;
    float *ew, *ybuf, *xpre, *plog;
    int32_t *pred, *ahead; /* [B, n_pred] predicted stored experts (-1 = none) */
    unsigned char *absent; /* [B, n_pred] the predicted expert was not resident when predicted */
    /* the predictor's measured precision per rank, for experts not resident when predicted (those are the ones a
     * prefetch reads; they are routed less often than the average prediction, the resident ones being the hot
     * experts), separately for single tokens (decode) and blocks (prefill, where nearly every prediction of a cold
     * cache is absent and right): P(routed | predicted at rank r, absent) ~ (rank_hit[b][r] + 1) / (rank_n[b][r] + 2) */
    uint64_t rank_n[2][64], rank_hit[2][64];
    double min_confidence; /* below it a prefetch only takes free memory or pieces worth less than it is */
    int pred_layer, pred_n, ahead_layer, ahead_n;
    tensor_ref tref[3];
    mwq_layout lay[3];
    emoe_stats st; /* model-side counters; the cache's are merged in emoe_model_stats */
};

static int pid(const emoe_stream *S, int l, int e, int mat, int p) {
    return ((l * S->n_stored_max + e) * 3 + mat) * S->K + p;
}

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
    const tensor_ref *w = S->pre[l].data ? &S->pre[l] : &L->router;
    if (c->router_input == EMOE_ROUTER_IN_LAYER_INPUT) { /* SmallThinker: the router reads the raw layer input */
        fwd_matmul(m, &L->router, x, n_tok, S->plog, (size_t)c->n_experts);
        return;
    }
    for (int t = 0; t < n_tok; t++)
        fwd_rmsnorm(S->xpre + (size_t)t * H, x + (size_t)t * H, L->attn_norm.data, H, c->norm_eps);
    fwd_matmul(m, w, S->xpre, n_tok, S->plog, (size_t)c->n_experts);
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
    fwd_gated_ffn(m, &S->tref[0], &S->tref[1], &S->tref[2], s->xg, n_e, s->yg, S->mwq ? k : 0);
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
    const int H = c->hidden, E = c->n_experts, K = c->top_k, n_st = L->n_stored;
    const uint64_t seq = S->seq + (uint64_t)l;
    emoe_cache_set_position(S->cache, l, S->seq / (uint64_t)c->n_layers); /* epoch = forward blocks (tokens) */
    if (c->router_input == EMOE_ROUTER_IN_FFN_NORM) fwd_matmul(m, &L->router, s->xn, n_tok, s->logits_r, (size_t)E);
    fwd_route(m, L->emap, n_tok);
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

static void stream_free(emoe_stream *S) {
    if (!S) return;
    emoe_cache_free(S->cache); /* joins the I/O thread first */
    void *bufs[] = {S->dense, S->names, S->pre, S->items, S->hebf_work, S->ids, S->starts, S->nreq, S->gexp, S->pf_count,
                    S->pf_best, S->yoff, S->gtok, S->expert_group, S->etok, S->keys, S->done, S->ew, S->ybuf, S->xpre, S->plog,
                    S->pred, S->ahead, S->absent, S->pf_miss};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(S);
}

static const emoe_stream_ops stream_ops = {
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
    o->verify = EMOE_VERIFY_READS_FIRST;
    o->n_seq = 1;
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

/* ---- loading a container under a budget ---- */

static void fmt_mb(char *out, size_t n, int64_t b) { snprintf(out, n, "%.1f MiB", (double)b / 1048576.0); }

static int is_predictor_name(const char *name, int *layer) {
    int l, n = 0;
    if (sscanf(name, "blk.%d.ffn_gate_inp_pre.weight%n", &l, &n) == 1 && n > 0 && !name[n]) return *layer = l, 1;
    return 0;
}

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

#define LFAIL(...)                                                                                                    \
    do {                                                                                                              \
        if (err) snprintf(err, errlen, __VA_ARGS__);                                                                  \
        goto fail;                                                                                                    \
    } while (0)

emoe_model *emoe_container_load_streaming(emoe_container *c, int max_ctx, int kv_f16, int n_threads,
                                          const emoe_stream_options *opts, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    if (!c) {
        if (err) snprintf(err, errlen, "emoe_container_load_streaming: container is NULL");
        return NULL;
    }
    emoe_stream_options opt;
    if (opts) opt = *opts;
    else emoe_stream_options_init(&opt);
    const char *path = emoe_container_path(c);
    const emoe_config *cfg = emoe_container_config(c);
    emoe_model *m = NULL;
    emoe_stream *S = NULL;
    emoe_piece_desc *desc = NULL;
    int fd = -1;
    typedef struct {
        const emoe_tensor_info *t;
        size_t off, bytes; /* in the dense buffer */
        int to_f32;        /* 1-D f16 -> f32 */
        int pred_layer;    /* >= 0: a fitted predictor */
    } dense_item;
    dense_item *dense = NULL;
    if (opt.mode < EMOE_MODE_EXACT || opt.mode > EMOE_MODE_ONDEMAND) LFAIL("mode %d: expected 0 (exact), 1 (adaptive) "
                                                                            "or 2 (ondemand)", opt.mode);
    if (opt.prefetch < 0 || opt.prefetch > 2) LFAIL("prefetch %d: expected 0, 1 or 2", opt.prefetch);
    if (opt.prefetch_extra < 0) LFAIL("prefetch_extra %d: expected >= 0", opt.prefetch_extra);
    if (opt.io_threads < 1 || opt.io_threads > 16) LFAIL("io_threads %d: expected 1..16", opt.io_threads);
    if (opt.verify < 0 || opt.verify > 2) LFAIL("verify %d: expected 0, 1 or 2", opt.verify);
    if (opt.n_seq == 0) opt.n_seq = 1; /* options not from emoe_stream_options_init */
    if (opt.n_seq < 1 || opt.n_seq > 65536) LFAIL("n_seq %d: expected 1..65536 sequences", opt.n_seq);
    if (opt.precision < 0 || opt.precision > MWQ_MAX_PLANES) LFAIL("precision %d: expected 0..%d", opt.precision,
                                                                    MWQ_MAX_PLANES);
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
    S->min_confidence = PREFETCH_MIN_CONFIDENCE;
    const char *mc = getenv("EDGEMOE_PREFETCH_MIN_CONF"); /* experiments: 0 .. 1 */
    if (mc) S->min_confidence = atof(mc);

    /* ---- experts: one storage for all, then the piece table ---- */
    static const char *const mats[3] = {"gate", "up", "down"};
    const emoe_tensor_info *first = NULL;
    char name[128];
    for (int l = 0; l < cfg->n_layers && !first; l++)
        for (int e = 0; e < m->layers[l].n_stored && m->layers[l].is_moe && !first; e++) {
            snprintf(name, sizeof name, "blk.%d.expert.%d.ffn_gate.weight", l, e);
            first = emoe_container_find(c, name);
        }
    if (S->n_stored_max > 0 && !first) LFAIL("%s: no expert tensors (blk.L.expert.E.ffn_gate.weight)", path);
    if (first) {
        S->mwq = first->dtype == EMOE_MWQ;
        if (!S->mwq && first->dtype != EMOE_F32 && first->dtype != EMOE_F16 && first->dtype != EMOE_Q8_0)
            LFAIL("%s: tensor '%s' is stored as %s, which the C core cannot run", path, first->name,
                  first->dtype_name);
        S->dtype = S->mwq ? TENSOR_MWQ : first->dtype;
        S->K = S->mwq ? first->n_planes : 1;
        S->base_bits = first->mwq_base_bits;
        S->group = first->mwq_group_size;
        if (S->K < 1 || S->K > MWQ_MAX_PLANES) LFAIL("%s: '%s' has %d planes, expected 1..%d", path, first->name, S->K,
                                                     MWQ_MAX_PLANES);
        if (S->K > EMOE_STATS_LEVELS) LFAIL("%s: %d planes per matrix (at most %d supported here)", path, S->K,
                                            EMOE_STATS_LEVELS);
        S->run = S->mwq ? (opt.precision ? opt.precision : S->K) : 1;
        if (S->mwq && S->run > S->K)
            LFAIL("precision %d: %s stores %d planes per expert matrix", opt.precision, path, S->K);
        if (!S->mwq && opt.precision) LFAIL("precision %d: %s stores no MWQ experts", opt.precision, path);
    }
    const int n_pieces = cfg->n_layers * S->n_stored_max * 3 * (S->K ? S->K : 1);
    desc = calloc((size_t)(n_pieces ? n_pieces : 1), sizeof(emoe_piece_desc));
    S->names = malloc((size_t)(n_pieces ? n_pieces : 1) / (size_t)(S->K ? S->K : 1) * 40 + 64);
    if (!desc || !S->names) goto nomem;
    size_t names_used = 0;
    uint64_t base_slot = 0, full_slot = 0, all_slots = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        const layer_weights *L = &m->layers[l];
        if (!L->is_moe) continue;
        for (int e = 0; e < L->n_stored; e++) {
            int used = !L->emap;
            for (int r = 0; L->emap && r < cfg->n_experts; r++) used |= L->emap[r] == e;
            uint64_t eb = 0, ef = 0;
            for (int mat = 0; mat < 3; mat++) {
                const int nl = snprintf(S->names + names_used, 40, "blk.%d.expert.%d.ffn_%s.weight", l, e, mats[mat]);
                const char *nm = S->names + names_used;
                names_used += (size_t)nl + 1;
                const emoe_tensor_info *t = emoe_container_find(c, nm);
                if (!t) {
                    if (used) LFAIL("%s: missing tensor '%s'", path, nm);
                    continue;
                }
                int64_t rows, cols;
                if (emoe_model_expected_shape(m, nm, &rows, &cols)) LFAIL("%s: %s", path, emoe_model_last_error(m));
                if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
                    LFAIL("%s: tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]", path, nm,
                          (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)rows,
                          (long long)cols);
                const int tm = t->dtype == EMOE_MWQ;
                if (tm != S->mwq || (!tm && t->dtype != S->dtype) ||
                    (tm && (t->n_planes != S->K || t->mwq_base_bits != S->base_bits ||
                            t->mwq_group_size != S->group)))
                    LFAIL("%s: tensor '%s' is stored differently from '%s' (%s); the streaming engine needs one "
                          "expert storage for the whole model", path, nm, first->name, t->dtype_name);
                S->expert_bytes += (int64_t)t->nbytes;
                for (int p = 0; p < S->K; p++) {
                    emoe_piece_desc *d = &desc[pid(S, l, e, mat, p)];
                    if (tm) *d = (emoe_piece_desc){t->planes[p].offset, t->planes[p].nbytes, t->planes[p].crc32, p, l, nm};
                    else *d = (emoe_piece_desc){t->offset, t->nbytes, t->crc32, 0, l, nm};
                    const uint64_t sb = emoe_cache_slot_bytes(d->nbytes);
                    if (p == 0) eb += sb;
                    if (p < S->run) ef += sb, all_slots += sb;
                }
                if (tm && emoe_mwq_plane_bytes(1, S->base_bits, S->group, rows, cols) != (int64_t)t->planes[0].nbytes)
                    LFAIL("%s: tensor '%s': plane 1 has %llu bytes, expected %lld", path, nm,
                          (unsigned long long)t->planes[0].nbytes,
                          (long long)emoe_mwq_plane_bytes(1, S->base_bits, S->group, rows, cols));
            }
            if (eb > base_slot) base_slot = eb;
            if (ef > full_slot) full_slot = ef;
        }
    }

    /* ---- dense tensors: layout of the resident copy ---- */
    const size_t nt = emoe_container_n_tensors(c);
    dense = calloc(nt ? nt : 1, sizeof(dense_item));
    if (!dense) goto nomem;
    size_t n_dense = 0, dense_size = 0;
    for (size_t i = 0; i < nt; i++) {
        const emoe_tensor_info *t = emoe_container_tensor(c, i);
        if (t->kind != EMOE_KIND_DENSE) continue;
        int64_t rows, cols;
        int pl = -1;
        if (is_predictor_name(t->name, &pl)) {
            if (pl < 0 || pl >= cfg->n_layers || !m->layers[pl].is_moe) continue;
            if (t->dtype != EMOE_F32 || t->ndim != 2 || t->shape[0] != cfg->n_experts || t->shape[1] != cfg->hidden)
                LFAIL("%s: predictor '%s' must be f32 [%d, %d]", path, t->name, cfg->n_experts, cfg->hidden);
        } else if (emoe_model_expected_shape(m, t->name, &rows, &cols)) {
            continue; /* not used by this config */
        }
        if (t->dtype != EMOE_F32 && t->dtype != EMOE_F16 && t->dtype != EMOE_Q8_0)
            LFAIL("%s: dense tensor '%s' is stored as %s, which the C core cannot run", path, t->name, t->dtype_name);
        dense_item *d = &dense[n_dense++];
        d->t = t;
        d->pred_layer = pl;
        const int64_t n_el = t->ndim == 1 ? t->shape[0] : 0;
        d->to_f32 = t->ndim == 1 && t->dtype == EMOE_F16;
        d->bytes = d->to_f32 ? (size_t)n_el * sizeof(float) : (size_t)t->nbytes;
        dense_size = (dense_size + 63) / 64 * 64;
        d->off = dense_size;
        dense_size += d->bytes + (d->to_f32 ? (size_t)t->nbytes : 0); /* f16 staging right after */
    }
    S->dense_bytes = (int64_t)dense_size;

    /* ---- the budget ---- */
    const int64_t kv_dim = (int64_t)cfg->n_kv_heads * cfg->head_dim;
    S->kv_bytes = 2 * (int64_t)opt.n_seq * cfg->n_layers * max_ctx * kv_dim * (kv_f16 ? 2 : 4);
    const size_t B = EMOE_BLOCK, H = (size_t)cfg->hidden, Kt = (size_t)cfg->top_k, NS = (size_t)S->n_stored_max;
    const size_t R = (size_t)(S->run ? S->run : 1), E = (size_t)cfg->n_experts, P = (size_t)S->n_pred;
    const size_t stream_scratch = NS * R * sizeof(emoe_hebf_item) + emoe_hebf_work_bytes((int)NS ? (int)NS : 1, (int)R) +
                                  NS * 3 * R * (sizeof(int) + sizeof(uint64_t)) + (NS + 1) * 8 * sizeof(int) + NS +
                                  B * Kt * (sizeof(int) + sizeof(float)) + B * Kt * H * sizeof(float) +
                                  B * H * sizeof(float) + B * E * sizeof(float) + 2 * B * P * (sizeof(int32_t) + 1) +
                                  (NS + 1) * sizeof(double) +
                                  (size_t)cfg->n_layers * sizeof(tensor_ref) + names_used + sizeof(*S);
    emoe_cache_config cc = {.path = path, .n_pieces = n_pieces, .pieces = desc, .io_threads = opt.io_threads,
                            .direct = opt.direct, .drop_cache = opt.drop_cache, .verify = opt.verify,
                            .n_groups = cfg->n_layers,
                            .policy = opt.mode == EMOE_MODE_ONDEMAND ? EMOE_EVICT_LRU : EMOE_EVICT_FREQ};
    const char *ev = getenv("EDGEMOE_EVICT"); /* experiments: lru, cyclic, freq */
    if (ev) cc.policy = !strcmp(ev, "lru") ? EMOE_EVICT_LRU : !strcmp(ev, "freq") ? EMOE_EVICT_FREQ : EMOE_EVICT_CYCLIC;
    S->scratch_bytes = (int64_t)(model_scratch_bytes(m, S->mwq) + stream_scratch + emoe_cache_overhead_bytes(&cc) +
                                 (size_t)(n_threads + opt.io_threads) * THREAD_STACK_ALLOWANCE);
    const int64_t min_cache = (int64_t)(base_slot * (uint64_t)cfg->top_k > full_slot ? base_slot * (uint64_t)cfg->top_k
                                                                                       : full_slot);
    const int64_t fixed = S->dense_bytes + S->kv_bytes + S->scratch_bytes;
    S->minimum = fixed + min_cache;
    S->budget = opt.budget_bytes > 0 ? opt.budget_bytes : 0;
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
        goto fail_budget;
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
    S->pre = calloc((size_t)cfg->n_layers, sizeof(tensor_ref));
    if (!S->pre) goto nomem;
    for (size_t i = 0; i < n_dense; i++) {
        const dense_item *d = &dense[i];
        const emoe_tensor_info *t = d->t;
        char *dst = (char *)S->dense + d->off;
        char *raw = d->to_f32 ? dst + d->bytes : dst;
        const int rc = read_all(fd, raw, t->nbytes, t->offset);
        if (rc) LFAIL("%s: reading tensor '%s' (offset %llu, %llu bytes) failed: %s", path, t->name,
                      (unsigned long long)t->offset, (unsigned long long)t->nbytes,
                      rc == -EIO ? "short read (truncated file?)" : strerror(-rc));
        if (opt.verify != EMOE_VERIFY_READS_NEVER && emoe_crc32_fast(0, raw, (size_t)t->nbytes) != t->crc32)
            LFAIL("%s: checksum mismatch in tensor '%s' (the file is damaged: re-export or re-download it)", path,
                  t->name);
        const int64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->ndim == 2 ? t->shape[1] : t->shape[0];
        int dtype = t->dtype;
        if (d->to_f32) {
            uint16_t *h = malloc((size_t)t->nbytes);
            if (!h) goto nomem;
            memcpy(h, raw, (size_t)t->nbytes);
            emoe_f16_to_f32(h, (float *)dst, cols);
            free(h);
            dtype = EMOE_F32;
        }
        if (d->pred_layer >= 0) {
            S->pre[d->pred_layer] = (tensor_ref){.data = dst, .dtype = EMOE_F32, .rows = rows, .cols = cols};
            continue;
        }
        if (emoe_model_set_tensor(m, t->name, dtype, dst, rows, cols)) LFAIL("%s: %s", path, emoe_model_last_error(m));
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
    S->pf_count = calloc(ns1, sizeof(int)), S->pf_best = calloc(ns1, sizeof(int)), S->yoff = calloc(ns1, sizeof(int)), S->gtok = calloc(ns1, sizeof(int));
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
    if (!S->items || !S->hebf_work || !S->ids || !S->keys || !S->starts || !S->nreq || !S->gexp || !S->pf_count || !S->pf_best || !S->yoff ||
        !S->gtok || !S->expert_group || !S->done || !S->etok || !S->ew || !S->ybuf || !S->xpre || !S->plog ||
        !S->pred || !S->ahead || !S->absent || !S->pf_miss)
        goto nomem;
    m->stream = S;
    m->stream_ops = &stream_ops;
    S = NULL; /* owned by the model now */
    if (m->stream->mwq && model_mwq_buffers(m)) goto nomem;
    if (emoe_model_ready(m)) LFAIL("%s: %s", path, emoe_model_last_error(m));
    free(desc);
    free(dense);
    return m;
nomem:
    if (err) snprintf(err, errlen, "%s: out of memory loading the model", path);
fail:
fail_budget:
    if (fd >= 0) close(fd);
    free(desc);
    free(dense);
    if (S) stream_free(S);
    emoe_model_free(m);
    return NULL;
}
#undef LFAIL
