/* Multi-head Latent Attention (DeepSeek-V2/V3), matching transformers' DeepseekV2Attention / DeepseekV3Attention.
 *
 * Per token (xa = attn_norm(x)):
 *   q       = wq xa, or wq_b(q_a_norm(wq_a xa))               (n_heads, qk_nope_dim + rope_dim)
 *   [c, kr] = wkv_a xa;  c = kv_a_norm(c);  kr = rope(kr)     c: kv_lora_rank values, kr: rope_dim (one for all heads)
 *   head h: k_h = [W_kb,h c, kr], v_h = W_vb,h c              (wkv_b's rows: per head qk_nope_dim key rows, then
 *                                                               v_head_dim value rows)
 * Only [c, kr] is cached. Scores and values are computed in the latent space ("absorbed"), so decoding never expands
 * the cache: q_h . k_h = [W_kb,h^T q_nope,h, rope(q_pe,h)] . [c, kr], and sum_p a_p v_h(p) = W_vb,h (sum_p a_p c_p).
 * The reassociation changes the rounding only (transformers expands; tests hold both within 1e-5). Every token's
 * result depends on its own row and the cache alone (no batch-dependent order), so a prefill equals token-by-token
 * decoding bit for bit. */
#include "mla.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define HEADS_PER_TASK 4 /* query heads scored together: they share every cache row they read */

struct mla_state {
    float *qa;     /* (B, q_lora_rank) wq_a xa, then normed */
    float *kva;    /* (B, kv_lora_rank + rope_dim) wkv_a xa, then [c normed | kr rotated] */
    float *qabs;   /* (B, n_heads, kv_lora_rank + rope_dim) each head's query in the latent space */
    float *lat;    /* (n_heads, B, kv_lora_rank) attention output in the latent space, head-major for wkv_b */
    float *out;    /* (B, n_heads * v_head_dim) the heads' values, wo's input */
    float *wkb;    /* (n_heads * qk_nope_dim, kv_lora_rank) wkv_b's key rows as f32 (weights stored f16 / q8_0) */
    float *scores; /* (threads, HEADS_PER_TASK, max_ctx) */
};

int mla_cache_dim(const emoe_config *c) { return c->kv_lora_rank + c->rope_dim; }

int mla_in_max(const emoe_config *c) {
    int n = c->q_lora_rank > c->kv_lora_rank ? c->q_lora_rank : c->kv_lora_rank;
    return n > c->n_heads * c->v_head_dim ? n : c->n_heads * c->v_head_dim;
}

/* Floats of each buffer, in struct order. */
static void sizes(const emoe_model *m, size_t n[7]) {
    const emoe_config *c = &m->cfg;
    const size_t B = EMOE_BLOCK, D = (size_t)mla_cache_dim(c), nh = (size_t)c->n_heads;
    n[0] = B * (size_t)c->q_lora_rank;
    n[1] = B * D;
    n[2] = B * nh * D;
    n[3] = nh * B * (size_t)c->kv_lora_rank;
    n[4] = B * nh * (size_t)c->v_head_dim;
    n[5] = nh * (size_t)c->qk_nope_dim * (size_t)c->kv_lora_rank;
    n[6] = (size_t)emoe_pool_threads(m->pool) * HEADS_PER_TASK * (size_t)m->max_ctx;
}

size_t mla_scratch_bytes(const emoe_model *m) {
    size_t n[7], total = sizeof(mla_state);
    sizes(m, n);
    for (int i = 0; i < 7; i++) total += (n[i] ? n[i] : 1) * sizeof(float);
    return total;
}

mla_state *mla_new(const emoe_model *m) {
    mla_state *st = calloc(1, sizeof(*st));
    if (!st) return NULL;
    size_t n[7];
    sizes(m, n);
    float **bufs[7] = {&st->qa, &st->kva, &st->qabs, &st->lat, &st->out, &st->wkb, &st->scores};
    for (int i = 0; i < 7; i++)
        if (!(*bufs[i] = calloc(n[i] ? n[i] : 1, sizeof(float)))) {
            mla_free(st);
            return NULL;
        }
    return st;
}

void mla_free(mla_state *st) {
    if (!st) return;
    free(st->qa), free(st->kva), free(st->qabs), free(st->lat), free(st->out), free(st->wkb), free(st->scores);
    free(st);
}

/* Rotate one rope_dim vector (the decoupled RoPE part) like forward.c's rope: NEOX pairs (j, j + d/2), NORM pairs
 * (2j, 2j+1) (DeepSeek's interleaved layout). cs: this token's (rope_dim/2, 2) cos, sin. */
static void rope_part(const emoe_config *c, float *v, const float *cs) {
    const int half = c->rope_dim / 2, neox = c->rope_kind == EMOE_ROPE_NEOX;
    for (int j = 0; j < half; j++) {
        const float co = cs[2 * j], si = cs[2 * j + 1];
        const int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * co - x1 * si;
        v[b] = x1 * co + x0 * si;
    }
}

/* Rows [r0, r0 + n) of a [rows, cols] matrix as f32: the stored rows themselves when f32, else converted into buf. */
static const float *rows_f32(const emoe_model *m, const tensor_ref *t, int64_t r0, int64_t n, float *buf) {
    const size_t rb = emoe_row_bytes(t->dtype, t->cols);
    const char *p = (const char *)t->data + (size_t)r0 * rb;
    if (t->dtype == EMOE_F32) return (const float *)p;
    for (int64_t r = 0; r < n; r++, p += rb) {
        float *dst = buf + (size_t)r * (size_t)t->cols;
        if (t->dtype == EMOE_F16) m->k->f16_to_f32((const uint16_t *)p, dst, t->cols);
        else emoe_dequantize_q8_0(p, dst, t->cols);
    }
    return buf;
}

typedef struct {
    emoe_model *m;
    int layer, n_tok;
} mla_ctx;

/* One task = one head h: qabs[t, h] = [W_kb,h^T q_nope(t, h), q_pe(t, h)] for every token of the block. */
static void absorb_task(void *arg, int h, int thread) {
    (void)thread;
    const mla_ctx *a = arg;
    emoe_model *m = a->m;
    const emoe_config *c = &m->cfg;
    mla_state *st = m->mla;
    const int nope = c->qk_nope_dim, KL = c->kv_lora_rank, D = mla_cache_dim(c), hd = c->head_dim;
    const float *wkb = rows_f32(m, &m->layers[a->layer].wkv_b, (int64_t)h * (nope + c->v_head_dim), nope,
                                st->wkb + (size_t)h * nope * KL);
    for (int t = 0; t < a->n_tok; t++) {
        const float *q = m->s.q + ((size_t)t * c->n_heads + h) * hd;
        float *qa = st->qabs + ((size_t)t * c->n_heads + h) * D;
        memset(qa, 0, (size_t)KL * sizeof(float));
        for (int i = 0; i < nope; i++) m->k->axpy_f32(q[i], wkb + (size_t)i * KL, qa, KL);
        memcpy(qa + KL, q + nope, (size_t)c->rope_dim * sizeof(float));
    }
}

/* One task = one token x HEADS_PER_TASK heads: scores of the absorbed queries against the token's cached rows
 * 0..pos, softmax, and the weighted sum of the rows' latents into lat. */
static void score_task(void *arg, int task, int thread) {
    const mla_ctx *a = arg;
    emoe_model *m = a->m;
    const emoe_config *c = &m->cfg;
    mla_state *st = m->mla;
    const int n_chunks = (c->n_heads + HEADS_PER_TASK - 1) / HEADS_PER_TASK;
    const int t = task / n_chunks, h0 = task % n_chunks * HEADS_PER_TASK;
    const int nh = c->n_heads - h0 < HEADS_PER_TASK ? c->n_heads - h0 : HEADS_PER_TASK;
    const int KL = c->kv_lora_rank, D = mla_cache_dim(c), n = m->s.pos[t] + 1;
    const size_t esz = m->kv_f16 ? 2 : 4, row_bytes = (size_t)D * esz;
    const char *rows = (const char *)m->key_cache + model_kv_row(m, m->s.slot[t], a->layer, 0) * esz;
    float *S = st->scores + (size_t)thread * HEADS_PER_TASK * (size_t)m->max_ctx; /* (nh, n) */
    const float *q = st->qabs + ((size_t)t * c->n_heads + h0) * D;
    m->k->matmul[m->kv_f16 ? EMOE_F16 : EMOE_F32](D, rows, row_bytes, q, (size_t)D * sizeof(float), S, (size_t)n, nh,
                                                  0, n);
    for (int h = 0; h < nh; h++) {
        float *sr = S + (size_t)h * n, mx = -INFINITY, sum = 0.0f;
        for (int p = 0; p < n; p++) {
            sr[p] *= c->attn_scale;
            mx = sr[p] > mx ? sr[p] : mx;
        }
        for (int p = 0; p < n; p++) sum += (sr[p] = expf(sr[p] - mx));
        for (int p = 0; p < n; p++) sr[p] /= sum;
        float *out = st->lat + ((size_t)(h0 + h) * EMOE_BLOCK + t) * KL;
        memset(out, 0, (size_t)KL * sizeof(float));
        for (int p = 0; p < n; p++) {
            const void *r = rows + (size_t)p * row_bytes;
            if (m->kv_f16) m->k->axpy_f16(sr[p], r, out, KL);
            else m->k->axpy_f32(sr[p], r, out, KL);
        }
    }
}

/* q (s->q) and the cache rows of the block's tokens. */
static void project(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    mla_state *st = m->mla;
    const int H = c->hidden, D = mla_cache_dim(c), KL = c->kv_lora_rank, hd = c->head_dim;
    const int q_dim = c->n_heads * hd;
    for (int t = 0; t < n_tok; t++)
        fwd_rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->attn_norm.data, H, c->norm_eps);
    const tensor_ref *first = L->wq_a.data ? &L->wq_a : &L->wq; /* both read xa: one dispatch */
    mm_job jobs[2] = {
        {.wtype = L->wkv_a.dtype, .w = L->wkv_a.data, .rows = L->wkv_a.rows, .y = st->kva, .ldy = (size_t)D},
        {.wtype = first->dtype, .w = first->data, .rows = first->rows, .y = L->wq_a.data ? st->qa : s->q,
         .ldy = (size_t)first->rows},
    };
    mm_run(m->pool, m->k, jobs, 2, s->xn, H, n_tok, s->qbuf, m->q8_f32_act);
    if (L->wq_a.data) {
        const int QL = c->q_lora_rank;
        for (int t = 0; t < n_tok; t++)
            fwd_rmsnorm(st->qa + (size_t)t * QL, st->qa + (size_t)t * QL, L->q_a_norm.data, QL, c->mla_norm_eps);
        fwd_matmul(m, &L->wq_b, st->qa, n_tok, s->q, (size_t)q_dim);
    }
    for (int t = 0; t < n_tok; t++) {
        const float *cs = s->rope_cs + (size_t)t * (c->rope_dim / 2) * 2;
        float *row = st->kva + (size_t)t * D;
        fwd_rmsnorm(row, row, L->kv_a_norm.data, KL, c->mla_norm_eps);
        rope_part(c, row + KL, cs);
        for (int h = 0; h < c->n_heads; h++) rope_part(c, s->q + (size_t)t * q_dim + (size_t)h * hd + c->qk_nope_dim, cs);
        /* the row goes to the cache; scores then read it back from there, so an f16 cache rounds prefill and decode
         * alike */
        const size_t off = model_kv_row(m, s->slot[t], l, s->pos[t]);
        if (m->kv_f16) m->k->f32_to_f16(row, (uint16_t *)m->key_cache + off, D);
        else memcpy((float *)m->key_cache + off, row, (size_t)D * sizeof(float));
    }
}

void mla_attention(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    mla_state *st = m->mla;
    const int H = c->hidden, V = c->v_head_dim, KL = c->kv_lora_rank;
    project(m, l, n_tok);
    mla_ctx a = {.m = m, .layer = l, .n_tok = n_tok};
    pool_run(m->pool, absorb_task, &a, c->n_heads);
    pool_run(m->pool, score_task, &a, n_tok * ((c->n_heads + HEADS_PER_TASK - 1) / HEADS_PER_TASK));
    /* head h's values: its v_head_dim rows of wkv_b on its latent outputs */
    const size_t rb = emoe_row_bytes(L->wkv_b.dtype, KL);
    for (int h = 0; h < c->n_heads; h++) {
        const int64_t r0 = (int64_t)h * (c->qk_nope_dim + V) + c->qk_nope_dim;
        const tensor_ref vb = {.data = (const char *)L->wkv_b.data + (size_t)r0 * rb, .dtype = L->wkv_b.dtype,
                               .rows = V, .cols = KL};
        fwd_matmul(m, &vb, st->lat + (size_t)h * EMOE_BLOCK * KL, n_tok, st->out + (size_t)h * V,
                   (size_t)c->n_heads * V);
    }
    fwd_matmul(m, &L->wo, st->out, n_tok, s->tmp, (size_t)H);
    for (size_t i = 0; i < (size_t)n_tok * H; i++) s->x[i] += s->tmp[i] * c->residual_scale;
}
