/* The forward pass: one function of the architecture description (emoe_config), matching Hugging Face transformers.
 *
 * Per layer (residual stream x, one block of T tokens; token t sits at position s.pos[t] of sequence slot s.slot[t]:
 * n_past .. n_past+T-1 of one sequence for a prefill, or one token of each of T distinct sequences for a batch
 * decode, whose experts then run once for all the sequences routed to them):
 *   h   = x + wo(attention(rope(qk_norm(wq xa + bq), wk xa + bk), wv xa + bv))   with xa = attn_norm(x)
 *   out = h + ffn(ffn_norm(h))
 * (a conv layer computes h with its short convolution instead: shortconv.c)
 * ffn is a dense MLP (dense_layers) or the MoE block: router logits W_r r (r = ffn_norm(h), or the layer input x for
 * router_input = layer_input), softmax or sigmoid over all experts, top-k by probability (+ score_bias, within the
 * topk_group best groups when n_group > 1; ties: lower index), optional renormalization, times routed_scaling; sum_k w_k expert_k(ffn_norm(h)) + shared expert (scaled by sigmoid(w_sh . ffn_norm(h))
 * when the layer has that gate vector). Optional tensors (biases, shared expert, its gate) are run when the layer has
 * them: the tensor table (tensor_table.c) states which a config has, and emoe_model_ready that they are all set. Each
 * expert runs over the tokens routed to them (gather, run, scatter-add; expert_weights() is the single lookup point);
 * when all routed rows fit the scratch (decode, small batches) the resident block runs every expert's gate/up in one
 * pool dispatch and every down in one more (moe_batched), else one expert at a time. The streaming block
 * (stream_forward.c) runs experts one at a time as they arrive; all three give the same bits.
 * All arithmetic is f32; only the KV cache (kv_f16) and the Q8_0 / MWQ activation quantization (unless q8_f32_act)
 * round further.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdlib.h>
#include <time.h>

#include "model.h"

/* ---- small f32 helpers (serial; the matmuls dominate) ---- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* HF RMSNorm: x * rsqrt(mean(x^2) + eps) * w, in f32 (the mean is accumulated in double); w NULL: no weight. */
static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    if (!w) {
        for (int i = 0; i < n; i++) out[i] = x[i] * r;
        return;
    }
    for (int i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* Each of n_tok rows of x (stride n) RMS-normalized by w in place (Gemma-4's block output norms). */
static void rmsnorm_rows(float *x, const tensor_ref *w, int n_tok, int n, float eps) {
    for (int t = 0; t < n_tok; t++) rmsnorm(x + (size_t)t * n, x + (size_t)t * n, w->data, n, eps);
}

static void embed_row(const emoe_kernels *k, const tensor_ref *t, int64_t row, float *out) {
    const char *p = (const char *)t->data + (size_t)row * emoe_row_bytes(t->dtype, t->cols);
    if (t->dtype == EMOE_F32) memcpy(out, p, (size_t)t->cols * sizeof(float));
    else if (t->dtype == EMOE_F16) k->f16_to_f32((const uint16_t *)p, out, t->cols);
    else emoe_dequantize_q8_0(p, out, t->cols);
}

static void matmul(emoe_model *m, const tensor_ref *w, const float *x, int n_tok, float *y, size_t ldy) {
    mm_job j = {.wtype = w->dtype, .w = w->data, .rows = w->rows, .y = y, .ldy = ldy};
    mm_run(m->pool, m->k, &j, 1, x, w->cols, n_tok, m->s.qbuf, m->q8_f32_act);
}

static void add_bias(float *y, const tensor_ref *b, int n_tok, int dim) {
    const float *bv = b->data;
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < dim; i++) y[(size_t)t * dim + i] += bv[i];
}

/* x += y * scale (Granite's residual_multiplier; scale 1 is exact, so other families are unchanged). */
static void add_residual(float *x, const float *y, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] += y[i] * scale;
}

/* ---- RoPE ---- */

/* inv_freq[j], j < rope_dim/2, like HF's f32 path: theta^-(2j/d); YaRN (HF _compute_yarn_parameters) blends it with
 * inv_freq / factor by a linear ramp over [low, high], the dims that turn beta_fast..beta_slow times in
 * yarn_orig_ctx positions (clamped to 0..d-1; floor/ceil when truncating). */
static void rope_inv_freq(const emoe_config *c, float *inv, int half) {
    const int d = c->rope_dim;
    double low = 0.0, high = 0.0;
    if (c->rope_scaling == EMOE_ROPE_SCALING_YARN) {
        const double lb = 2.0 * log((double)c->rope_theta), two_pi = 2.0 * 3.14159265358979323846;
        low = d * log(c->yarn_orig_ctx / (c->yarn_beta_fast * two_pi)) / lb;
        high = d * log(c->yarn_orig_ctx / (c->yarn_beta_slow * two_pi)) / lb;
        if (c->yarn_truncate) low = floor(low), high = ceil(high);
        low = low > 0.0 ? low : 0.0;
        high = high < d - 1 ? high : d - 1;
        if (low == high) high += 0.001; /* HF: prevent a singular ramp */
    }
    for (int j = 0; j < half; j++) {
        const float pos_freq = (float)pow((double)c->rope_theta, (double)((float)(2 * j) / (float)d));
        inv[j] = 1.0f / pos_freq;
        if (c->rope_scaling == EMOE_ROPE_SCALING_YARN) {
            float ramp = ((float)j - (float)low) / (float)(high - low);
            ramp = ramp < 0.0f ? 0.0f : ramp > 1.0f ? 1.0f : ramp;
            const float extra = 1.0f - ramp, interp = 1.0f / (c->rope_factor * pos_freq);
            inv[j] = interp * (1.0f - extra) + inv[j] * extra;
        }
    }
}

/* cos/sin for the block's positions (s.pos), computed like HF's f32 path: angle = f32(pos * inv_freq), then cos/sin
 * of that f32 angle, times rope_attn_factor (YaRN's attention scaling; 1 otherwise). cs: (T, rope_dim/2, 2). */
static void rope_tables(emoe_model *m, int n_tok) {
    const int half = m->cfg.rope_dim / 2;
    const float af = m->cfg.rope_attn_factor;
    float inv[EMOE_MAX_HEAD_DIM / 2];
    rope_inv_freq(&m->cfg, inv, half);
    for (int j = 0; j < half; j++) {
        for (int t = 0; t < n_tok; t++) {
            const float angle = (float)m->s.pos[t] * inv[j];
            float co = (float)cos((double)angle), si = (float)sin((double)angle);
            if (af != 1.0f) co *= af, si *= af;
            m->s.rope_cs[((size_t)t * half + j) * 2] = co;
            m->s.rope_cs[((size_t)t * half + j) * 2 + 1] = si;
        }
    }
}

/* Gemma-4's proportional RoPE of the full-attention layers: cs (T, angles, 2) for inv_freq[j] = theta^(-2j/d), j <
 * global_rope_angles, d = their head size (the other pairs turn by angle 0: left as they are). */
static void rope_tables_global(emoe_model *m, int n_tok) {
    const emoe_config *c = &m->cfg;
    const int n = c->global_rope_angles, d = c->global_head_dim ? c->global_head_dim : c->head_dim;
    const double theta = c->global_rope_theta > 0.0f ? c->global_rope_theta : c->rope_theta;
    for (int j = 0; j < n; j++) {
        const float inv = 1.0f / (float)pow(theta, (double)((float)(2 * j) / (float)d));
        for (int t = 0; t < n_tok; t++) {
            const float angle = (float)m->s.pos[t] * inv;
            m->s.rope_cs_g[((size_t)t * n + j) * 2] = (float)cos((double)angle);
            m->s.rope_cs_g[((size_t)t * n + j) * 2 + 1] = (float)sin((double)angle);
        }
    }
}

/* Rotate pairs (j, j + hd/2), j < n_angles, of each of n_heads heads of size hd (proportional RoPE). */
static void rope_global(float *vec, int n_heads, int hd, int n_angles, const float *cs) {
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * hd;
        for (int j = 0; j < n_angles; j++) {
            const float co = cs[2 * j], si = cs[2 * j + 1], x0 = v[j], x1 = v[j + hd / 2];
            v[j] = x0 * co - x1 * si;
            v[j + hd / 2] = x1 * co + x0 * si;
        }
    }
}

/* Rotate the first rope_dim dims of each head of one token's projection vec (n_heads x head_dim).
 * NEOX (HF rotate_half): pairs (j, j + rope_dim/2). NORM (GPT-J / llama.cpp "norm"): pairs (2j, 2j+1). */
static void rope(const emoe_config *c, float *vec, int n_heads, const float *cs) {
    const int half = c->rope_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + (size_t)h * c->head_dim;
        for (int j = 0; j < half; j++) {
            const float co = cs[2 * j], si = cs[2 * j + 1];
            const int a = c->rope_kind == EMOE_ROPE_NEOX ? j : 2 * j;
            const int b = c->rope_kind == EMOE_ROPE_NEOX ? j + half : 2 * j + 1;
            const float x0 = v[a], x1 = v[b];
            v[a] = x0 * co - x1 * si;
            v[b] = x1 * co + x0 * si;
        }
    }
}

/* ---- attention ---- */

typedef struct {
    emoe_model *m;
    int layer, swa;
} att_ctx;

/* The KV cache row of position pos of (attention) layer l in sequence slot slot, in elements. */
static size_t kv_row(const emoe_model *m, int slot, int l, int pos) { return model_kv_row(m, slot, l, pos); }

/* One task = one token x one KV head: scores of the group's query heads against positions lo..pos of the token's
 * sequence (the K rows are
 * streamed once for the whole group: they are the "weights" of a matmul whose "tokens" are the group's queries),
 * softmax, then the weighted sum of V rows. */
static void att_task(void *arg, int task, int thread) {
    const att_ctx *a = arg;
    emoe_model *m = a->m;
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[a->layer];
    const int t = task / L->n_kv, g = task % L->n_kv;
    const int grp = c->n_heads / L->n_kv, hd = L->hd, qd = c->n_heads * L->hd;
    const int pos = m->s.pos[t];
    const int lo = a->swa && pos - c->sliding_window + 1 > 0 ? pos - c->sliding_window + 1 : 0;
    const int n = pos - lo + 1;
    const size_t esz = m->kv_f16 ? 2 : 4;
    const size_t row_bytes = (size_t)m->kv_dim * esz;
    const size_t off = kv_row(m, m->s.slot[t], a->layer, lo) * esz + (size_t)g * hd * esz;
    const char *kb = (const char *)m->key_cache + off, *vb = (const char *)m->value_cache + off;
    float *S = m->s.scores + (size_t)thread * (size_t)grp * (size_t)m->max_ctx; /* (grp, n) */
    const float *qg = m->s.q + (size_t)t * qd + (size_t)g * grp * hd;
    m->k->matmul[m->kv_f16 ? EMOE_F16 : EMOE_F32](hd, kb, row_bytes, qg, (size_t)hd * sizeof(float), S, (size_t)n,
                                                  grp, 0, n);
    const float scale = c->attn_scale; /* 1/sqrt(hd) unless the arch gives one (Granite) */
    const float *sinks = m->layers[a->layer].sinks.data; /* gpt-oss: one more logit per head, in the sum only */
    for (int h = 0; h < grp; h++) {
        float *sr = S + (size_t)h * n;
        float mx = sinks ? sinks[g * grp + h] : -INFINITY;
        for (int p = 0; p < n; p++) {
            sr[p] *= scale;
            mx = sr[p] > mx ? sr[p] : mx;
        }
        float sum = sinks ? expf(sinks[g * grp + h] - mx) : 0.0f;
        for (int p = 0; p < n; p++) {
            sr[p] = expf(sr[p] - mx);
            sum += sr[p];
        }
        for (int p = 0; p < n; p++) sr[p] /= sum;
        float *out = m->s.att + (size_t)t * qd + (size_t)(g * grp + h) * hd;
        memset(out, 0, (size_t)hd * sizeof(float));
        for (int p = 0; p < n; p++) {
            const void *vr = vb + (size_t)p * row_bytes;
            if (m->kv_f16) m->k->axpy_f16(sr[p], vr, out, hd);
            else m->k->axpy_f32(sr[p], vr, out, hd);
        }
    }
}

static void attention(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    /* the layer's own sizes (Gemma-4's full-attention layers differ); q, k, v, att rows are packed at them */
    const int H = c->hidden, hd = L->hd, nkv = L->n_kv, qd = c->n_heads * hd, kvd = nkv * hd;
    for (int t = 0; t < n_tok; t++)
        rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->attn_norm.data, H, c->norm_eps);
    mm_job jobs[3] = {
        {.wtype = L->wq.dtype, .w = L->wq.data, .rows = L->wq.rows, .y = s->q, .ldy = (size_t)qd},
        {.wtype = L->wk.dtype, .w = L->wk.data, .rows = L->wk.rows, .y = s->k, .ldy = (size_t)kvd},
        {.wtype = L->wv.dtype, .w = L->wv.data, .rows = L->wv.rows, .y = s->v, .ldy = (size_t)kvd},
    };
    mm_run(m->pool, m->k, jobs, L->wv.data ? 3 : 2, s->xn, H, n_tok, s->qbuf, m->q8_f32_act);
    if (!L->wv.data) memcpy(s->v, s->k, (size_t)n_tok * kvd * sizeof(float)); /* global_k_eq_v: values = raw keys */
    if (L->bq.data) {
        add_bias(s->q, &L->bq, n_tok, qd);
        add_bias(s->k, &L->bk, n_tok, kvd);
        add_bias(s->v, &L->bv, n_tok, kvd);
    }
    for (int t = 0; t < n_tok; t++) {
        float *q = s->q + (size_t)t * qd, *k = s->k + (size_t)t * kvd, *v = s->v + (size_t)t * kvd;
        if (c->qk_norm == EMOE_QK_NORM_FULL) { /* OLMoE: over the whole projection, before splitting heads */
            rmsnorm(q, q, L->q_norm.data, qd, c->norm_eps);
            rmsnorm(k, k, L->k_norm.data, kvd, c->norm_eps);
        } else if (c->qk_norm == EMOE_QK_NORM_HEAD) { /* Qwen3: over each head */
            for (int h = 0; h < c->n_heads; h++)
                rmsnorm(q + (size_t)h * hd, q + (size_t)h * hd, L->q_norm.data, hd, c->norm_eps);
            for (int h = 0; h < nkv; h++)
                rmsnorm(k + (size_t)h * hd, k + (size_t)h * hd, L->k_norm.data, hd, c->norm_eps);
        }
        if (c->v_norm) /* Gemma-4: each value head RMS-normalized, no weight */
            for (int h = 0; h < nkv; h++) rmsnorm(v + (size_t)h * hd, v + (size_t)h * hd, NULL, hd, c->norm_eps);
        if (L->global && c->global_rope_angles) {
            const float *cs = s->rope_cs_g + (size_t)t * c->global_rope_angles * 2;
            rope_global(q, c->n_heads, hd, c->global_rope_angles, cs);
            rope_global(k, nkv, hd, c->global_rope_angles, cs);
        } else if (L->use_rope) {
            const float *cs = s->rope_cs + (size_t)t * (c->rope_dim / 2) * 2;
            rope(c, q, c->n_heads, cs);
            rope(c, k, c->n_kv_heads, cs);
        }
        /* append k, v to the cache; attention then reads the current tokens back from it, so with an f16 cache
         * prefill and decode see exactly the same (rounded) keys and values */
        const size_t pos_off = kv_row(m, s->slot[t], l, s->pos[t]);
        if (m->kv_f16) {
            m->k->f32_to_f16(k, (uint16_t *)m->key_cache + pos_off, kvd);
            m->k->f32_to_f16(v, (uint16_t *)m->value_cache + pos_off, kvd);
        } else {
            memcpy((float *)m->key_cache + pos_off, k, (size_t)kvd * sizeof(float));
            memcpy((float *)m->value_cache + pos_off, v, (size_t)kvd * sizeof(float));
        }
    }
    att_ctx a = {.m = m, .layer = l, .swa = L->swa};
    pool_run(m->pool, att_task, &a, n_tok * nkv);
    if (L->attn_gate.data) { /* Qwen3.5 / Next: att *= sigmoid(W_gate xa), per output dim (s->q is free now) */
        matmul(m, &L->attn_gate, s->xn, n_tok, s->q, (size_t)m->q_dim);
        for (size_t i = 0; i < (size_t)n_tok * m->q_dim; i++) s->att[i] *= 1.0f / (1.0f + expf(-s->q[i]));
    }
    matmul(m, &L->wo, s->att, n_tok, s->tmp, (size_t)H);
    if (L->bo.data) add_bias(s->tmp, &L->bo, n_tok, H);
    if (L->post_attn_norm.data) rmsnorm_rows(s->tmp, &L->post_attn_norm, n_tok, H, c->norm_eps);
    add_residual(s->x, s->tmp, (size_t)n_tok * H, c->residual_scale);
}

/* ---- feed-forward ---- */

/* Bias row `row` of a [rows, n] f32 tensor added to each of n_tok rows of y (n_tok, n). */
static void add_bias_row(float *y, const tensor_ref *b, int row, int n_tok, int n) {
    const float *bv = (const float *)b->data + (size_t)row * (size_t)n;
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < n; i++) y[(size_t)t * n + i] += bv[i];
}

/* hg[i] = act(hg[i]) * hu[i] for n values: SwiGLU, ReGLU, GeGLU (tanh) or gpt-oss's clamped SwiGLU. */
static void gate_act(const emoe_config *c, float *hg, const float *hu, size_t n) {
    if (c->activation == EMOE_ACT_SWIGLU)
        for (size_t i = 0; i < n; i++) hg[i] = hg[i] / (1.0f + expf(-hg[i])) * hu[i];
    else if (c->activation == EMOE_ACT_REGLU)
        for (size_t i = 0; i < n; i++) hg[i] = (hg[i] > 0.0f ? hg[i] : 0.0f) * hu[i];
    else if (c->activation == EMOE_ACT_GEGLU_TANH) /* gelu_pytorch_tanh(gate) * up */
        for (size_t i = 0; i < n; i++) {
            const float g = hg[i];
            hg[i] = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * hu[i];
        }
    else { /* gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha g) */
        const float lim = c->swiglu_limit, alpha = c->swiglu_alpha;
        for (size_t i = 0; i < n; i++) {
            const float g = hg[i] < lim ? hg[i] : lim;
            const float u = hu[i] < -lim ? -lim : hu[i] > lim ? lim : hu[i];
            hg[i] = (u + 1.0f) * (g / (1.0f + expf(-g * alpha)));
        }
    }
}

/* y (n_tok, H) = down(act(gate x + bg) * (up x + bu)) + bd, act = silu (SwiGLU), relu (ReGLU) or gpt-oss's clamped
 * SwiGLU; biases are row `brow` of the layer's expert bias tensors (bias NULL: none). x: (n_tok, H). MWQ matrices
 * run at k planes (0 = all stored). */
static void gated_ffn_b(emoe_model *m, const tensor_ref *gate, const tensor_ref *up, const tensor_ref *down,
                        const layer_weights *bias, int brow, const float *x, int n_tok, float *y, int k) {
    run_state *s = &m->s;
    const emoe_config *c = &m->cfg;
    const int F = (int)gate->rows;
    const tensor_ref *gu[2] = {gate, up};
    float *const hgu[2] = {s->hg, s->hu};
    model_matmuls(m, 2, gu, hgu, k, x, n_tok);
    if (bias) add_bias_row(s->hg, &bias->gate_b, brow, n_tok, F), add_bias_row(s->hu, &bias->up_b, brow, n_tok, F);
    gate_act(c, s->hg, s->hu, (size_t)n_tok * F);
    model_matmuls(m, 1, &down, &y, k, s->hg, n_tok);
    if (bias) add_bias_row(y, &bias->down_b, brow, n_tok, c->hidden);
}

static void gated_ffn(emoe_model *m, const tensor_ref *gate, const tensor_ref *up, const tensor_ref *down,
                      const float *x, int n_tok, float *y, int k) {
    gated_ffn_b(m, gate, up, down, NULL, 0, x, n_tok, y, k);
}

/* Stored expert e of layer l on x: its matrices with its biases (expert_bias). */
static void expert_ffn(emoe_model *m, int l, int e, const tensor_ref *gate, const tensor_ref *up,
                       const tensor_ref *down, const float *x, int n_tok, float *y, int k) {
    const layer_weights *L = &m->layers[l];
    gated_ffn_b(m, gate, up, down, L->gate_b.data ? L : NULL, e, x, n_tok, y, k);
}

/* s->logits_r (n_tok, E) = router(x) (+ its bias: gpt-oss). */
static void router_logits(emoe_model *m, int l, const float *x, int n_tok) {
    const layer_weights *L = &m->layers[l];
    matmul(m, &L->router, x, n_tok, m->s.logits_r, (size_t)m->cfg.n_experts);
    if (L->router_b.data) add_bias(m->s.logits_r, &L->router_b, n_tok, m->cfg.n_experts);
}

/* Group-limited routing (n_group > 1): keep the topk_group groups of consecutive experts with the best score (the sum
 * of a group's two best selection scores, or its best one; ties: lower group) and mask the others' sel to -inf.
 * gs: n_group floats of scratch. */
static void limit_groups(const emoe_config *c, float *sel, float *gs) {
    const int G = c->n_group, per = c->n_experts / G;
    for (int g = 0; g < G; g++) {
        const float *v = sel + (size_t)g * per;
        float a = -INFINITY, b = -INFINITY; /* best, second best */
        for (int i = 0; i < per; i++) {
            if (v[i] > a) b = a, a = v[i];
            else if (v[i] > b) b = v[i];
        }
        gs[g] = c->group_score == EMOE_GROUP_MAX ? a : a + b;
    }
    for (int j = 0; j < G - c->topk_group; j++) { /* drop the worst groups one by one (ties: the higher group) */
        int worst = -1;
        for (int g = 0; g < G; g++)
            if (!isnan(gs[g]) && (worst < 0 || gs[g] <= gs[worst])) worst = g;
        gs[worst] = NAN; /* dropped */
        for (int i = 0; i < per; i++) sel[(size_t)worst * per + i] = -INFINITY;
    }
}

/* Router probabilities -> top-k indices and weights per token, from s->logits_r (n_tok, E). Experts are chosen by
 * sel = prob (+ the layer's score_bias; limited to the best groups when n_group > 1) and weighted by prob
 * (renormalized if norm_topk, then times routed_scaling). Experts pruned by the merge map get probability 0
 * (logit -inf) and are never chosen (validate_config keeps at least top_k alive). */
static void route(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const int32_t *emap = m->layers[l].emap;
    const float *bias = m->layers[l].score_bias.data;
    run_state *s = &m->s;
    const int E = c->n_experts, K = c->top_k;
    float *sel = s->sel;
    for (int t = 0; t < n_tok; t++) {
        float *p = s->logits_r + (size_t)t * E;
        if (emap)
            for (int e = 0; e < E; e++)
                if (emap[e] < 0) p[e] = -INFINITY;
        if (c->router_fn == EMOE_ROUTER_SOFTMAX) {
            float mx = -INFINITY, sum = 0.0f;
            for (int e = 0; e < E; e++) mx = p[e] > mx ? p[e] : mx;
            for (int e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
            for (int e = 0; e < E; e++) p[e] /= sum;
        } else {
            for (int e = 0; e < E; e++) p[e] = 1.0f / (1.0f + expf(-p[e]));
        }
        for (int e = 0; e < E; e++) sel[e] = emap && emap[e] < 0 ? -INFINITY : bias ? p[e] + bias[e] : p[e];
        if (c->n_group > 1) limit_groups(c, sel, sel + E);
        int *idx = s->topk_idx + (size_t)t * K;
        float *w = s->topk_w + (size_t)t * K;
        float wsum = 0.0f;
        for (int j = 0; j < K; j++) { /* k is small: repeated arg-max, ties to the lower index */
            int best = -1;
            for (int e = 0; e < E; e++) {
                if (sel[e] == -INFINITY) continue; /* pruned, or outside the kept groups */
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= idx[i] == e;
                if (!taken && (best < 0 || sel[e] > sel[best])) best = e;
            }
            idx[j] = best;
            w[j] = p[best];
            wsum += w[j];
        }
        if (c->norm_topk)
            for (int j = 0; j < K; j++) w[j] /= wsum + c->norm_topk_eps;
        if (c->routed_scaling != 1.0f)
            for (int j = 0; j < K; j++) w[j] *= c->routed_scaling;
        if (emap)
            for (int j = 0; j < K; j++) idx[j] = emap[idx[j]]; /* routed -> stored expert */
    }
}

/* s->tmp += the shared expert (scaled by sigmoid(w_sh . x) when the layer has w_sh) on s->xn. */
static void shared_expert(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    const int H = c->hidden;
    if (L->sh_gate.data) {
        gated_ffn(m, &L->sh_gate, &L->sh_up, &L->sh_down, s->xn, n_tok, s->yg, 0);
        for (int t = 0; t < n_tok; t++) {
            const float *xt = s->xn + (size_t)t * H, *src = s->yg + (size_t)t * H;
            float *dst = s->tmp + (size_t)t * H;
            if (L->sh_gate_inp.data) {
                const float *wg = L->sh_gate_inp.data;
                float z = 0.0f;
                for (int d = 0; d < H; d++) z += wg[d] * xt[d];
                const float gsc = 1.0f / (1.0f + expf(-z));
                for (int d = 0; d < H; d++) dst[d] += gsc * src[d];
            } else {
                for (int d = 0; d < H; d++) dst[d] += src[d];
            }
        }
    }
}

/* The tokens routed to stored expert e into etok / ew (its summed weight per token); returns their number. */
static int expert_tokens(const emoe_model *m, int e, int n_tok, int *etok, float *ew) {
    const int K = m->cfg.top_k;
    int n_e = 0;
    for (int t = 0; t < n_tok; t++) {
        int hit = 0;
        float w = 0.0f; /* merged: the weights of all selected members of the group, summed in slot order */
        for (int j = 0; j < K; j++)
            if (m->s.topk_idx[(size_t)t * K + j] == e) hit = 1, w += m->s.topk_w[(size_t)t * K + j];
        if (hit) {
            etok[n_e] = t;
            ew[n_e++] = w;
        }
    }
    return n_e;
}

/* All routed experts at once (their gathered rows fit the scratch: decode, small batches): one dispatch for every
 * expert's gate and up, one for every down, instead of two per expert; each input quantized once (a decode token's
 * for all gate/up matrices). Per (row, token) the same kernels compute the same values, and the weighted sums run
 * in the same order (expert, then token) as the per-expert path, so the result is identical. Returns 0 (nothing
 * done) if the rows do not fit. */
static int moe_batched(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    const int H = c->hidden;
    enum { MAXE = 32 };
    int ex[MAXE], off[MAXE + 1], n_x = 0, rows = 0;
    for (int e = 0; e < L->n_stored; e++) {
        if (n_x == MAXE || rows + n_tok > EMOE_BLOCK) return 0; /* might not fit: the per-expert path */
        const int n_e = expert_tokens(m, e, n_tok, s->etok + rows, s->ew + rows);
        if (!n_e) continue;
        ex[n_x] = e, off[n_x++] = rows;
        rows += n_e;
    }
    off[n_x] = rows;
    if (!n_x) return 1;
    const int F = (int)expert_weights(m, l, ex[0]).gate->rows; /* every expert's (the tensor table's shapes) */
    model_mm mm[2 * MAXE];
    mm_input in[MAXE];
    in[0] = (mm_input){.x = s->xn, .n_tok = 1}; /* one decode token: every expert reads it, quantized once */
    for (int i = 0; i < n_x; i++) {
        const expert_mats em = expert_weights(m, l, ex[i]);
        const int n_e = off[i + 1] - off[i], xi = n_tok == 1 ? 0 : i;
        if (n_tok > 1) { /* gather the expert's tokens */
            float *xg = s->xg + (size_t)off[i] * H;
            for (int r = 0; r < n_e; r++)
                memcpy(xg + (size_t)r * H, s->xn + (size_t)s->etok[off[i] + r] * H, (size_t)H * sizeof(float));
            in[i] = (mm_input){.x = xg, .n_tok = n_e};
        }
        mm[2 * i] = (model_mm){.w = em.gate, .y = s->hg + (size_t)off[i] * F, .ldy = (size_t)F, .xi = xi, .k = em.k};
        mm[2 * i + 1] = (model_mm){.w = em.up, .y = s->hu + (size_t)off[i] * F, .ldy = (size_t)F, .xi = xi, .k = em.k};
    }
    model_matmuls_multi(m, 2 * n_x, mm, in, n_tok == 1 ? 1 : n_x);
    for (int i = 0; L->gate_b.data && i < n_x; i++) {
        const int n_e = off[i + 1] - off[i];
        add_bias_row(s->hg + (size_t)off[i] * F, &L->gate_b, ex[i], n_e, F);
        add_bias_row(s->hu + (size_t)off[i] * F, &L->up_b, ex[i], n_e, F);
    }
    gate_act(c, s->hg, s->hu, (size_t)rows * F);
    for (int i = 0; i < n_x; i++) {
        const expert_mats em = expert_weights(m, l, ex[i]);
        in[i] = (mm_input){.x = s->hg + (size_t)off[i] * F, .n_tok = off[i + 1] - off[i]};
        mm[i] = (model_mm){.w = em.down, .y = s->yg + (size_t)off[i] * H, .ldy = (size_t)H, .xi = i, .k = em.k};
    }
    model_matmuls_multi(m, n_x, mm, in, n_x);
    for (int i = 0; i < n_x; i++) {
        const int n_e = off[i + 1] - off[i];
        if (L->down_b.data) add_bias_row(s->yg + (size_t)off[i] * H, &L->down_b, ex[i], n_e, H);
        for (int r = off[i]; r < off[i + 1]; r++) {
            float *dst = s->tmp + (size_t)s->etok[r] * H;
            const float *src = s->yg + (size_t)r * H;
            for (int d = 0; d < H; d++) dst[d] += s->ew[r] * src[d];
        }
    }
    return 1;
}

static void moe(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    const int H = c->hidden;
    if (c->router_input == EMOE_ROUTER_IN_FFN_NORM) router_logits(m, l, s->xn, n_tok);
    route(m, l, n_tok);
    memset(s->tmp, 0, (size_t)n_tok * H * sizeof(float));
    if (moe_batched(m, l, n_tok)) {
        shared_expert(m, l, n_tok);
        return;
    }
    for (int e = 0; e < L->n_stored; e++) {
        const int n_e = expert_tokens(m, e, n_tok, s->etok, s->ew);
        if (!n_e) continue;
        for (int i = 0; i < n_e; i++)
            memcpy(s->xg + (size_t)i * H, s->xn + (size_t)s->etok[i] * H, (size_t)H * sizeof(float));
        const expert_mats em = expert_weights(m, l, e);
        expert_ffn(m, l, e, em.gate, em.up, em.down, s->xg, n_e, s->yg, em.k);
        for (int i = 0; i < n_e; i++) {
            float *dst = s->tmp + (size_t)s->etok[i] * H;
            const float *src = s->yg + (size_t)i * H;
            for (int d = 0; d < H; d++) dst[d] += s->ew[i] * src[d];
        }
    }
    shared_expert(m, l, n_tok);
}

/* ---- one block of tokens ---- */

/* The routed experts of layer l on s->xn (resident, or from the expert cache under a budget) into s->tmp. */
static int moe_block(emoe_model *m, int l, int n_tok) {
    if (m->stream) return m->stream_ops->moe(m, l, n_tok);
    moe(m, l, n_tok);
    return EMOE_OK;
}

/* router_input = residual_norm (Gemma-4): s->logits_r = the router on s->x RMS-normalized without a weight (its scales
 * are folded into the router); s->xn is scratch. The other inputs are routed in moe() / before attention. */
static void residual_router(emoe_model *m, int l, int n_tok) {
    const int H = m->cfg.hidden;
    if (m->cfg.router_input != EMOE_ROUTER_IN_RESIDUAL_NORM) return;
    for (int t = 0; t < n_tok; t++)
        rmsnorm(m->s.xn + (size_t)t * H, m->s.x + (size_t)t * H, NULL, H, m->cfg.norm_eps);
    router_logits(m, l, m->s.xn, n_tok);
}

/* Gemma-4's feed-forward block on the post-attention residual s->x: the dense MLP and the MoE block side by side,
 * s->tmp = mlp_post_norm(mlp(ffn_norm(x))) + moe_post_norm(moe(moe_pre_norm(x))). */
static int beside_moe(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    const int H = c->hidden;
    for (int t = 0; t < n_tok; t++)
        rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->ffn_norm.data, H, c->norm_eps);
    gated_ffn(m, &L->mlp_gate, &L->mlp_up, &L->mlp_down, s->xn, n_tok, s->dense_y, 0);
    rmsnorm_rows(s->dense_y, &L->mlp_post_norm, n_tok, H, c->norm_eps);
    residual_router(m, l, n_tok);
    for (int t = 0; t < n_tok; t++)
        rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->moe_pre_norm.data, H, c->norm_eps);
    const int st = moe_block(m, l, n_tok);
    if (st) return st;
    rmsnorm_rows(s->tmp, &L->moe_post_norm, n_tok, H, c->norm_eps);
    for (size_t i = 0; i < (size_t)n_tok * H; i++) s->tmp[i] = s->dense_y[i] + s->tmp[i];
    return EMOE_OK;
}

static int forward_block(emoe_model *m, const int32_t *tokens, int n_tok, float *logits, int all_logits) {
    const emoe_config *c = &m->cfg;
    run_state *s = &m->s;
    const int H = c->hidden;
    for (int t = 0; t < n_tok; t++) embed_row(m->k, &m->embed, tokens[t], s->x + (size_t)t * H);
    if (c->embed_scale != 1.0f)
        for (size_t i = 0; i < (size_t)n_tok * H; i++) s->x[i] *= c->embed_scale;
    rope_tables(m, n_tok);
    if (c->global_rope_angles) rope_tables_global(m, n_tok);
    for (int l = 0; l < c->n_layers; l++) {
        const layer_weights *L = &m->layers[l];
        if (L->is_moe && c->router_input == EMOE_ROUTER_IN_LAYER_INPUT) /* SmallThinker: before attention */
            router_logits(m, l, s->x, n_tok);
        if (L->is_moe && m->stream) m->stream_ops->before_attention(m, l, n_tok); /* prefetch this layer's experts */
        if (L->is_linear) deltanet_forward(m, l, n_tok); /* Gated DeltaNet instead of attention (deltanet.c) */
        else if (L->conv_idx >= 0) shortconv_forward(m, l, n_tok);
        else if (c->kv_lora_rank) mla_attention(m, l, n_tok); /* mla.c */
        else attention(m, l, n_tok);
        if (L->is_moe && c->dense_beside_moe) {
            const int st = beside_moe(m, l, n_tok);
            if (st) return st;
        } else {
            if (L->is_moe) residual_router(m, l, n_tok);
            for (int t = 0; t < n_tok; t++)
                rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->ffn_norm.data, H, c->norm_eps);
            if (L->is_moe) {
                const int st = moe_block(m, l, n_tok);
                if (st) return st;
            } else
                gated_ffn(m, &L->mlp_gate, &L->mlp_up, &L->mlp_down, s->xn, n_tok, s->tmp, 0);
        }
        if (L->post_ffn_norm.data) rmsnorm_rows(s->tmp, &L->post_ffn_norm, n_tok, H, c->norm_eps);
        add_residual(s->x, s->tmp, (size_t)n_tok * H, c->residual_scale);
        if (L->layer_scale.data) { /* Gemma-4: the whole residual stream times the layer's scalar */
            const float sc = *(const float *)L->layer_scale.data;
            for (size_t i = 0; i < (size_t)n_tok * H; i++) s->x[i] *= sc;
        }
    }
    if (!logits) return EMOE_OK;
    const int first = all_logits ? 0 : n_tok - 1, n_out = n_tok - first;
    for (int t = first; t < n_tok; t++)
        rmsnorm(s->xn + (size_t)(t - first) * H, s->x + (size_t)t * H, m->final_norm.data, H, c->norm_eps);
    const tensor_ref *head = m->lm_head.data ? &m->lm_head : &m->embed;
    matmul(m, head, s->xn, n_out, logits, (size_t)c->vocab);
    if (c->logit_divisor != 1.0f) /* Granite's logits_scaling: a division, as transformers does it */
        for (size_t i = 0; i < (size_t)n_out * (size_t)c->vocab; i++) logits[i] /= c->logit_divisor;
    if (c->logit_softcap > 0.0f) /* Gemma: cap * tanh(logits / cap) */
        for (size_t i = 0; i < (size_t)n_out * (size_t)c->vocab; i++)
            logits[i] = tanhf(logits[i] / c->logit_softcap) * c->logit_softcap;
    return EMOE_OK;
}

/* One block whose s.pos / s.slot are set, timed for the streaming statistics. */
static int run_block(emoe_model *m, const int32_t *tokens, int n, float *logits, int all_logits) {
    const double t0 = m->stream ? now_s() : 0.0;
    const int st = forward_block(m, tokens, n, logits, all_logits);
    if (m->stream) m->stream_ops->forward_done(m, st ? 0 : n, now_s() - t0);
    return st;
}

static int check_tokens(emoe_model *m, const char *what, const int32_t *tokens, int n_tokens) {
    if (n_tokens < 0 || (n_tokens > 0 && !tokens))
        return model_error(m, EMOE_ERR_ARG, "%s: bad tokens (n_tokens=%d)", what, n_tokens);
    const int st = emoe_model_ready(m);
    if (st) return st;
    for (int i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab)
            return model_error(m, EMOE_ERR_ARG, "token %d at index %d is outside the vocabulary 0..%d", (int)tokens[i],
                               i, m->cfg.vocab - 1);
    return EMOE_OK;
}

int emoe_forward_seq(emoe_model *m, int seq, const int32_t *tokens, int n_tokens, float *logits_out, int all_logits) {
    if (!m) return EMOE_ERR_ARG;
    int st = model_check_seq(m, "emoe_forward", seq);
    if (st || (st = check_tokens(m, "emoe_forward", tokens, n_tokens))) return st;
    if (n_tokens > m->max_ctx - m->n_past[seq])
        return model_error(m, EMOE_ERR_CTX, "context full: sequence %d holds %d positions + %d new > max_ctx %d", seq,
                           m->n_past[seq], n_tokens, m->max_ctx);
    for (int b = 0; b < n_tokens; b += EMOE_BLOCK) {
        const int n = n_tokens - b < EMOE_BLOCK ? n_tokens - b : EMOE_BLOCK;
        float *out = NULL;
        if (logits_out && all_logits) out = logits_out + (size_t)b * (size_t)m->cfg.vocab;
        else if (logits_out && b + n == n_tokens) out = logits_out;
        for (int t = 0; t < n; t++) m->s.pos[t] = m->n_past[seq] + t, m->s.slot[t] = seq;
        if ((st = run_block(m, tokens + b, n, out, all_logits))) { /* n_past stays: the block's KV entries are
                                                                      * overwritten by the next call */
            if (m->dn.n_lin) m->n_past[seq] = 0; /* but a recurrent state has moved on: the sequence starts over */
            return st;
        }
        m->n_past[seq] += n;
    }
    return EMOE_OK;
}

int emoe_forward(emoe_model *m, const int32_t *tokens, int n_tokens, float *logits_out, int all_logits) {
    return emoe_forward_seq(m, 0, tokens, n_tokens, logits_out, all_logits);
}

int emoe_forward_batch(emoe_model *m, const int32_t *tokens, const int32_t *seqs, int n, float *logits_out) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    if (n < 0 || (n > 0 && !seqs)) return model_error(m, EMOE_ERR_ARG, "emoe_forward_batch: bad seqs (n=%d)", n);
    int st = check_tokens(m, "emoe_forward_batch", tokens, n);
    if (st) return st;
    for (int i = 0; i < n; i++) {
        if ((st = model_check_seq(m, "emoe_forward_batch", seqs[i]))) return st;
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i])
                return model_error(m, EMOE_ERR_ARG, "emoe_forward_batch: sequence %d appears twice (at %d and %d); a "
                                   "batch takes one token of each of distinct sequences", (int)seqs[i], j, i);
        if (m->n_past[seqs[i]] >= m->max_ctx)
            return model_error(m, EMOE_ERR_CTX, "context full: sequence %d holds max_ctx = %d positions",
                               (int)seqs[i], m->max_ctx);
    }
    for (int b = 0; b < n; b += EMOE_BLOCK) {
        const int nb = n - b < EMOE_BLOCK ? n - b : EMOE_BLOCK;
        for (int t = 0; t < nb; t++) m->s.pos[t] = m->n_past[seqs[b + t]], m->s.slot[t] = seqs[b + t];
        float *out = logits_out ? logits_out + (size_t)b * (size_t)m->cfg.vocab : NULL;
        if ((st = run_block(m, tokens + b, nb, out, 1))) { /* no sequence advances */
            for (int i = 0; m->dn.n_lin && i < n; i++) m->n_past[seqs[i]] = 0; /* recurrent states moved: restart */
            return st;
        }
    }
    for (int i = 0; i < n; i++) m->n_past[seqs[i]]++;
    return EMOE_OK;
}

/* ---- building blocks for the streaming MoE block (stream_forward.c) ---- */

void fwd_rmsnorm(float *out, const float *x, const float *w, int n, float eps) { rmsnorm(out, x, w, n, eps); }
void fwd_matmul(emoe_model *m, const tensor_ref *w, const float *x, int n_tok, float *y, size_t ldy) {
    matmul(m, w, x, n_tok, y, ldy);
}
void fwd_route(emoe_model *m, int l, int n_tok) { route(m, l, n_tok); }
void fwd_gated_ffn(emoe_model *m, const tensor_ref *gate, const tensor_ref *up, const tensor_ref *down, const float *x,
                   int n_tok, float *y, int k) {
    gated_ffn(m, gate, up, down, x, n_tok, y, k);
}
void fwd_shared_expert(emoe_model *m, int l, int n_tok) { shared_expert(m, l, n_tok); }
void fwd_expert_ffn(emoe_model *m, int l, int e, const tensor_ref *gate, const tensor_ref *up, const tensor_ref *down,
                    const float *x, int n_tok, float *y, int k) {
    expert_ffn(m, l, e, gate, up, down, x, n_tok, y, k);
}
void fwd_router_logits(emoe_model *m, int l, const float *x, int n_tok) { router_logits(m, l, x, n_tok); }
