/* Gated DeltaNet linear attention (Qwen3.5 / Qwen3-Next): layer kind EMOE_LAYER_LINEAR.
 *
 * Per token of one sequence, for a layer with K k-heads of size dk and V v-heads of size dv (V a multiple of K):
 *   [q k v] = silu(causal_conv(W_qkv x))        depthwise over the last `linear_conv` inputs of each channel
 *   q, k    = l2norm per head (eps 1e-6), q *= 1/sqrt(dk); v-head h reads k-head h / (V / K)
 *   beta    = sigmoid(W_b x), g = -exp(A_log) * softplus(W_a x + dt_bias)            (per v-head)
 *   S_h     = exp(g) S_h;  S_h += k (beta (v - S_h^T k))^T;  o_h = S_h^T q             (S_h: dk x dv)
 *   y       = W_out [rmsnorm(o_h) * w_norm * silu(z_h)]_h,  z = W_z x
 * The state (conv window + S) is fixed-size per layer and sequence slot; it is zeroed when a sequence's position 0
 * is run (so a reset or truncate to 0 clears it) and cannot be rewound to an earlier position: truncation keeps 0 or
 * all positions, and a block that fails part-way (a read error) starts its sequences over (n_past 0, forward.c). */
#ifndef EDGEMOE_DELTANET_H
#define EDGEMOE_DELTANET_H
#include <stddef.h>

#include "arch.h"

typedef struct emoe_model emoe_model;

/* The recurrent state of every linear-attention layer of every sequence slot, and the scratch of one block. Owned by
 * the model like the KV cache (allocated with it: deltanet_alloc_state, freed by deltanet_free). */
typedef struct {
    int n_lin;   /* linear-attention layers */
    int n_seq;   /* sequence slots the state holds */
    float *conv; /* (n_seq, n_lin, linear_conv - 1, conv_dim): the last inputs of the convolution */
    float *rec;  /* (n_seq, n_lin, linear_v_heads, linear_k_dim, linear_v_dim): S */
    float *qkv;  /* (B, conv_dim) projection, then the conv output */
    float *z;    /* (B, v_heads * v_dim) gate, then the gated-norm output */
    float *ba;   /* (B, 2 * v_heads): beta logits, then the decay logits */
    float *out;  /* (B, v_heads * v_dim) o before the gated norm */
} deltanet_state;

/* Channels of the convolution: q, k (linear_k_heads * linear_k_dim each) and v (linear_v_heads * linear_v_dim). */
int deltanet_conv_dim(const emoe_config *c);
/* Bytes of the state of n_seq slots and of the block scratch (0 when the config has no linear-attention layer). */
size_t deltanet_state_bytes(const emoe_config *c, int n_lin, int n_seq);
size_t deltanet_scratch_bytes(const emoe_config *c, int n_lin, int block);
/* (Re)allocate the state for n_seq slots (zeroed) and, the first time, the scratch. On failure the old state stays
 * and EMOE_ERR_NOMEM is returned. */
int deltanet_alloc_state(deltanet_state *d, const emoe_config *c, int n_lin, int n_seq, int block);
void deltanet_free(deltanet_state *d);
/* Layer l (a linear-attention layer) on the block: s->x += W_out(...) for the block's tokens (s->pos, s->slot). */
void deltanet_forward(emoe_model *m, int l, int n_tok);

#endif
