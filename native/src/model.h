/* The model: config, borrowed weights, KV cache, scratch buffers and thread pool. Shared by model.c (creation,
 * tensor registration, errors) and forward.c (the forward pass). */
#ifndef EDGEMOE_MODEL_H
#define EDGEMOE_MODEL_H
#include "arch.h" /* emoe_config */
#include "deltanet.h"
#include "internal.h"
#include "shortconv.h"
#include "mla.h"

#define EMOE_BLOCK 64 /* tokens per forward block (prefill runs in blocks of this many tokens) */
#define EMOE_ERR_LEN 512

#define TENSOR_MWQ 1001 /* tensor_ref.dtype of MWQ bit planes (the value of EMOE_MWQ in edgemoe_container.h) */

/* Where the bit planes of one MWQ matrix are, relative to its tensor_ref.data (emoe_model_set_expert_mwq). */
typedef struct {
    int n_planes;  /* K stored */
    int base_bits; /* 2, 4, 8 */
    int group;     /* inputs per group */
    int64_t plane_off[MWQ_MAX_PLANES]; /* plane p (1..K) at (const char *)data + plane_off[p-1] */
} mwq_layout;

typedef struct {
    const void *data; /* borrowed; NULL = not set. MWQ: the base every plane offset is relative to */
    int dtype;        /* EMOE_F32 / EMOE_F16 / EMOE_Q8_0 / TENSOR_MWQ */
    int64_t rows, cols;
    const mwq_layout *mwq; /* TENSOR_MWQ only (NULL otherwise): the planes. Offsets are relative to data, so a copy of
                            * the planes' bytes elsewhere is described by the same layout with another data pointer. */
} tensor_ref;

/* One expert's matrices, as returned by expert_weights(). */
typedef struct {
    const tensor_ref *gate; /* [expert_ffn, hidden] */
    const tensor_ref *up;   /* [expert_ffn, hidden] */
    const tensor_ref *down; /* [hidden, expert_ffn] */
    int k; /* MWQ matrices: run at planes 1..k (1 <= k <= their n_planes; only those planes' bytes are read, i.e.
            * [data, data + plane_off[k-1] + mwq_plane_bytes(k, ...)) for a container layout). 0 if not MWQ. */
} expert_mats;

/* One layer's tensors; which ones it has (and their shapes) is the tensor table's (tensor_table.c). */
typedef struct {
    int is_moe, use_rope, swa; /* from dense_layers / nope_layers / swa_layers */
    int is_attn;               /* runs attention (emoe_arch_is_attention_layer) */
    int kv_idx, conv_idx;      /* its layer in the KV cache / the conv state (attention / conv layers; else -1) */
    int global, hd, n_kv;      /* a full-attention layer (not swa); its head size and KV heads (Gemma-4's global_*) */
    tensor_ref attn_norm, ffn_norm;              /* [hidden] */
    tensor_ref wq, wk, wv, wo;                   /* [nh*hd, H], [nkv*hd, H] x2, [H, nh*hd] */
    tensor_ref bq, bk, bv;                       /* [nh*hd], [nkv*hd] x2 (optional) */
    tensor_ref q_norm, k_norm;                   /* [hd] (head) or [nh*hd] / [nkv*hd] (full) */
    tensor_ref router;                           /* [E, H] */
    tensor_ref pre;                              /* [E, H] fitted expert predictor (optional; streaming uses it) */
    tensor_ref score_bias;                       /* [E] selection-only bias (score_bias; DeepSeek-V3 style) */
    tensor_ref sh_gate, sh_up, sh_down;          /* [S, H], [S, H], [H, S] shared expert (optional) */
    tensor_ref sh_gate_inp;                      /* [H] shared expert's gate vector (optional) */
    tensor_ref mlp_gate, mlp_up, mlp_down;       /* [D, H], [D, H], [H, D] (dense layers, dense_ffn = D) */
    tensor_ref bo;                               /* [H] attention output bias (gpt-oss) */
    tensor_ref sinks;                            /* [nh] attention sink logits (gpt-oss) */
    tensor_ref router_b;                         /* [E] router bias (gpt-oss) */
    tensor_ref gate_b, up_b, down_b;             /* [E, F], [E, F], [E, H] expert biases, row = stored expert */
    int is_linear, lin_idx;                      /* Gated DeltaNet layer (its index among them) */
    tensor_ref attn_gate;                        /* [nh*hd, H] attention output gate (attn_gate) */
    tensor_ref la_qkv, la_z, la_b, la_a;         /* [conv_dim, H], [Vh*dv, H], [Vh, H] x2 (deltanet.h) */
    tensor_ref la_conv, la_dt, la_a_log, la_norm; /* [conv_dim * taps], [Vh], [Vh], [dv] */
    tensor_ref la_out;                           /* [H, Vh*dv] */
    tensor_ref conv_in, conv_w, conv_out;        /* [3H, H], [H, conv_kernel], [H, H] short convolution */
    tensor_ref post_attn_norm, post_ffn_norm;    /* [H] block output norms (post_norms) */
    tensor_ref mlp_post_norm, moe_pre_norm, moe_post_norm; /* [H] the two branches' norms (dense_beside_moe) */
    tensor_ref layer_scale;                      /* [1] the layer's output scale (layer_scale) */
    tensor_ref wq_a, q_a_norm, wq_b;             /* MLA: [QL, H], [QL], [nh*hd, QL] (q_lora_rank QL > 0) */
    tensor_ref wkv_a, kv_a_norm, wkv_b;          /* MLA: [KL + rope_dim, H], [KL], [nh*(nope + v), KL] */
    int n_stored;                                /* stored experts (n_experts unless merged) */
    int32_t *emap;                               /* [n_experts] routed -> stored (-1 pruned), NULL = identity */
    tensor_ref *experts;                         /* [n_stored][3]: gate, up, down (MoE layers) */
    mwq_layout *experts_mwq;                     /* [n_stored][3], allocated at the first MWQ registration */
} layer_weights;

/* Activation buffers of one forward block of up to EMOE_BLOCK tokens (B). */
typedef struct {
    float *x;        /* (B, H) residual stream */
    float *xn;       /* (B, H) normalized input of the current sub-block */
    float *q;        /* (B, nh*hd) */
    float *k, *v;    /* (B, nkv*hd) */
    float *att;      /* (B, nh*hd) attention output before wo */
    float *tmp;      /* (B, H) sub-block output */
    float *logits_r; /* (B, E) router logits */
    int *topk_idx;   /* (B, top_k) */
    float *topk_w;   /* (B, top_k) */
    float *sel;      /* (E + n_group) one token's selection scores, then its group scores (route) */
    int *etok;       /* (B) tokens routed to the current expert */
    float *ew;       /* (B) their routing weights (summed over merged group members) */
    float *xg;       /* (B, H) gathered expert input */
    float *hg, *hu;  /* (B, F) gate / up activations, F = max ffn width */
    float *yg;       /* (B, H) expert output */
    float *rope_cs;  /* (B, rope_dim/2, 2) cos, sin per position */
    float *rope_cs_g; /* (B, global_rope_angles, 2) the full-attention layers' proportional RoPE (Gemma-4) */
    float *dense_y;   /* (B, H) the dense branch's output beside the MoE block (dense_beside_moe) */
    int *pos, *slot; /* (B) each token's position and sequence slot (KV region): set by the caller of forward_block */
    float *scores;   /* (n_threads, group, max_ctx) attention scores, per thread */
    block_q8_act *qbuf; /* (B, max_in/32) quantized activations for Q8_0 and MWQ matmuls */
    uint8_t *mwq_xp;    /* (B, ...) MWQ activation layout: allocated by model_mwq_buffers (first MWQ expert) */
    float *conv_bcx;    /* (B, 3H) a conv layer's in_proj output (conv layers only; else NULL) */
    float *conv_taps;   /* (H, conv_kernel) its taps as f32 when stored f16 / q8_0 */
} run_state;

/* Expert streaming under a memory budget (stream_load.c: emoe_container_load_streaming; stream_forward.c: the hooks).
 * The model reaches it only through these hooks, so the core (and test_kernels) builds without the streaming
 * sources. */
typedef struct emoe_stream emoe_stream;
typedef struct {
    /* before layer l's attention (s->x = the layer input; for router_input = layer_input, s->logits_r holds the
     * true router logits): predict the layer's experts and queue their reads */
    void (*before_attention)(emoe_model *m, int layer, int n_tok);
    /* the MoE block of layer l with experts from the cache: s->xn = ffn_norm(h) in, s->tmp = the block's output */
    int (*moe)(emoe_model *m, int layer, int n_tok);
    void (*forward_done)(emoe_model *m, int n_tok, double seconds);
    void (*free)(emoe_stream *st);
} emoe_stream_ops;

struct emoe_model {
    emoe_config cfg; /* layer-list pointers cleared; lists live in layers[].is_moe / use_rope / swa */
    int status;
    char err[EMOE_ERR_LEN];
    int max_ctx, kv_f16;
    int n_seq;      /* sequence slots in the KV cache (emoe_model_set_n_seq; 1 by default) */
    int n_seq_max;  /* 0 = no limit; streaming: the slots whose KV cache the memory budget counted */
    int *n_past;    /* [n_seq] positions each sequence holds */
    int q8_f32_act; /* Q8_0 and MWQ matmuls keep f32 activations (emoe_model_set_q8_f32_act) */
    int precision;  /* MWQ experts run at this many planes (0 = all stored; emoe_model_set_precision) */
    int q_dim, kv_dim, ffn_max, in_max; /* widest nh*hd, nkv*hd of any layer, widest ffn, widest matmul input */
    int grp_max;                        /* largest n_heads / KV heads of any layer */
    emoe_pool *pool;
    const emoe_kernels *k;
    tensor_ref embed, final_norm, lm_head; /* [V, H], [H], [V, H] */
    layer_weights *layers;                 /* [n_layers] */
    void *key_cache, *value_cache;         /* (n_seq, n_kv_layers, max_ctx, kv_dim) f32 or f16; MLA: key_cache holds
                                            * the latent rows (kv_dim = mla_cache_dim), value_cache is NULL */
    mla_state *mla;                        /* MLA's scratch (kv_lora_rank > 0), else NULL */
    int n_kv_layers;                       /* attention layers (layers[].kv_idx) */
    emoe_conv_state conv;                  /* conv layers' rolling state, per sequence slot like the KV cache */
    deltanet_state dn;                     /* linear-attention layers' state (n_seq slots, like the KV cache) */
    run_state s;
    emoe_stream *stream; /* NULL: every expert tensor is registered and resident */
    const emoe_stream_ops *stream_ops;
    void **owned;        /* buffers the model frees (model_own: converted or realigned copies of tensors) */
    int n_owned, cap_owned;
};

/* The cache row of position pos of layer l in sequence slot slot, in elements. */
static inline size_t model_kv_row(const emoe_model *m, int slot, int l, int pos) {
    const size_t layer = (size_t)slot * (size_t)m->n_kv_layers + (size_t)m->layers[l].kv_idx; /* attention layers */
    return (layer * (size_t)m->max_ctx + (size_t)pos) * (size_t)m->kv_dim;
}

int model_error(emoe_model *m, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* n bytes (malloc-aligned) that the model frees with itself; NULL when memory runs out. */
void *model_own(emoe_model *m, size_t n);
/* EMOE_OK if seq names one of the model's sequence slots, else EMOE_ERR_ARG with a message starting with `what`. */
int model_check_seq(emoe_model *m, const char *what, int seq);
/* The matrices of stored expert e of layer l. The single point where expert weights are looked up, so a later expert
 * cache can load them just in time; today it returns the pointers given to emoe_model_set_tensor /
 * emoe_model_set_expert_mwq, and for MWQ experts k = the model's precision (0 = all stored planes). */
expert_mats expert_weights(emoe_model *m, int layer, int expert);
/* Allocate the MWQ activation buffer if not done yet (emoe_model_set_expert_mwq calls it; any other code that installs
 * MWQ tensor_refs must call it before the forward pass). EMOE_OK or EMOE_ERR_NOMEM. */
int model_mwq_buffers(emoe_model *m);
/* Y_j = W_j X for n matrices sharing the input X [n_tok, cols] (cols = w[j]->cols): dense ones in one mm_run
 * dispatch, MWQ ones at k planes (k = 0: all stored) in one mwq_run dispatch. y[j] has ldy = w[j]->rows. */
void model_matmuls(emoe_model *m, int n, const tensor_ref *const *w, float *const *y, int k, const float *x,
                   int n_tok);
/* One matmul of model_matmuls_multi: y (ldy floats between tokens) = w in[xi], MWQ at k planes (0: all stored). */
typedef struct {
    const tensor_ref *w;
    float *y;
    size_t ldy;
    int xi, k;
} model_mm;
/* n matmuls with the same cols reading n_in inputs (in[i]: n_tok rows; the inputs' rows sum to at most EMOE_BLOCK,
 * the scratch's size): each input quantized once, the dense ones in one dispatch, the MWQ ones in one more
 * (mm_run_multi, mwq_run_multi). Each result is the one model_matmuls gives. */
void model_matmuls_multi(emoe_model *m, int n, const model_mm *mm, const mm_input *in, int n_in);
/* Bytes of the per-sequence state of n_seq sequences: the KV cache of the attention layers (MLA: its latent cache),
 * the conv and the DeltaNet state. */
int64_t model_state_bytes(const emoe_model *m, int n_seq);
/* Bytes of the buffers emoe_model_new allocated (activations, KV cache excluded) plus the MWQ activation buffer. */
size_t model_scratch_bytes(const emoe_model *m, int with_mwq);

/* forward.c's building blocks, shared with the streaming MoE block (stream_forward.c) */
void fwd_rmsnorm(float *out, const float *x, const float *w, int n, float eps);
void fwd_matmul(emoe_model *m, const tensor_ref *w, const float *x, int n_tok, float *y, size_t ldy);
/* s->logits_r (n_tok, E) -> s->topk_idx (stored experts) and s->topk_w, with layer l's expert map and score bias */
void fwd_route(emoe_model *m, int l, int n_tok);
void fwd_gated_ffn(emoe_model *m, const tensor_ref *gate, const tensor_ref *up, const tensor_ref *down, const float *x,
                   int n_tok, float *y, int k);
/* s->tmp += the shared expert of layer l on s->xn (no-op without one) */
void fwd_shared_expert(emoe_model *m, int l, int n_tok);
/* fwd_gated_ffn for stored expert e of layer l: adds its biases (gpt-oss) */
void fwd_expert_ffn(emoe_model *m, int l, int e, const tensor_ref *gate, const tensor_ref *up, const tensor_ref *down,
                    const float *x, int n_tok, float *y, int k);
/* s->logits_r (n_tok, E) = layer l's router on x, plus its bias (gpt-oss) */
void fwd_router_logits(emoe_model *m, int l, const float *x, int n_tok);

#endif
