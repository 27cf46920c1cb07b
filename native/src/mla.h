/* Multi-head Latent Attention (DeepSeek-V2/V3; mla.c): the attention mixer of configs with kv_lora_rank > 0.
 *
 * Its KV cache is the model's key_cache with kv_dim = kv_lora_rank + rope_dim values per token and layer: the normed
 * latent c and the RoPE'd shared key (no value cache). Memory per token: n_layers * (kv_lora_rank + rope_dim) values
 * instead of 2 * n_layers * n_kv_heads * head_dim (model_state_bytes counts it, for the budget too). */
#ifndef EDGEMOE_MLA_H
#define EDGEMOE_MLA_H
#include <stddef.h>

typedef struct emoe_model emoe_model;
typedef struct emoe_config emoe_config;
typedef struct mla_state mla_state; /* the mixer's scratch of one forward block, owned by the model */

/* Values one token's cache row holds in one layer: kv_lora_rank + rope_dim. */
int mla_cache_dim(const emoe_config *c);
/* The widest matmul input the mixer uses (q_lora_rank, kv_lora_rank, n_heads * v_head_dim). */
int mla_in_max(const emoe_config *c);
/* Scratch for the model m (created with max_ctx and its thread pool); NULL when memory runs out. */
mla_state *mla_new(const emoe_model *m);
void mla_free(mla_state *st);
size_t mla_scratch_bytes(const emoe_model *m);
/* s->x += residual_scale * wo(MLA(attn_norm(s->x))) for the block's n_tok tokens (positions s->pos, slots s->slot);
 * appends each token's latent row to the cache first. */
void mla_attention(emoe_model *m, int layer, int n_tok);

#endif
