/* The model: config, borrowed weights, KV cache, scratch buffers and thread pool. Shared by model.c (creation,
 * tensor registration, errors) and forward.c (the forward pass). */
#ifndef EDGEMOE_MODEL_H
#define EDGEMOE_MODEL_H
#include "internal.h"

#define EMOE_BLOCK 64 /* tokens per forward block (prefill runs in blocks of this many tokens) */
#define EMOE_ERR_LEN 512

typedef struct {
    const void *data; /* borrowed; NULL = not set */
    int dtype;        /* EMOE_F32 / EMOE_F16 / EMOE_Q8_0 */
    int64_t rows, cols;
} tensor_ref;

/* One expert's matrices, as returned by expert_weights(). */
typedef struct {
    const tensor_ref *gate; /* [expert_ffn, hidden] */
    const tensor_ref *up;   /* [expert_ffn, hidden] */
    const tensor_ref *down; /* [hidden, expert_ffn] */
} expert_mats;

typedef struct {
    int is_moe, use_rope, swa; /* from dense_layers / nope_layers / swa_layers */
    tensor_ref attn_norm, ffn_norm;              /* [hidden] */
    tensor_ref wq, wk, wv, wo;                   /* [nh*hd, H], [nkv*hd, H] x2, [H, nh*hd] */
    tensor_ref bq, bk, bv;                       /* [nh*hd], [nkv*hd] x2 (qkv_bias) */
    tensor_ref q_norm, k_norm;                   /* [hd] (head) or [nh*hd] / [nkv*hd] (full) */
    tensor_ref router;                           /* [E, H] */
    tensor_ref sh_gate, sh_up, sh_down;          /* [S, H], [S, H], [H, S] (shared_ffn = S) */
    tensor_ref sh_gate_inp;                      /* [H] (shared_gate) */
    tensor_ref mlp_gate, mlp_up, mlp_down;       /* [D, H], [D, H], [H, D] (dense layers, dense_ffn = D) */
    int n_stored;                                /* stored experts (n_experts unless merged) */
    int32_t *emap;                               /* [n_experts] routed -> stored (-1 pruned), NULL = identity */
    tensor_ref *experts;                         /* [n_stored][3]: gate, up, down (MoE layers) */
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
    int *etok;       /* (B) tokens routed to the current expert */
    float *ew;       /* (B) their routing weights (summed over merged group members) */
    float *xg;       /* (B, H) gathered expert input */
    float *hg, *hu;  /* (B, F) gate / up activations, F = max ffn width */
    float *yg;       /* (B, H) expert output */
    float *rope_cs;  /* (B, rope_dim/2, 2) cos, sin per position */
    float *scores;   /* (n_threads, group, max_ctx) attention scores, per thread */
    block_q8_act *qbuf; /* (B, max_in/32) quantized activations for Q8_0 matmuls */
} run_state;

struct emoe_model {
    emoe_config cfg; /* layer-list pointers cleared; lists live in layers[].is_moe / use_rope / swa */
    int status;
    char err[EMOE_ERR_LEN];
    int max_ctx, kv_f16, n_past;
    int q8_f32_act; /* Q8_0 matmuls keep f32 activations (emoe_model_set_q8_f32_act) */
    int q_dim, kv_dim, ffn_max, in_max; /* nh*hd, nkv*hd, widest ffn, widest matmul input */
    emoe_pool *pool;
    const emoe_kernels *k;
    tensor_ref embed, final_norm, lm_head; /* [V, H], [H], [V, H] */
    layer_weights *layers;                 /* [n_layers] */
    void *key_cache, *value_cache;         /* (n_layers, max_ctx, kv_dim) f32 or f16 */
    run_state s;
};

int model_error(emoe_model *m, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The matrices of stored expert e of layer l. The single point where expert weights are looked up, so a later expert
 * cache can load them just in time; today it returns the pointers given to emoe_model_set_tensor. */
expert_mats expert_weights(emoe_model *m, int layer, int expert);

#endif
