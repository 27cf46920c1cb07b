/* LFM2's short convolution layer and its rolling state (see shortconv.h). */
#include "shortconv.h"

#include <stdlib.h>
#include <string.h>

#include "model.h"

size_t conv_state_bytes(int n_layers, int taps, int hidden, int n_seq) {
    return taps > 1 ? (size_t)n_seq * (size_t)n_layers * (size_t)(taps - 1) * (size_t)hidden * sizeof(float) : 0;
}

int conv_state_alloc(emoe_conv_state *st, int n_layers, int taps, int hidden, int n_seq) {
    const size_t n = conv_state_bytes(n_layers, taps, hidden, n_seq);
    float *rows = NULL;
    if (n && !(rows = calloc(1, n))) return EMOE_ERR_NOMEM;
    free(st->rows);
    *st = (emoe_conv_state){.n_layers = n_layers, .taps = taps, .hidden = hidden, .n_seq = n_seq, .rows = rows};
    return EMOE_OK;
}

void conv_state_free(emoe_conv_state *st) {
    free(st->rows);
    memset(st, 0, sizeof(*st));
}

void conv_state_clear(emoe_conv_state *st, int seq) {
    if (!st->rows || seq < 0 || seq >= st->n_seq) return;
    const size_t per_seq = conv_state_bytes(st->n_layers, st->taps, st->hidden, 1);
    memset((char *)st->rows + (size_t)seq * per_seq, 0, per_seq);
}

/* The taps [hidden, taps] as f32 (the exporter may store them f16, or q8_0 when taps is a multiple of 32). */
static const float *taps_f32(emoe_model *m, const tensor_ref *w) {
    if (w->dtype == EMOE_F32) return w->data;
    float *out = m->s.conv_taps;
    const size_t row_bytes = emoe_row_bytes(w->dtype, w->cols);
    for (int64_t r = 0; r < w->rows; r++) {
        const char *p = (const char *)w->data + (size_t)r * row_bytes;
        if (w->dtype == EMOE_F16) m->k->f16_to_f32((const uint16_t *)p, out + r * w->cols, w->cols);
        else emoe_dequantize_q8_0(p, out + r * w->cols, w->cols);
    }
    return out;
}

void shortconv_forward(emoe_model *m, int l, int n_tok) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[l];
    run_state *s = &m->s;
    emoe_conv_state *st = &m->conv;
    const int H = c->hidden, K = c->conv_kernel, R = K - 1;
    for (int t = 0; t < n_tok; t++)
        fwd_rmsnorm(s->xn + (size_t)t * H, s->x + (size_t)t * H, L->attn_norm.data, H, c->norm_eps);
    fwd_matmul(m, &L->conv_in, s->xn, n_tok, s->conv_bcx, (size_t)3 * H);
    const float *w = taps_f32(m, &L->conv_w); /* w[i * K + k]: tap k of channel i; tap K-1 reads the current token */
    for (int t = 0; t < n_tok; t++) {
        float *u = s->conv_bcx + (size_t)t * 3 * H; /* B, then u = B * x in its place */
        const float *C = u + H, *x = u + 2 * (size_t)H;
        for (int i = 0; i < H; i++) u[i] *= x[i];
        const int pos = s->pos[t];
        const size_t state = (size_t)s->slot[t] * (size_t)st->n_layers + (size_t)L->conv_idx; /* its ring */
        float *ring = R ? st->rows + state * (size_t)R * (size_t)H : NULL;
        float *y = s->yg + (size_t)t * H;
        for (int i = 0; i < H; i++) {
            const float *wi = w + (size_t)i * K;
            float acc = wi[K - 1] * u[i];
            for (int j = 1; j <= R && j <= pos; j++) acc += wi[K - 1 - j] * ring[(size_t)((pos - j) % R) * H + i];
            y[i] = C[i] * acc;
        }
        if (R) memcpy(ring + (size_t)(pos % R) * H, u, (size_t)H * sizeof(float)); /* after the reads: it replaces
                                                                                     * position pos - R */
    }
    fwd_matmul(m, &L->conv_out, s->yg, n_tok, s->tmp, (size_t)H);
    const float rs = c->residual_scale;
    for (size_t i = 0; i < (size_t)n_tok * H; i++) s->x[i] += s->tmp[i] * rs;
}
