/* Gated DeltaNet linear attention (see deltanet.h), matching transformers' Qwen3_5MoeGatedDeltaNet in f32: the
 * token-by-token (recurrent) form of the gated delta rule for prefill and decode alike, so both give the same bits. */
#include "deltanet.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

int deltanet_conv_dim(const emoe_config *c) {
    return 2 * c->linear_k_heads * c->linear_k_dim + c->linear_v_heads * c->linear_v_dim;
}

static size_t conv_elems(const emoe_config *c) { /* one layer of one slot */
    return (size_t)(c->linear_conv - 1) * (size_t)deltanet_conv_dim(c);
}
static size_t rec_elems(const emoe_config *c) {
    return (size_t)c->linear_v_heads * (size_t)c->linear_k_dim * (size_t)c->linear_v_dim;
}

size_t deltanet_state_bytes(const emoe_config *c, int n_lin, int n_seq) {
    if (!n_lin) return 0;
    return (size_t)n_seq * (size_t)n_lin * (conv_elems(c) + rec_elems(c)) * sizeof(float);
}

size_t deltanet_scratch_bytes(const emoe_config *c, int n_lin, int block) {
    if (!n_lin) return 0;
    const size_t v = (size_t)c->linear_v_heads * (size_t)c->linear_v_dim;
    return (size_t)block * ((size_t)deltanet_conv_dim(c) + 2 * v + 2 * (size_t)c->linear_v_heads) * sizeof(float);
}

int deltanet_alloc_state(deltanet_state *d, const emoe_config *c, int n_lin, int n_seq, int block) {
    if (!n_lin) return EMOE_OK;
    const size_t B = (size_t)block, v = (size_t)c->linear_v_heads * (size_t)c->linear_v_dim;
    if (!d->qkv) {
        d->qkv = calloc(B * (size_t)deltanet_conv_dim(c), sizeof(float));
        d->z = calloc(B * v, sizeof(float));
        d->ba = calloc(B * 2 * (size_t)c->linear_v_heads, sizeof(float));
        d->out = calloc(B * v, sizeof(float));
        if (!d->qkv || !d->z || !d->ba || !d->out) return EMOE_ERR_NOMEM;
    }
    const size_t nc = (size_t)n_seq * (size_t)n_lin * conv_elems(c), nr = (size_t)n_seq * (size_t)n_lin * rec_elems(c);
    float *conv = calloc(nc ? nc : 1, sizeof(float)), *rec = calloc(nr, sizeof(float));
    if (!conv || !rec) {
        free(conv), free(rec);
        return EMOE_ERR_NOMEM;
    }
    free(d->conv), free(d->rec);
    d->conv = conv, d->rec = rec, d->n_lin = n_lin, d->n_seq = n_seq;
    return EMOE_OK;
}

void deltanet_free(deltanet_state *d) {
    free(d->conv), free(d->rec), free(d->qkv), free(d->z), free(d->ba), free(d->out);
    memset(d, 0, sizeof(*d));
}

static float silu(float x) { return x / (1.0f + expf(-x)); }
static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); } /* torch's threshold 20 */

/* x * rsqrt(sum(x^2) + 1e-6) * scale over n values (transformers' l2norm, as the FLA kernels use it). */
static void l2norm(float *x, int n, float scale) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float r = 1.0f / sqrtf((float)ss + 1e-6f);
    for (int i = 0; i < n; i++) x[i] = x[i] * r * scale;
}

/* The causal depthwise conv of one token's projection row (in place, then SiLU); win: the slot's last taps-1 inputs
 * (oldest first), shifted by one. w: [channels, taps]. */
static void conv_step(float *row, float *win, const float *w, int channels, int taps) {
    for (int ch = 0; ch < channels; ch++) {
        const float *wc = w + (size_t)ch * taps;
        float y = 0.0f;
        for (int j = 0; j < taps - 1; j++) y += wc[j] * win[(size_t)j * channels + ch];
        y += wc[taps - 1] * row[ch];
        for (int j = 0; j + 1 < taps - 1; j++) win[(size_t)j * channels + ch] = win[(size_t)(j + 1) * channels + ch];
        if (taps > 1) win[(size_t)(taps - 2) * channels + ch] = row[ch];
        row[ch] = silu(y);
    }
}

typedef struct {
    emoe_model *m;
    const layer_weights *L;
    float *S;           /* the token's slot: its recurrent state of this layer */
    const float *qkv;   /* the token's conv output (q and k normalized) */
    const float *beta;  /* [V] */
    const float *decay; /* [V] exp(g) */
    float *o, *z;       /* [V * dv]: o scratch; z in: the gate, out: the gated-norm output */
} head_ctx;

/* One value head: the delta-rule update of S_h, its read-out, then the gated RMSNorm. */
static void head_task(void *arg, int h, int thread) {
    (void)thread;
    const head_ctx *a = arg;
    const emoe_config *c = &a->m->cfg;
    const int dk = c->linear_k_dim, dv = c->linear_v_dim, KH = c->linear_k_heads;
    const int kh = h / (c->linear_v_heads / KH);
    const float *q = a->qkv + (size_t)kh * dk, *k = a->qkv + (size_t)(KH + kh) * dk;
    const float *v = a->qkv + (size_t)2 * KH * dk + (size_t)h * dv;
    float *S = a->S + (size_t)h * dk * dv, *o = a->o + (size_t)h * dv, *z = a->z + (size_t)h * dv;
    const float dec = a->decay[h], beta = a->beta[h];
    for (int j = 0; j < dv; j++) o[j] = 0.0f;
    for (int i = 0; i < dk; i++) { /* S *= exp(g); o = S^T k (the memory's prediction of v) */
        float *Si = S + (size_t)i * dv;
        for (int j = 0; j < dv; j++) {
            Si[j] *= dec;
            o[j] += Si[j] * k[i];
        }
    }
    for (int j = 0; j < dv; j++) o[j] = (v[j] - o[j]) * beta; /* delta */
    for (int i = 0; i < dk; i++) {
        float *Si = S + (size_t)i * dv;
        for (int j = 0; j < dv; j++) Si[j] += k[i] * o[j];
    }
    for (int j = 0; j < dv; j++) o[j] = 0.0f;
    for (int i = 0; i < dk; i++) {
        const float *Si = S + (size_t)i * dv;
        for (int j = 0; j < dv; j++) o[j] += Si[j] * q[i];
    }
    double ss = 0.0; /* gated RMSNorm: rmsnorm(o) * w * silu(z) */
    for (int j = 0; j < dv; j++) ss += (double)o[j] * (double)o[j];
    const float r = 1.0f / sqrtf((float)(ss / dv) + c->norm_eps);
    const float *w = a->L->la_norm.data;
    for (int j = 0; j < dv; j++) z[j] = (o[j] * r) * w[j] * silu(z[j]);
}

void deltanet_forward(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    deltanet_state *d = &m->dn;
    const int H = c->hidden, V = c->linear_v_heads, C = deltanet_conv_dim(c), taps = c->linear_conv;
    const int KH = c->linear_k_heads, dk = c->linear_k_dim, vdim = V * c->linear_v_dim;
    for (int t = 0; t < n_tok; t++)
        fwd_rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->attn_norm.data, H, c->norm_eps);
    mm_job jobs[4] = {
        {.wtype = L->la_qkv.dtype, .w = L->la_qkv.data, .rows = L->la_qkv.rows, .y = d->qkv, .ldy = (size_t)C},
        {.wtype = L->la_z.dtype, .w = L->la_z.data, .rows = L->la_z.rows, .y = d->z, .ldy = (size_t)vdim},
        {.wtype = L->la_b.dtype, .w = L->la_b.data, .rows = V, .y = d->ba, .ldy = (size_t)2 * V},
        {.wtype = L->la_a.dtype, .w = L->la_a.data, .rows = V, .y = d->ba + V, .ldy = (size_t)2 * V},
    };
    mm_run(m->pool, m->k, jobs, 4, s->xn, H, n_tok, s->qbuf, m->q8_f32_act);
    const float *alog = L->la_a_log.data, *dt = L->la_dt.data;
    const float qscale = 1.0f / sqrtf((float)dk);
    for (int t = 0; t < n_tok; t++) { /* in order: a token reads the state its predecessor left */
        const size_t cell = (size_t)s->slot[t] * (size_t)d->n_lin + (size_t)L->lin_idx;
        float *win = d->conv + cell * conv_elems(c), *S = d->rec + cell * rec_elems(c);
        if (s->pos[t] == 0) { /* a fresh sequence: no history */
            memset(win, 0, conv_elems(c) * sizeof(float));
            memset(S, 0, rec_elems(c) * sizeof(float));
        }
        float *row = d->qkv + (size_t)t * C, *ba = d->ba + (size_t)t * 2 * V;
        conv_step(row, win, L->la_conv.data, C, taps);
        for (int h = 0; h < KH; h++) {
            l2norm(row + (size_t)h * dk, dk, qscale);
            l2norm(row + (size_t)(KH + h) * dk, dk, 1.0f);
        }
        for (int h = 0; h < V; h++) {
            ba[h] = sigmoid(ba[h]);                                         /* beta */
            ba[V + h] = expf(-expf(alog[h]) * softplus(ba[V + h] + dt[h])); /* exp(g) */
        }
        head_ctx a = {.m = m, .L = L, .S = S, .qkv = row, .beta = ba, .decay = ba + V,
                      .o = d->out + (size_t)t * vdim, .z = d->z + (size_t)t * vdim};
        pool_run(m->pool, head_task, &a, V);
    }
    fwd_matmul(m, &L->la_out, d->z, n_tok, s->tmp, (size_t)H);
    for (size_t i = 0; i < (size_t)n_tok * H; i++) s->x[i] += s->tmp[i] * c->residual_scale;
}
