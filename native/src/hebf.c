/* HEBF load order for one layer (see hebf.h). The streaming engine that runs it: stream_forward.c; its loader:
 * stream_load.c. */
#include "hebf.h"

#include <stdlib.h>
#include <string.h>

#include "edgemoe.h"

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
