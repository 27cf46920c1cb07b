/* Every key of the container's `arch` object (docs/FORMAT.md "arch"; edgemoe/arch.py ArchSpec is the Python view and
 * documents each), in one list: arch.h makes the emoe_config / emoe_arch members from it, arch.c the parser's table
 * (kinds, ranges, defaults) and model.c its per-layer checks. A new option is one line here.
 *
 * Define the macros you need, then include this file (no include guard: it is meant to be included several times);
 * the others expand to nothing, and all are undefined at the end.
 *   ARCH_STRING(name)                      a string outside emoe_config (emoe_arch.name)
 *   ARCH_INT(name, required, lo, hi, def)  int32_t, an integer in lo..hi
 *   ARCH_FLOAT(name, zero_ok, def)         float, finite and > 0 (zero_ok: 0 allowed too, meaning a derived default)
 *   ARCH_BOOL(name, def)                   int32_t 0 / 1
 *   ARCH_ENUM(name, names)                 int32_t, the index of the value in `names` (NULL-ended; absent = 0)
 *   ARCH_LIST(name)                        layer numbers: int32_t n_<name>; const int32_t *<name>;
 *   ARCH_MAP(name)                         the merged-expert map (ArchSpec.expert_map)
 *   ARCH_ID(name, lo, hi, def)             int64_t outside emoe_config (emoe_arch.name); lo < 0 allows null = -1
 * Order: required keys first (the parser names the first one missing). */
#ifndef ARCH_STRING
#define ARCH_STRING(name)
#endif
#ifndef ARCH_INT
#define ARCH_INT(name, required, lo, hi, def)
#endif
#ifndef ARCH_FLOAT
#define ARCH_FLOAT(name, zero_ok, def)
#endif
#ifndef ARCH_BOOL
#define ARCH_BOOL(name, def)
#endif
#ifndef ARCH_ENUM
#define ARCH_ENUM(name, names)
#endif
#ifndef ARCH_LIST
#define ARCH_LIST(name)
#endif
#ifndef ARCH_MAP
#define ARCH_MAP(name)
#endif
#ifndef ARCH_ID
#define ARCH_ID(name, lo, hi, def)
#endif

ARCH_STRING(family) /* informational ("olmoe", ...) */
ARCH_INT(n_layers, 1, 1, EMOE_MAX_LAYERS, 0)
ARCH_INT(hidden, 1, 1, EMOE_MAX_HIDDEN, 0)
ARCH_INT(vocab, 1, 1, EMOE_MAX_VOCAB, 0)
ARCH_INT(n_heads, 1, 1, EMOE_MAX_HEADS, 0)
ARCH_INT(n_kv_heads, 1, 1, EMOE_MAX_HEADS, 0)
ARCH_INT(head_dim, 1, 1, EMOE_MAX_HEAD_DIM, 0)
ARCH_INT(n_experts, 1, 1, EMOE_MAX_EXPERTS, 0)
ARCH_INT(top_k, 1, 1, EMOE_MAX_EXPERTS, 0)
ARCH_INT(expert_ffn, 1, 0, EMOE_MAX_FFN, 0)
ARCH_FLOAT(norm_eps, 0, 1e-6)
ARCH_ENUM(rope_kind, EMOE_ROPE_KINDS)
ARCH_FLOAT(rope_theta, 0, 10000.0)
ARCH_INT(rope_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0) /* rotated dims per head; 0 = head_dim */
ARCH_BOOL(qkv_bias, 0)
ARCH_ENUM(qk_norm, EMOE_QK_NORMS)
ARCH_ENUM(router_fn, EMOE_ROUTER_FNS)
ARCH_BOOL(norm_topk, 0)
ARCH_ENUM(router_input, EMOE_ROUTER_INPUTS)
ARCH_ENUM(activation, EMOE_ACTIVATIONS)
ARCH_INT(shared_ffn, 0, 0, EMOE_MAX_FFN, 0) /* 0 = no shared expert */
ARCH_BOOL(shared_gate, 0)
ARCH_INT(dense_ffn, 0, 0, EMOE_MAX_FFN, 0)
ARCH_LIST(dense_layers) /* layers with a dense MLP instead of experts */
ARCH_LIST(nope_layers)  /* layers without RoPE */
ARCH_INT(sliding_window, 0, 0, INT32_MAX, 0) /* 0 = none */
ARCH_LIST(swa_layers)
ARCH_BOOL(tie_embeddings, 0)
/* Granite's multipliers; 0 = the default (emoe_model_new: 1, attn_scale 1/sqrt(head_dim)) */
ARCH_FLOAT(embed_scale, 0, 1.0)
ARCH_FLOAT(attn_scale, 1, 0.0)
ARCH_FLOAT(residual_scale, 0, 1.0)
ARCH_FLOAT(logit_divisor, 0, 1.0)
/* DeepSeek-V3-style routing (GLM-4.5, ERNIE-4.5): experts are chosen by prob + score_bias (the layer's exp_probs_b
 * tensor: selection only), among the topk_group best of n_group equal groups (group score: group_score); the chosen
 * probs (renormalized if norm_topk) are scaled by routed_scaling. */
ARCH_BOOL(score_bias, 0)
ARCH_INT(n_group, 0, 1, EMOE_MAX_EXPERTS, 1)
ARCH_INT(topk_group, 0, 1, EMOE_MAX_EXPERTS, 1)
ARCH_ENUM(group_score, EMOE_GROUP_SCORES)
ARCH_FLOAT(routed_scaling, 0, 1.0)
/* gpt-oss: sinks and biases, the clamped SwiGLU, YaRN RoPE */
ARCH_BOOL(attn_sinks, 0)
ARCH_BOOL(o_bias, 0)
ARCH_BOOL(router_bias, 0)
ARCH_BOOL(expert_bias, 0)
ARCH_FLOAT(swiglu_alpha, 0, 1.702)
ARCH_FLOAT(swiglu_limit, 0, 7.0)
ARCH_ENUM(rope_scaling, EMOE_ROPE_SCALINGS)
ARCH_FLOAT(rope_factor, 0, 1.0)
ARCH_FLOAT(yarn_beta_fast, 0, 32.0)
ARCH_FLOAT(yarn_beta_slow, 0, 1.0)
ARCH_INT(yarn_orig_ctx, 0, 1, INT32_MAX, 4096)
ARCH_BOOL(yarn_truncate, 1)
ARCH_FLOAT(rope_attn_factor, 0, 1.0)
/* Qwen3.5 / Next: Gated DeltaNet sizes for the layers in linear_attn_layers (deltanet.c), the attention output gate */
ARCH_LIST(linear_attn_layers)
ARCH_INT(linear_k_heads, 0, 0, EMOE_MAX_HEADS, 0)
ARCH_INT(linear_v_heads, 0, 0, EMOE_MAX_HEADS, 0)
ARCH_INT(linear_k_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0)
ARCH_INT(linear_v_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0)
ARCH_INT(linear_conv, 0, 0, EMOE_MAX_CONV, 0)
ARCH_BOOL(attn_gate, 0)
/* LFM2 short convolution (shortconv.c): the layers in conv_layers, conv_kernel taps; norm_topk_eps is added to the
 * top-k sum that norm_topk divides by */
ARCH_LIST(conv_layers)
ARCH_INT(conv_kernel, 0, 0, EMOE_MAX_CONV_KERNEL, 0)
ARCH_FLOAT(norm_topk_eps, 1, 0.0)
/* Gemma-4: full-attention layers (not in swa_layers) with their own head size (0 = head_dim), KV heads (0 =
 * n_kv_heads) and proportional RoPE (global_rope_theta 0 = rope_theta; global_rope_angles 0 = the usual RoPE); values
 * = keys there; value norm; post norms; the dense MLP beside the experts; a per-layer output scale; logit soft-cap */
ARCH_INT(global_head_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0)
ARCH_INT(global_kv_heads, 0, 0, EMOE_MAX_HEADS, 0)
ARCH_FLOAT(global_rope_theta, 1, 0.0)
ARCH_INT(global_rope_angles, 0, 0, EMOE_MAX_HEAD_DIM / 2, 0)
ARCH_BOOL(global_k_eq_v, 0)
ARCH_BOOL(v_norm, 0)
ARCH_BOOL(post_norms, 0)
ARCH_BOOL(dense_beside_moe, 0)
ARCH_BOOL(layer_scale, 0)
ARCH_FLOAT(logit_softcap, 1, 0.0)
/* Multi-head Latent Attention (DeepSeek-V2/V3): kv_lora_rank 0 = plain attention */
ARCH_INT(kv_lora_rank, 0, 0, EMOE_MAX_HIDDEN, 0)
ARCH_INT(q_lora_rank, 0, 0, EMOE_MAX_HIDDEN, 0)
ARCH_INT(qk_nope_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0)
ARCH_INT(v_head_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0)
ARCH_FLOAT(mla_norm_eps, 0, 1e-6)
ARCH_MAP(expert_map)
ARCH_ID(max_position, 1, INT32_MAX, 4096)
ARCH_ID(bos_token_id, -1, INT32_MAX, -1)
ARCH_ID(eos_token_id, -1, INT32_MAX, -1)

#undef ARCH_STRING
#undef ARCH_INT
#undef ARCH_FLOAT
#undef ARCH_BOOL
#undef ARCH_ENUM
#undef ARCH_LIST
#undef ARCH_MAP
#undef ARCH_ID
