/* The streaming engine's state, shared by its forward hooks (stream_forward.c) and its loader (stream_load.c). */
#ifndef EDGEMOE_STREAM_H
#define EDGEMOE_STREAM_H
#include <stdint.h>

#include "edgemoe.h"
#include "expert_cache.h"
#include "hebf.h"
#include "model.h"

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
#define PREFETCH_MIN_CONFIDENCE 0.5 /* emoe_stream_options_init's prefetch_min_confidence */
#define THREAD_STACK_ALLOWANCE ((size_t)256 << 10) /* touched stack per thread, counted against the budget */

static inline uint64_t mkkey(int cls, uint64_t seq, uint64_t rank) {
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

static inline int pid(const emoe_stream *S, int l, int e, int mat, int p) {
    return ((l * S->n_stored_max + e) * 3 + mat) * S->K + p;
}

/* The model's stream hooks (stream_forward.c). */
extern const emoe_stream_ops stream_ops;
/* Free a stream and everything it holds (joins the cache's I/O threads first); NULL is a no-op. */
void stream_free(emoe_stream *S);

#endif
