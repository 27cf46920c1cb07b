/* LFM2's short convolution layer (EMOE_LAYER_CONV): the layer kind that replaces attention in conv layers, and
 * its rolling state. Per token (transformers' Lfm2MoeShortConv):
 *   (B, C, x) = in_proj(attn_norm(h)) split in thirds;  u = B * x;
 *   y = C * (sum_j w[:, K-1-j] * u[pos - j], j = 0..K-1, u[p < 0] = 0);   h += out_proj(y)
 * with K = conv_kernel taps per channel (depthwise, causal). The state is the last K-1 inputs u of each conv layer
 * of each sequence, like the KV cache of an attention layer but of a fixed size. */
#ifndef EDGEMOE_SHORTCONV_H
#define EDGEMOE_SHORTCONV_H
#include <stddef.h>

typedef struct emoe_model emoe_model;

/* The rolling state of every conv layer of n_seq sequences, owned by the model (like the KV cache). Position p of a
 * sequence is kept in row p % (taps - 1); rows of positions before the sequence's start are never read, so a reset
 * needs no clearing (conv_state_clear clears anyway). */
typedef struct {
    int n_layers; /* conv layers (0: no state) */
    int taps;     /* conv_kernel */
    int hidden;
    int n_seq;
    float *rows;  /* (n_seq, n_layers, taps - 1, hidden) */
} emoe_conv_state;

/* Bytes of the state of n_layers conv layers for n_seq sequences. */
size_t conv_state_bytes(int n_layers, int taps, int hidden, int n_seq);
/* (Re)allocate st for n_seq sequences, zeroed; on failure st is unchanged. EMOE_OK or EMOE_ERR_NOMEM. */
int conv_state_alloc(emoe_conv_state *st, int n_layers, int taps, int hidden, int n_seq);
void conv_state_free(emoe_conv_state *st);
/* Forget sequence seq's state (a context reset). */
void conv_state_clear(emoe_conv_state *st, int seq);

/* Layer l (a conv layer) on the block's tokens: s->x += out_proj(C * conv(B * x)) over attn_norm(s->x), reading and
 * updating the state of each token's sequence slot (tokens of one sequence in position order). */
void shortconv_forward(emoe_model *m, int l, int n_tok);

#endif
