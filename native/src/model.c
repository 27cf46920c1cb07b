/* Model lifetime: config validation, buffers, KV cache, thread pool, tensor registration by container name, errors. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "tensor_table.h"

int model_error(emoe_model *m, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->err, sizeof(m->err), fmt, ap);
    va_end(ap);
    return code;
}

static int in_list(const int32_t *list, int n, int layer) {
    for (int i = 0; i < n; i++)
        if (list[i] == layer) return 1;
    return 0;
}

static int check_list(emoe_model *m, const char *what, const int32_t *list, int n) {
    if (n < 0 || (n > 0 && !list)) return model_error(m, EMOE_ERR_ARG, "config: %s: bad list (n=%d)", what, n);
    for (int i = 0; i < n; i++)
        if (list[i] < 0 || list[i] >= m->cfg.n_layers)
            return model_error(m, EMOE_ERR_ARG, "config: %s contains layer %d, outside 0..%d", what, (int)list[i],
                               (int)m->cfg.n_layers - 1);
    return EMOE_OK;
}

static int validate_config(emoe_model *m, const emoe_config *c, int max_ctx, int n_threads) {
#define REQUIRE(cond, ...)                                                                                            \
    do {                                                                                                              \
        if (!(cond)) return model_error(m, EMOE_ERR_ARG, __VA_ARGS__);                                                \
    } while (0)
    REQUIRE(c->n_layers > 0 && c->hidden > 0 && c->vocab > 0 && c->n_heads > 0 && c->n_kv_heads > 0 &&
                c->head_dim > 0,
            "config: n_layers, hidden, vocab, n_heads, n_kv_heads, head_dim must be positive");
    REQUIRE(c->n_heads % c->n_kv_heads == 0, "config: n_heads=%d is not a multiple of n_kv_heads=%d", c->n_heads,
            c->n_kv_heads);
    REQUIRE(c->rope_dim >= 0 && c->rope_dim <= c->head_dim && c->rope_dim % 2 == 0,
            "config: rope_dim=%d must be even and in 0..head_dim=%d", c->rope_dim, c->head_dim);
    REQUIRE(c->rope_kind == EMOE_ROPE_NEOX || c->rope_kind == EMOE_ROPE_NORM, "config: bad rope_kind %d", c->rope_kind);
    REQUIRE(c->qk_norm >= EMOE_QK_NORM_NONE && c->qk_norm <= EMOE_QK_NORM_FULL, "config: bad qk_norm %d", c->qk_norm);
    REQUIRE(c->router_fn == EMOE_ROUTER_SOFTMAX || c->router_fn == EMOE_ROUTER_SIGMOID, "config: bad router_fn %d",
            c->router_fn);
    REQUIRE(c->router_input >= EMOE_ROUTER_IN_FFN_NORM && c->router_input <= EMOE_ROUTER_IN_RESIDUAL_NORM,
            "config: bad router_input %d", c->router_input);
    REQUIRE(c->activation >= EMOE_ACT_SWIGLU && c->activation <= EMOE_ACT_GEGLU_TANH, "config: bad activation %d",
            c->activation);
    REQUIRE(c->global_kv_heads >= 0 && c->global_head_dim >= 0 && c->global_rope_angles >= 0 &&
                (!c->global_kv_heads || c->n_heads % c->global_kv_heads == 0) &&
                2 * c->global_rope_angles <= (c->global_head_dim ? c->global_head_dim : c->head_dim) &&
                (!c->global_head_dim || c->global_head_dim == c->head_dim || c->global_rope_angles > 0),
            "config: bad global attention sizes (global_head_dim %d, global_kv_heads %d, global_rope_angles %d)",
            c->global_head_dim, c->global_kv_heads, c->global_rope_angles);
    REQUIRE(c->rope_scaling == EMOE_ROPE_SCALING_NONE || c->rope_scaling == EMOE_ROPE_SCALING_YARN,
            "config: bad rope_scaling %d", c->rope_scaling);
    REQUIRE(c->norm_eps >= 0.0f && c->rope_theta > 0.0f, "config: norm_eps must be >= 0 and rope_theta > 0");
    REQUIRE(c->shared_ffn >= 0 && c->dense_ffn >= 0 && c->sliding_window >= 0,
            "config: shared_ffn, dense_ffn, sliding_window must be >= 0");
    REQUIRE(max_ctx > 0, "max_ctx=%d must be positive", max_ctx);
    REQUIRE(n_threads >= 1 && n_threads <= 1024, "n_threads=%d must be in 1..1024", n_threads);
    int st;
#define ARCH_LIST(name, doc) \
    if ((st = check_list(m, #name, c->name, c->n_##name))) return st;
#include "arch_fields.h"
    REQUIRE(!c->n_conv_layers || (c->conv_kernel >= 1 && c->conv_kernel <= EMOE_MAX_CONV_KERNEL),
            "config: conv_layers need conv_kernel in 1..%d, got %d", EMOE_MAX_CONV_KERNEL, c->conv_kernel);
    int n_moe = c->n_layers - 0;
    for (int l = 0; l < c->n_layers; l++) n_moe -= in_list(c->dense_layers, c->n_dense_layers, l);
    if (n_moe > 0)
        REQUIRE(c->n_experts > 0 && c->top_k >= 1 && c->top_k <= c->n_experts && c->expert_ffn > 0,
                "config: MoE layers need n_experts > 0, 1 <= top_k <= n_experts, expert_ffn > 0 (got %d, %d, %d)",
                c->n_experts, c->top_k, c->expert_ffn);
    if (n_moe < c->n_layers) REQUIRE(c->dense_ffn > 0, "config: dense_layers given but dense_ffn = 0");
    if (c->expert_map && n_moe > 0)
        for (int l = 0; l < c->n_layers; l++) {
            if (in_list(c->dense_layers, c->n_dense_layers, l)) continue;
            int live = 0;
            for (int e = 0; e < c->n_experts; e++) {
                const int32_t g = c->expert_map[(size_t)l * c->n_experts + e];
                REQUIRE(g >= -1 && g < c->n_experts, "config: expert_map[%d][%d] = %d is outside -1..%d", l, e, (int)g,
                        c->n_experts - 1);
                live += g >= 0;
            }
            REQUIRE(live >= c->top_k, "config: layer %d keeps %d experts after pruning, fewer than top_k = %d", l, live,
                    c->top_k);
        }
    return EMOE_OK;
#undef REQUIRE
}

static void *xcalloc(size_t n, size_t size, int *fail) {
    if (n == 0) n = 1;
    void *p = calloc(n, size);
    if (!p) *fail = 1;
    return p;
}

/* The KV cache of n_seq sequence slots, (n_seq, n_kv_layers, max_ctx, kv_dim) each (slot 0 first, so a one-sequence
 * model has today's layout), and every sequence emptied. On failure the old cache stays. */
static int alloc_kv(emoe_model *m, int n_seq) {
    const size_t kv_elems = (size_t)n_seq * (size_t)m->n_kv_layers * (size_t)m->max_ctx * (size_t)m->kv_dim;
    const size_t esz = m->kv_f16 ? 2 : 4;
    int fail = 0;
    void *kc = xcalloc(kv_elems, esz, &fail), *vc = m->cfg.kv_lora_rank ? NULL : xcalloc(kv_elems, esz, &fail);
    int *past = xcalloc((size_t)n_seq, sizeof(int), &fail);
    if (fail || deltanet_alloc_state(&m->dn, &m->cfg, m->dn.n_lin, n_seq, EMOE_BLOCK) ||
        conv_state_alloc(&m->conv, m->conv.n_layers, m->cfg.conv_kernel, m->cfg.hidden, n_seq)) {
        free(kc), free(vc), free(past);
        return EMOE_ERR_NOMEM;
    }
    free(m->key_cache), free(m->value_cache), free(m->n_past);
    m->key_cache = kc, m->value_cache = vc, m->n_past = past;
    m->n_seq = n_seq;
    return EMOE_OK;
}

static int alloc_buffers(emoe_model *m) {
    const emoe_config *c = &m->cfg;
    const size_t B = EMOE_BLOCK, H = (size_t)c->hidden;
    const int group = m->grp_max;
    int fail = 0;
    run_state *s = &m->s;
    s->x = xcalloc(B * H, sizeof(float), &fail);
    s->xn = xcalloc(B * H, sizeof(float), &fail);
    s->q = xcalloc(B * (size_t)m->q_dim, sizeof(float), &fail);
    s->k = xcalloc(B * (size_t)m->kv_dim, sizeof(float), &fail);
    s->v = xcalloc(B * (size_t)m->kv_dim, sizeof(float), &fail);
    s->att = xcalloc(B * (size_t)m->q_dim, sizeof(float), &fail);
    s->tmp = xcalloc(B * H, sizeof(float), &fail);
    s->logits_r = xcalloc(B * (size_t)(c->n_experts > 0 ? c->n_experts : 1), sizeof(float), &fail);
    s->topk_idx = xcalloc(B * (size_t)(c->top_k > 0 ? c->top_k : 1), sizeof(int), &fail);
    s->topk_w = xcalloc(B * (size_t)(c->top_k > 0 ? c->top_k : 1), sizeof(float), &fail);
    s->sel = xcalloc((size_t)(c->n_experts > 0 ? c->n_experts : 1) + (size_t)c->n_group, sizeof(float), &fail);
    s->etok = xcalloc(B, sizeof(int), &fail);
    s->ew = xcalloc(B, sizeof(float), &fail);
    s->xg = xcalloc(B * H, sizeof(float), &fail);
    s->hg = xcalloc(B * (size_t)m->ffn_max, sizeof(float), &fail);
    s->hu = xcalloc(B * (size_t)m->ffn_max, sizeof(float), &fail);
    s->yg = xcalloc(B * H, sizeof(float), &fail);
    s->rope_cs = xcalloc(B * (size_t)(c->rope_dim / 2 + 1) * 2, sizeof(float), &fail);
    s->rope_cs_g = xcalloc(B * (size_t)c->global_rope_angles * 2, sizeof(float), &fail);
    s->dense_y = xcalloc(c->dense_beside_moe ? B * H : 1, sizeof(float), &fail);
    s->scores = xcalloc((size_t)emoe_pool_threads(m->pool) * (size_t)group * (size_t)m->max_ctx, sizeof(float), &fail);
    s->qbuf = xcalloc(B * (size_t)((m->in_max + QK - 1) / QK), sizeof(block_q8_act), &fail);
    s->pos = xcalloc(B, sizeof(int), &fail);
    s->slot = xcalloc(B, sizeof(int), &fail);
    if (m->conv.n_layers) {
        s->conv_bcx = xcalloc(B * 3 * H, sizeof(float), &fail);
        s->conv_taps = xcalloc(H * (size_t)c->conv_kernel, sizeof(float), &fail);
    }
    if (fail) return EMOE_ERR_NOMEM;
    if (c->kv_lora_rank && !(m->mla = mla_new(m))) return EMOE_ERR_NOMEM;
    return alloc_kv(m, 1);
}

size_t model_scratch_bytes(const emoe_model *m, int with_mwq) {
    const emoe_config *c = &m->cfg;
    const size_t B = EMOE_BLOCK, H = (size_t)c->hidden, E = (size_t)(c->n_experts > 0 ? c->n_experts : 1);
    const size_t K = (size_t)(c->top_k > 0 ? c->top_k : 1), F = (size_t)m->ffn_max;
    const size_t group = (size_t)m->grp_max;
    size_t f = B * H * 5 + B * (size_t)m->q_dim * 2 + B * (size_t)m->kv_dim * 2 + B * E + B * K + B + B * F * 2 +
               B * (size_t)(c->rope_dim / 2 + 1) * 2 + B * (size_t)c->global_rope_angles * 2 +
               (c->dense_beside_moe ? B * H : 1) + E + (size_t)c->n_group +
               (size_t)emoe_pool_threads(m->pool) * group * (size_t)m->max_ctx;
    size_t bytes = f * sizeof(float) + B * K * sizeof(int) + B * 3 * sizeof(int) +
                   B * (size_t)((m->in_max + QK - 1) / QK) * sizeof(block_q8_act);
    if (with_mwq) bytes += mwq_xpbuf_bytes(m->in_max, EMOE_BLOCK);
    if (m->conv.n_layers) bytes += (B * 3 * H + H * (size_t)c->conv_kernel) * sizeof(float);
    if (c->kv_lora_rank) bytes += mla_scratch_bytes(m);
    return bytes + deltanet_scratch_bytes(c, m->dn.n_lin, EMOE_BLOCK);
}

int64_t model_state_bytes(const emoe_model *m, int n_seq) {
    const int caches = m->cfg.kv_lora_rank ? 1 : 2; /* K and V, or MLA's one latent cache */
    return caches * (int64_t)n_seq * m->n_kv_layers * m->max_ctx * m->kv_dim * (m->kv_f16 ? 2 : 4) +
           (int64_t)conv_state_bytes(m->conv.n_layers, m->cfg.conv_kernel, m->cfg.hidden, n_seq) +
           (int64_t)deltanet_state_bytes(&m->cfg, m->dn.n_lin, n_seq);
}

static void free_buffers(emoe_model *m) {
    run_state *s = &m->s;
    void *bufs[] = {s->x,  s->xn, s->q,  s->k,  s->v,  s->att,     s->tmp,    s->logits_r, s->topk_idx, s->topk_w,
                    s->sel, s->etok, s->ew, s->xg, s->hg, s->hu, s->yg, s->rope_cs, s->scores, s->qbuf, s->mwq_xp,
                    s->rope_cs_g, s->dense_y, s->conv_bcx, s->conv_taps,
                    s->pos, s->slot, m->key_cache, m->value_cache, m->n_past};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) free(bufs[i]);
    memset(s, 0, sizeof(*s));
    deltanet_free(&m->dn);
    mla_free(m->mla);
    m->mla = NULL;
    m->key_cache = m->value_cache = NULL;
    m->n_past = NULL;
    conv_state_free(&m->conv);
}

emoe_model *emoe_model_new(const emoe_config *cfg, int max_ctx, int kv_f16, int n_threads) {
    emoe_model *m = calloc(1, sizeof(*m));
    if (!m) return NULL;
    if (!cfg) {
        m->status = model_error(m, EMOE_ERR_ARG, "emoe_model_new: cfg is NULL");
        return m;
    }
    m->cfg = *cfg;
    if (m->cfg.rope_dim == 0) m->cfg.rope_dim = m->cfg.head_dim;
    /* the scalings' defaults (0 only in a struct built in C: the arch reader refuses 0 but for attn_scale) */
    if (m->cfg.embed_scale == 0.0f) m->cfg.embed_scale = 1.0f;
    if (m->cfg.residual_scale == 0.0f) m->cfg.residual_scale = 1.0f;
    if (m->cfg.logit_divisor == 0.0f) m->cfg.logit_divisor = 1.0f;
    if (m->cfg.attn_scale == 0.0f && m->cfg.head_dim > 0) m->cfg.attn_scale = 1.0f / sqrtf((float)m->cfg.head_dim);
    if ((m->status = validate_config(m, &m->cfg, max_ctx, n_threads))) return m;
    const emoe_config *c = &m->cfg;
    m->max_ctx = max_ctx;
    m->kv_f16 = kv_f16 ? 1 : 0;
    /* the widest layer sizes (Gemma-4's full-attention layers may be wider; the KV cache row is the widest) */
    const int ghd = c->global_head_dim ? c->global_head_dim : c->head_dim;
    const int gkv = c->global_kv_heads ? c->global_kv_heads : c->n_kv_heads;
    m->q_dim = c->n_heads * (ghd > c->head_dim ? ghd : c->head_dim);
    m->kv_dim = c->kv_lora_rank ? mla_cache_dim(c) : (int)emoe_arch_kv_dim(c);
    m->grp_max = c->n_heads / (gkv < c->n_kv_heads ? gkv : c->n_kv_heads);
    m->ffn_max = c->expert_ffn;
    if (c->shared_ffn > m->ffn_max) m->ffn_max = c->shared_ffn;
    if (c->dense_ffn > m->ffn_max) m->ffn_max = c->dense_ffn;
    if (m->ffn_max < 1) m->ffn_max = 1;
    m->in_max = c->hidden > m->q_dim ? c->hidden : m->q_dim;
    if (m->ffn_max > m->in_max) m->in_max = m->ffn_max;
    if (c->kv_lora_rank && mla_in_max(c) > m->in_max) m->in_max = mla_in_max(c);
    m->k = emoe_kernels_get(EMOE_ISA_AUTO);

    m->layers = calloc((size_t)c->n_layers, sizeof(layer_weights));
    if (!m->layers) goto nomem;
    for (int l = 0; l < c->n_layers; l++) {
        layer_weights *L = &m->layers[l];
        L->is_moe = !in_list(c->dense_layers, c->n_dense_layers, l);
        L->use_rope = !in_list(c->nope_layers, c->n_nope_layers, l);
        L->swa = c->sliding_window > 0 && in_list(c->swa_layers, c->n_swa_layers, l);
        const int kind = emoe_arch_layer_kind(c, l);
        L->is_attn = kind == EMOE_LAYER_ATTENTION;
        L->is_linear = kind == EMOE_LAYER_LINEAR;
        L->lin_idx = L->is_linear ? m->dn.n_lin++ : -1;
        L->kv_idx = L->is_attn ? m->n_kv_layers++ : -1;
        L->conv_idx = kind == EMOE_LAYER_CONV ? m->conv.n_layers++ : -1;
        L->global = !L->swa;
        L->hd = L->global ? ghd : c->head_dim;
        L->n_kv = L->global ? gkv : c->n_kv_heads;
        if (L->is_moe) {
            L->n_stored = c->n_experts;
            if (c->expert_map) {
                const int32_t *row = c->expert_map + (size_t)l * c->n_experts;
                int identity = 1, mx = -1;
                for (int e = 0; e < c->n_experts; e++) identity &= row[e] == e, mx = row[e] > mx ? row[e] : mx;
                if (!identity) {
                    L->emap = malloc((size_t)c->n_experts * sizeof(int32_t));
                    if (!L->emap) goto nomem;
                    memcpy(L->emap, row, (size_t)c->n_experts * sizeof(int32_t));
                    L->n_stored = mx + 1;
                }
            }
            L->experts = calloc((size_t)(L->n_stored > 0 ? L->n_stored : 1) * 3, sizeof(tensor_ref));
            if (!L->experts) goto nomem;
        }
    }
    /* the layer lists and expert_map are borrowed during this call only */
#define ARCH_LIST(name, doc) \
    m->cfg.name = NULL;      \
    m->cfg.n_##name = 0;
#include "arch_fields.h"
    m->cfg.expert_map = NULL;

    m->pool = emoe_pool_new(n_threads);
    if (!m->pool) {
        m->status = model_error(m, EMOE_ERR_THREAD, "could not start %d threads", n_threads);
        return m;
    }
    if (alloc_buffers(m)) goto nomem;
    return m;
nomem:
    emoe_model_free(m);
    return NULL;
}

void emoe_model_free(emoe_model *m) {
    if (!m) return;
    if (m->stream) m->stream_ops->free(m->stream); /* stops the I/O thread before the buffers go */
    m->stream = NULL;
    if (m->layers)
        for (int l = 0; l < m->cfg.n_layers; l++)
            free(m->layers[l].experts), free(m->layers[l].experts_mwq), free(m->layers[l].emap);
    free(m->layers);
    free_buffers(m);
    emoe_pool_free(m->pool);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m);
}

void *model_own(emoe_model *m, size_t n) {
    if (m->n_owned == m->cap_owned) {
        const int cap = m->cap_owned ? 2 * m->cap_owned : 16;
        void **p = realloc(m->owned, (size_t)cap * sizeof(void *));
        if (!p) return NULL;
        m->owned = p, m->cap_owned = cap;
    }
    void *b = malloc(n ? n : 1);
    if (!b) return NULL;
    return m->owned[m->n_owned++] = b;
}

int emoe_model_status(const emoe_model *m) { return m ? m->status : EMOE_ERR_ARG; }
const char *emoe_model_last_error(const emoe_model *m) { return m ? m->err : "model is NULL"; }
/* ---- sequences (slots of the KV cache) ---- */

int model_check_seq(emoe_model *m, const char *what, int seq) {
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    if (seq < 0 || seq >= m->n_seq)
        return model_error(m, EMOE_ERR_ARG, "%s: sequence %d is outside 0..%d (the model holds %d sequence%s; "
                           "emoe_model_set_n_seq changes that)", what, seq, m->n_seq - 1, m->n_seq,
                           m->n_seq == 1 ? "" : "s");
    return EMOE_OK;
}

int emoe_model_set_n_seq(emoe_model *m, int n_seq) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    if (n_seq < 1) return model_error(m, EMOE_ERR_ARG, "set_n_seq: n_seq %d must be >= 1", n_seq);
    if (m->n_seq_max > 0 && n_seq > m->n_seq_max)
        return model_error(m, EMOE_ERR_BUDGET, "set_n_seq: %d sequences need %d KV caches, but the memory budget "
                           "counted %d at load (load with n_seq = %d)", n_seq, n_seq, m->n_seq_max, n_seq);
    if (alloc_kv(m, n_seq))
        return model_error(m, EMOE_ERR_NOMEM, "set_n_seq: out of memory for the KV cache of %d sequences "
                           "(%d positions each)", n_seq, m->max_ctx);
    return EMOE_OK;
}
int emoe_model_n_seq(const emoe_model *m) { return m ? m->n_seq : 0; }

int emoe_model_seq_n_past(emoe_model *m, int seq) {
    if (!m) return EMOE_ERR_ARG;
    const int st = model_check_seq(m, "seq_n_past", seq);
    return st ? st : m->n_past[seq];
}
int emoe_model_n_past(const emoe_model *m) { return m && m->n_past ? m->n_past[0] : 0; }
void emoe_model_reset_seq(emoe_model *m, int seq) {
    if (m && m->n_past && seq >= 0 && seq < m->n_seq) m->n_past[seq] = 0, conv_state_clear(&m->conv, seq);
}
void emoe_model_reset(emoe_model *m) { emoe_model_reset_seq(m, 0); }
/* The KV entries of positions < n_keep stay valid; later ones are overwritten by the next forward of the sequence. */
int emoe_model_truncate_seq(emoe_model *m, int seq, int n_keep) {
    if (!m) return EMOE_ERR_ARG;
    const int st = model_check_seq(m, "truncate", seq);
    if (st) return st;
    if (n_keep < 0 || n_keep > m->n_past[seq])
        return model_error(m, EMOE_ERR_ARG, "truncate: n_keep %d is outside 0..%d (the positions in the KV cache)",
                           n_keep, m->n_past[seq]);
    if (m->dn.n_lin && n_keep && n_keep != m->n_past[seq]) /* the recurrent state holds no earlier positions */
        return model_error(m, EMOE_ERR_ARG, "truncate: n_keep %d: this model's linear-attention layers keep a "
                           "recurrent state that cannot be rewound; keep 0 (start over) or all %d positions", n_keep,
                           m->n_past[seq]);
    /* a conv layer keeps only its last inputs, not one entry per position: it can go back to the start only */
    if (m->conv.n_layers && n_keep && n_keep != m->n_past[seq])
        return model_error(m, EMOE_ERR_ARG, "truncate: n_keep %d of %d positions: a model with conv layers (LFM2) "
                           "keeps a rolling state, not one per position, so it can only keep all of them or none "
                           "(n_keep = 0: reset the sequence and run it again)", n_keep, m->n_past[seq]);
    if (!n_keep) conv_state_clear(&m->conv, seq);
    m->n_past[seq] = n_keep;
    return EMOE_OK;
}
int emoe_model_truncate(emoe_model *m, int n_keep) { return emoe_model_truncate_seq(m, 0, n_keep); }

int emoe_model_set_isa(emoe_model *m, int isa) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    const emoe_kernels *k = emoe_kernels_get(isa);
    if (!k) return model_error(m, EMOE_ERR_ISA, "instruction set %d (%s) is not supported on this CPU/build", isa,
                               emoe_isa_name(isa) ? emoe_isa_name(isa) : "?");
    m->k = k;
    return EMOE_OK;
}
int emoe_model_set_q8_f32_act(emoe_model *m, int on) {
    if (!m) return EMOE_ERR_ARG;
    m->q8_f32_act = on ? 1 : 0;
    return EMOE_OK;
}
int emoe_model_isa(const emoe_model *m) { return m && m->k ? m->k->isa : EMOE_ISA_SCALAR; }

expert_mats expert_weights(emoe_model *m, int layer, int expert) {
    tensor_ref *e = &m->layers[layer].experts[(size_t)expert * 3];
    const int mwq = e[0].dtype == TENSOR_MWQ || e[1].dtype == TENSOR_MWQ || e[2].dtype == TENSOR_MWQ;
    return (expert_mats){&e[0], &e[1], &e[2], mwq ? m->precision : 0};
}

void model_matmuls_multi(emoe_model *m, int n, const model_mm *mm, const mm_input *in, int n_in) {
    enum { MAXN = 32 }; /* all routed experts' gate and up at top-k 16 in one dispatch */
    for (; n > MAXN; n -= MAXN, mm += MAXN) model_matmuls_multi(m, MAXN, mm, in, n_in);
    if (n <= 0) return;
    mm_job dj[MAXN];
    mwq_job qj[MAXN];
    int nd = 0, nq = 0;
    const int64_t cols = mm[0].w->cols;
    for (int j = 0; j < n; j++) {
        const tensor_ref *t = mm[j].w;
        if (t->dtype != TENSOR_MWQ) {
            dj[nd++] = (mm_job){.wtype = t->dtype, .w = t->data, .rows = t->rows, .y = mm[j].y, .ldy = mm[j].ldy,
                                .xi = mm[j].xi};
            continue;
        }
        const mwq_layout *L = t->mwq;
        const int k = mm[j].k, kk = k <= 0 || k > L->n_planes ? L->n_planes : k;
        qj[nq] = (mwq_job){.y = mm[j].y, .ldy = mm[j].ldy, .xi = mm[j].xi};
        /* validated by emoe_model_set_expert_mwq, cannot fail */
        (void)mwq_matrix_init(&qj[nq++].w, t->data, L->plane_off, kk, L->base_bits, L->group, t->rows, t->cols);
    }
    if (nd) mm_run_multi(m->pool, m->k, dj, nd, in, n_in, cols, m->s.qbuf, m->q8_f32_act);
    if (nq) mwq_run_multi(m->pool, m->k, qj, nq, in, n_in, cols, m->s.qbuf, m->s.mwq_xp, m->q8_f32_act);
}

void model_matmuls(emoe_model *m, int n, const tensor_ref *const *w, float *const *y, int k, const float *x,
                   int n_tok) {
    enum { MAXN = 8 };
    for (; n > MAXN; n -= MAXN, w += MAXN, y += MAXN) model_matmuls(m, MAXN, w, y, k, x, n_tok);
    model_mm mm[MAXN];
    for (int j = 0; j < n; j++) mm[j] = (model_mm){.w = w[j], .y = y[j], .ldy = (size_t)w[j]->rows, .k = k};
    const mm_input in = {.x = x, .n_tok = n_tok};
    model_matmuls_multi(m, n, mm, &in, 1);
}

/* ---- tensor names: the tensor table (tensor_table.c) ---- */

/* The slot a table item fills. */
static tensor_ref *slot_of(emoe_model *m, const tt_item *it) {
    const tt_entry *t = &tt_table[it->entry];
    if (t->scope == TT_GLOBAL) return (tensor_ref *)((char *)m + t->slot);
    layer_weights *L = &m->layers[it->layer];
    if (t->scope == TT_LAYER) return (tensor_ref *)((char *)L + t->slot);
    return &L->experts[(size_t)it->expert * 3 + t->slot];
}

/* Resolve a container name to its table item (name, shape, flags). Returns EMOE_OK or an error (with the message
 * saying why the name does not belong to this config). */
static int resolve(emoe_model *m, const char *name, tt_item *it) {
    int layer, expert;
    const int e = tt_parse(name, &layer, &expert);
    if (e < 0) return model_error(m, EMOE_ERR_ARG, "unknown tensor name '%s'", name);
    const tt_entry *t = &tt_table[e];
    if (t->scope != TT_GLOBAL && layer >= m->cfg.n_layers)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': layer out of range 0..%d", name, m->cfg.n_layers - 1);
    if (t->scope != TT_GLOBAL && !tt_present(m, e, layer))
        return model_error(m, EMOE_ERR_ARG, "tensor '%s' is not used by this config (needs %s%s)", name,
                           tt_condition_name(e), t->unless ? " = 0" : "");
    if (t->scope == TT_EXPERT && expert >= m->layers[layer].n_stored)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': expert out of range 0..%d (stored experts of layer %d)",
                           name, m->layers[layer].n_stored - 1, layer);
    tt_instance(m, e, layer, expert, it);
    return EMOE_OK;
}

typedef struct {
    int i, n; /* the index asked for, items seen */
    tt_item it;
} nth_ctx;
static int nth_item(void *ctx, const tt_item *it) {
    nth_ctx *c = ctx;
    if (c->n++ == c->i) c->it = *it;
    return 0;
}

int emoe_model_tensor(emoe_model *m, int i, char *name, size_t n, int *ndim, int64_t *rows, int64_t *cols,
                      int *required) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    nth_ctx c = {.i = i};
    tt_walk(m, nth_item, &c);
    if (i < 0 || i >= c.n) return c.n;
    if (name && n) snprintf(name, n, "%s", c.it.name);
    if (ndim) *ndim = c.it.one_d ? 1 : 2;
    if (rows) *rows = c.it.rows;
    if (cols) *cols = c.it.cols;
    if (required) *required = c.it.required;
    return c.n;
}

int emoe_model_expected_shape(emoe_model *m, const char *name, int64_t *rows, int64_t *cols) {
    if (!m || !name || !rows || !cols) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    tt_item it;
    const int st = resolve(m, name, &it);
    if (st) return st;
    *rows = it.rows, *cols = it.cols;
    return EMOE_OK;
}

static const char *dtype_name(int dtype) {
    return dtype == EMOE_F32 ? "f32" : dtype == EMOE_F16 ? "f16" : dtype == EMOE_Q8_0 ? "q8_0" : "?";
}

int emoe_model_set_tensor(emoe_model *m, const char *name, int dtype, const void *data, int64_t rows, int64_t cols) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    if (!name || !data) return model_error(m, EMOE_ERR_ARG, "emoe_model_set_tensor: name and data must not be NULL");
    tt_item it;
    int st = resolve(m, name, &it);
    if (st) return st;
    if (rows != it.rows || cols != it.cols)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': shape [%lld, %lld], expected [%lld, %lld]%s", name,
                           (long long)rows, (long long)cols, (long long)it.rows, (long long)it.cols,
                           it.one_d ? " (1-D tensors are passed as rows=1)" : "");
    const size_t nlen = strlen(name);
    const int is_bias = nlen > 5 && !strcmp(name + nlen - 5, ".bias");
    if ((it.one_d || is_bias) && dtype != EMOE_F32)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': 1-D tensors and biases must be f32, got %s", name,
                           dtype_name(dtype));
    if (dtype != EMOE_F32 && dtype != EMOE_F16 && dtype != EMOE_Q8_0)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': unknown dtype %d", name, dtype);
    if (dtype == EMOE_Q8_0 && cols % QK)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': q8_0 needs cols %% 32 == 0, cols = %lld", name,
                           (long long)cols);
    *slot_of(m, &it) = (tensor_ref){.data = data, .dtype = dtype, .rows = rows, .cols = cols};
    return EMOE_OK;
}

int model_mwq_buffers(emoe_model *m) {
    if (!m->s.mwq_xp) m->s.mwq_xp = malloc(mwq_xpbuf_bytes(m->in_max, EMOE_BLOCK));
    return m->s.mwq_xp ? EMOE_OK : EMOE_ERR_NOMEM;
}

int emoe_model_set_expert_mwq(emoe_model *m, const char *name, const void *base, const int64_t *plane_offsets,
                              int n_planes, int base_bits, int group, int64_t rows, int64_t cols) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    if (!name || !base || !plane_offsets)
        return model_error(m, EMOE_ERR_ARG, "emoe_model_set_expert_mwq: name, base and plane_offsets must not be NULL");
    tt_item it;
    int st = resolve(m, name, &it);
    if (st) return st;
    if (tt_table[it.entry].scope != TT_EXPERT)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': only expert matrices can be MWQ bit planes", name);
    if (rows != it.rows || cols != it.cols)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': shape [%lld, %lld], expected [%lld, %lld]", name,
                           (long long)rows, (long long)cols, (long long)it.rows, (long long)it.cols);
    if (n_planes < 1 || n_planes > MWQ_MAX_PLANES)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': %d MWQ planes, expected 1..%d", name, n_planes,
                           MWQ_MAX_PLANES);
    if (base_bits != 2 && base_bits != 4 && base_bits != 8)
        return model_error(m, EMOE_ERR_ARG, "tensor '%s': MWQ base_bits %d, expected 2, 4 or 8", name, base_bits);
    if (group <= 0 || group % 8 || cols % group)
        return model_error(m, EMOE_ERR_ARG,
                           "tensor '%s': MWQ group size %d must be a multiple of 8 dividing the %lld inputs", name,
                           group, (long long)cols);
    for (int p = 0; p < n_planes; p++)
        if ((uintptr_t)((const char *)base + plane_offsets[p]) % 2)
            return model_error(m, EMOE_ERR_ARG, "tensor '%s': MWQ plane %d is not 2-byte aligned", name, p + 1);
    layer_weights *L = &m->layers[it.layer];
    if (!L->experts_mwq) {
        L->experts_mwq = calloc((size_t)L->n_stored * 3, sizeof(mwq_layout));
        if (!L->experts_mwq) return model_error(m, EMOE_ERR_NOMEM, "out of memory");
    }
    if (model_mwq_buffers(m)) return model_error(m, EMOE_ERR_NOMEM, "out of memory");
    mwq_layout *ly = &L->experts_mwq[(size_t)it.expert * 3 + tt_table[it.entry].slot];
    memset(ly, 0, sizeof(*ly));
    ly->n_planes = n_planes;
    ly->base_bits = base_bits;
    ly->group = group;
    memcpy(ly->plane_off, plane_offsets, (size_t)n_planes * sizeof(int64_t));
    *slot_of(m, &it) = (tensor_ref){.data = base, .dtype = TENSOR_MWQ, .rows = rows, .cols = cols, .mwq = ly};
    return EMOE_OK;
}

/* tt_walk callbacks of emoe_model_ready and emoe_model_set_precision: the first tensor that is missing, or (k > 0)
 * an MWQ expert matrix storing fewer than k planes. */
typedef struct {
    emoe_model *m;
    int k;
    tt_item it;
    int planes;
} check_ctx;
static int find_missing(void *ctx, const tt_item *it) {
    check_ctx *c = ctx;
    if (!it->required || (c->m->stream && tt_table[it->entry].scope == TT_EXPERT)) return 0; /* streamed: cached */
    if (slot_of(c->m, it)->data) return 0;
    c->it = *it;
    return 1;
}
static int find_short(void *ctx, const tt_item *it) {
    check_ctx *c = ctx;
    const tensor_ref *t = slot_of(c->m, it);
    if (!t->data || t->dtype != TENSOR_MWQ || t->mwq->n_planes >= c->k) return 0;
    c->it = *it, c->planes = t->mwq->n_planes;
    return 1;
}

int emoe_model_set_precision(emoe_model *m, int k) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    if (k < 0 || k > MWQ_MAX_PLANES)
        return model_error(m, EMOE_ERR_ARG, "precision %d: expected 1..%d planes (0 = all stored)", k, MWQ_MAX_PLANES);
    check_ctx c = {.m = m, .k = k};
    if (k && tt_walk(m, find_short, &c))
        return model_error(m, EMOE_ERR_ARG, "precision %d: tensor '%s' stores only %d MWQ planes", k, c.it.name,
                           c.planes);
    m->precision = k;
    return EMOE_OK;
}

int emoe_model_precision(const emoe_model *m) { return m ? m->precision : 0; }

int emoe_model_ready(emoe_model *m) {
    if (!m) return EMOE_ERR_ARG;
    if (m->status) return model_error(m, m->status, "model creation failed earlier");
    check_ctx c = {.m = m, .k = m->precision};
    if (tt_walk(m, find_missing, &c))
        return model_error(m, EMOE_ERR_NOT_READY, "missing tensor '%s'%s", c.it.name,
                           tt_table[c.it.entry].need == TN_UNLESS_TIED ? " (tie_embeddings is off)" : "");
    if (c.k && tt_walk(m, find_short, &c))
        return model_error(m, EMOE_ERR_ARG, "precision %d: tensor '%s' stores only %d MWQ planes", m->precision,
                           c.it.name, c.planes);
    return EMOE_OK;
}
