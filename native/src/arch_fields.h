/* Every key of the container's `arch` object, in one list with its one-line doc: arch.h makes the emoe_config /
 * emoe_arch members from it, arch.c the parser's table (kinds, ranges, defaults) and the schema it exports
 * (emoe_arch_schema_json: edgemoe/arch.py builds ArchSpec from it, `python -m edgemoe.arch_doc` the table of
 * docs/FORMAT.md "arch"), model.c its per-layer checks. A new option is one line here.
 *
 * Define the macros you need, then include this file (no include guard: it is meant to be included several times);
 * the others expand to nothing, and all are undefined at the end.
 *   ARCH_STRING(name, doc)                      a string outside emoe_config (emoe_arch.name)
 *   ARCH_INT(name, required, lo, hi, def, doc)  int32_t, an integer in lo..hi
 *   ARCH_FLOAT(name, zero_ok, def, doc)         float, finite and > 0 (zero_ok: 0 allowed too, a derived default)
 *   ARCH_BOOL(name, def, doc)                   int32_t 0 / 1
 *   ARCH_ENUM(name, names, doc)                 int32_t, the index of the value in `names` (NULL-ended; absent = 0)
 *   ARCH_LIST(name, doc)                        layer numbers: int32_t n_<name>; const int32_t *<name>;
 *   ARCH_MAP(name, doc)                         the merged-expert map (ArchSpec.expert_map)
 *   ARCH_ID(name, lo, hi, def, doc)             int64_t outside emoe_config (emoe_arch.name); lo < 0: null = -1
 * `doc`: what the field means and the rules tying it to others (its kind, range and default are stated by the macro),
 * Markdown code spans for names; it is the Python docstring and the docs/FORMAT.md row.
 * Order: required keys first (the parser names the first one missing). */
#ifndef ARCH_STRING
#define ARCH_STRING(name, doc)
#endif
#ifndef ARCH_INT
#define ARCH_INT(name, required, lo, hi, def, doc)
#endif
#ifndef ARCH_FLOAT
#define ARCH_FLOAT(name, zero_ok, def, doc)
#endif
#ifndef ARCH_BOOL
#define ARCH_BOOL(name, def, doc)
#endif
#ifndef ARCH_ENUM
#define ARCH_ENUM(name, names, doc)
#endif
#ifndef ARCH_LIST
#define ARCH_LIST(name, doc)
#endif
#ifndef ARCH_MAP
#define ARCH_MAP(name, doc)
#endif
#ifndef ARCH_ID
#define ARCH_ID(name, lo, hi, def, doc)
#endif

ARCH_STRING(family, "informational (`olmoe`, `qwen3moe`, ...): behaviour is in the other fields")
ARCH_INT(n_layers, 1, 1, EMOE_MAX_LAYERS, 0, "decoder layers")
ARCH_INT(hidden, 1, 1, EMOE_MAX_HIDDEN, 0, "width of the residual stream")
ARCH_INT(vocab, 1, 1, EMOE_MAX_VOCAB, 0, "rows of the token embedding and of the output head")
ARCH_INT(n_heads, 1, 1, EMOE_MAX_HEADS, 0, "query heads; a multiple of `n_kv_heads`")
ARCH_INT(n_kv_heads, 1, 1, EMOE_MAX_HEADS, 0, "key/value heads")
ARCH_INT(head_dim, 1, 1, EMOE_MAX_HEAD_DIM, 0, "size of one attention head")
ARCH_INT(n_experts, 1, 1, EMOE_MAX_EXPERTS, 0, "routed experts per MoE layer")
ARCH_INT(top_k, 1, 1, EMOE_MAX_EXPERTS, 0, "experts chosen per token; at most `n_experts`")
ARCH_INT(expert_ffn, 1, 0, EMOE_MAX_FFN, 0, "intermediate width of one routed expert; >= 1 when a layer is MoE")
ARCH_FLOAT(norm_eps, 0, 1e-6, "eps of every RMSNorm")
ARCH_ENUM(rope_kind, EMOE_ROPE_KINDS, "`neox`: rotate halves (GPT-NeoX, Hugging Face); `norm`: rotate adjacent pairs "
          "(GPT-J, Meta llama)")
ARCH_FLOAT(rope_theta, 0, 10000.0, "the RoPE base")
ARCH_INT(rope_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0, "rotated dims per head, even, at most `head_dim`; 0 = `head_dim`")
ARCH_BOOL(qkv_bias, 0, "biases on the q, k and v projections")
ARCH_ENUM(qk_norm, EMOE_QK_NORMS, "RMSNorm of queries and keys: `head` over each head (Qwen3), `full` over the whole "
          "projection (OLMoE)")
ARCH_ENUM(router_fn, EMOE_ROUTER_FNS, "the router's probabilities")
ARCH_BOOL(norm_topk, 0, "renormalize the chosen top-k weights to sum to 1")
ARCH_ENUM(router_input, EMOE_ROUTER_INPUTS, "what the router reads: `ffn_norm` the normalized state after attention; "
          "`layer_input` the layer's input before attention (SmallThinker); `residual_norm` the post-attention "
          "residual RMS-normalized without a weight (Gemma-4: its scale vector / sqrt(`hidden`) and per-expert scales "
          "are folded into the router rows and the down matrices by the reader)")
ARCH_ENUM(activation, EMOE_ACTIVATIONS, "the experts' (and dense MLP's) gated activation: `swiglu` silu(gate) * up; "
          "`reglu` relu(gate) * up; `swiglu_clamp` (gpt-oss) `(clamp(up, -l, l) + 1) * g * sigmoid(swiglu_alpha * g)` "
          "with `g = min(gate, l)`, `l = swiglu_limit`; `geglu_tanh` (Gemma-4) gelu_tanh(gate) * up")
ARCH_INT(shared_ffn, 0, 0, EMOE_MAX_FFN, 0, "width of the always-on shared expert (0 = none)")
ARCH_BOOL(shared_gate, 0, "the shared expert's output is scaled by sigmoid(w . x); needs `shared_ffn` >= 1")
ARCH_INT(dense_ffn, 0, 0, EMOE_MAX_FFN, 0, "width of the plain MLP of the layers in `dense_layers`; >= 1 when "
         "`dense_layers` is not empty")
ARCH_LIST(dense_layers, "layers with a dense MLP instead of experts")
ARCH_LIST(nope_layers, "layers that apply no RoPE (SmallThinker's hybrid)")
ARCH_INT(sliding_window, 0, 0, INT32_MAX, 0, "window of the layers in `swa_layers` (0 = none)")
ARCH_LIST(swa_layers, "sliding-window layers; needs `sliding_window` >= 1")
ARCH_BOOL(tie_embeddings, 0, "the output head is the token embedding (no `output.weight`)")
/* Granite's multipliers; 0 = the default (emoe_model_new: 1, attn_scale 1/sqrt(head_dim)) */
ARCH_FLOAT(embed_scale, 0, 1.0, "token embeddings are multiplied by it (Granite's `embedding_multiplier`)")
ARCH_FLOAT(attn_scale, 1, 0.0, "the attention scores' scale (Granite's `attention_multiplier`); 0 = 1/sqrt(`head_dim`)")
ARCH_FLOAT(residual_scale, 0, 1.0, "each block's output (attention, FFN) is multiplied by it before the residual add")
ARCH_FLOAT(logit_divisor, 0, 1.0, "the logits are divided by it (Granite's `logits_scaling`)")
/* DeepSeek-V3-style routing (GLM-4.5, ERNIE-4.5): experts are chosen by prob + score_bias (the layer's exp_probs_b
 * tensor: selection only), among the topk_group best of n_group equal groups (group score: group_score); the chosen
 * probs (renormalized if norm_topk) are scaled by routed_scaling. */
ARCH_BOOL(score_bias, 0, "DeepSeek-V3-style routing (GLM-4.5, ERNIE-4.5): MoE layers have `blk.{L}.exp_probs_b.bias`, "
          "added to the probabilities to choose experts (not to weight them)")
ARCH_INT(n_group, 0, 1, EMOE_MAX_EXPERTS, 1, "group-limited top-k: the experts form `n_group` equal groups of "
         "consecutive ids, only the `topk_group` best groups are eligible; `n_group` divides `n_experts`, the kept "
         "groups hold >= `top_k` experts; not combined with `expert_map`")
ARCH_INT(topk_group, 0, 1, EMOE_MAX_EXPERTS, 1, "groups kept by group-limited top-k; at most `n_group`")
ARCH_ENUM(group_score, EMOE_GROUP_SCORES, "a group's score: `top2_sum` the sum of its two best selection scores "
          "(DeepSeek-V3, GLM-4.5; groups of >= 2), `max` its best (DeepSeek-V2's group-limited greedy)")
ARCH_FLOAT(routed_scaling, 0, 1.0, "the chosen weights (after `norm_topk`) are multiplied by it")
/* gpt-oss: sinks and biases, the clamped SwiGLU, YaRN RoPE */
ARCH_BOOL(attn_sinks, 0, "gpt-oss: `blk.{L}.attn_sinks.weight` holds one logit per query head that joins each softmax "
          "denominator (its probability is dropped)")
ARCH_BOOL(o_bias, 0, "bias on the attention output projection")
ARCH_BOOL(router_bias, 0, "bias on the router logits (used for selection and weights)")
ARCH_BOOL(expert_bias, 0, "biases on every routed expert's gate, up and down (`[experts, width]` per layer)")
ARCH_FLOAT(swiglu_alpha, 0, 1.702, "`swiglu_clamp`'s sigmoid slope (see `activation`)")
ARCH_FLOAT(swiglu_limit, 0, 7.0, "`swiglu_clamp`'s clamp (see `activation`)")
ARCH_ENUM(rope_scaling, EMOE_ROPE_SCALINGS, "`yarn`: inv_freq blended between `theta^(-2j/d)` and that / "
          "`rope_factor` by a linear ramp over the dims `[low, high]` found from `yarn_beta_fast` / `yarn_beta_slow` "
          "rotations in `yarn_orig_ctx` positions (floor/ceil when `yarn_truncate`), as transformers' "
          "`_compute_yarn_parameters`; cos and sin are multiplied by `rope_attn_factor`")
ARCH_FLOAT(rope_factor, 0, 1.0, "YaRN's context extension factor")
ARCH_FLOAT(yarn_beta_fast, 0, 32.0, "YaRN: greater than `yarn_beta_slow` under `yarn`")
ARCH_FLOAT(yarn_beta_slow, 0, 1.0, "YaRN (see `yarn_beta_fast`)")
ARCH_INT(yarn_orig_ctx, 0, 1, INT32_MAX, 4096, "YaRN: the original context length")
ARCH_BOOL(yarn_truncate, 1, "YaRN: floor/ceil the ramp's dims")
ARCH_FLOAT(rope_attn_factor, 0, 1.0, "multiplies cos and sin (YaRN's attention scaling, HF's `attention_scaling`, "
           "resolved by the reader)")
/* Qwen3.5 / Next: Gated DeltaNet sizes for the layers in linear_attn_layers (deltanet.c), the attention output gate */
ARCH_LIST(linear_attn_layers, "Qwen3.5 / Next: these layers run Gated DeltaNet (native/src/deltanet.c, "
          "reference.gated_deltanet) instead of attention: q, k, v from one projection through a causal depthwise conv "
          "of `linear_conv` taps (+ SiLU), q/k L2-normalized per head, a recurrent state [`linear_k_dim`, "
          "`linear_v_dim`] per value head (value head h reads key head h // (`linear_v_heads` / `linear_k_heads`)) "
          "updated by the gated delta rule, then an RMSNorm gated by silu(z) per value head. No attention tensors and "
          "no KV cache: a fixed-size state per sequence instead, counted in the budget with the KV cache. Needs "
          "`linear_k_heads`, `linear_v_heads` (a multiple of `linear_k_heads`), `linear_k_dim`, `linear_v_dim` and "
          "`linear_conv` >= 1")
ARCH_INT(linear_k_heads, 0, 0, EMOE_MAX_HEADS, 0, "Gated DeltaNet key heads (Kh)")
ARCH_INT(linear_v_heads, 0, 0, EMOE_MAX_HEADS, 0, "Gated DeltaNet value heads (Vh)")
ARCH_INT(linear_k_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0, "Gated DeltaNet key head size (dk)")
ARCH_INT(linear_v_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0, "Gated DeltaNet value head size (dv)")
ARCH_INT(linear_conv, 0, 0, EMOE_MAX_CONV, 0, "Gated DeltaNet causal conv taps")
ARCH_BOOL(attn_gate, 0, "attention layers have `blk.{L}.attn_gate.weight`: the attention output is multiplied by "
          "sigmoid(attn_gate x) before `attn_output` (Qwen3.5 / Next gated attention)")
/* LFM2 short convolution (shortconv.c): the layers in conv_layers, conv_kernel taps; norm_topk_eps is added to the
 * top-k sum that norm_topk divides by */
ARCH_LIST(conv_layers, "LFM2 (native/src/shortconv.c): layers whose attention is replaced by a short convolution, "
          "`h += out_proj(C * conv(B * x))` with `(B, C, x) = in_proj(attn_norm(h))` and `conv` causal and depthwise "
          "over `conv_kernel` positions (zeros before the start); no KV cache: their state is the last "
          "`conv_kernel - 1` values of `B * x` per sequence (counted in the memory budget with the KV cache); needs "
          "`conv_kernel` >= 1")
ARCH_INT(conv_kernel, 0, 0, EMOE_MAX_CONV_KERNEL, 0, "taps of the short convolution (LFM2: 3)")
ARCH_FLOAT(norm_topk_eps, 1, 0.0, "`norm_topk` divides by the sum of the chosen weights plus it (LFM2-MoE: 1e-6)")
/* Gemma-4: full-attention layers (not in swa_layers) with their own head size (0 = head_dim), KV heads (0 =
 * n_kv_heads) and proportional RoPE (global_rope_theta 0 = rope_theta; global_rope_angles 0 = the usual RoPE); values
 * = keys there; value norm; post norms; the dense MLP beside the experts; a per-layer output scale; logit soft-cap */
ARCH_INT(global_head_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0, "Gemma-4: head size of the full-attention layers (those not in "
         "`swa_layers`), even; 0 = `head_dim`. Their q/k/v/o and q/k-norm tensors take it; the KV cache row is the "
         "widest layer's")
ARCH_INT(global_kv_heads, 0, 0, EMOE_MAX_HEADS, 0, "Gemma-4: KV heads of the full-attention layers, dividing "
         "`n_heads`; 0 = `n_kv_heads`")
ARCH_FLOAT(global_rope_theta, 1, 0.0, "the full-attention layers' RoPE base; 0 = `rope_theta`")
ARCH_INT(global_rope_angles, 0, 0, EMOE_MAX_HEAD_DIM / 2, 0, "> 0: proportional RoPE on full-attention layers: pairs "
         "`(j, j + d/2)` over the whole head (`d` its size) turn at `global_rope_theta^(-2j/d)` for `j` < angles, the "
         "rest stay; at most `d/2`; required when `global_head_dim` differs from `head_dim`")
ARCH_BOOL(global_k_eq_v, 0, "full-attention layers have no `attn_v`: the values are the raw key projection")
ARCH_BOOL(v_norm, 0, "each value head is RMS-normalized (no weight)")
ARCH_BOOL(post_norms, 0, "`post_attention_norm` / `post_ffw_norm` normalize each block's output before the residual "
          "add")
ARCH_BOOL(dense_beside_moe, 0, "MoE layers also run the dense MLP (`dense_ffn`): "
          "`post_ffw_norm(post_ffw_norm_1(mlp(ffn_norm(h))) + post_ffw_norm_2(moe(pre_ffw_norm_2(h))))`; needs "
          "`dense_ffn` >= 1")
ARCH_BOOL(layer_scale, 0, "each layer's output (the residual stream) is multiplied by its `layer_output_scale` scalar")
ARCH_FLOAT(logit_softcap, 1, 0.0, "logits = cap * tanh(logits / cap); 0 = none")
/* Multi-head Latent Attention (DeepSeek-V2/V3): kv_lora_rank 0 = plain attention */
ARCH_INT(kv_lora_rank, 0, 0, EMOE_MAX_HIDDEN, 0, "> 0: Multi-head Latent Attention (DeepSeek-V2/V3): per token and "
         "layer the cache holds one latent c = kv_a_norm(the first `kv_lora_rank` outputs of `attn_kv_a_mqa` x) and "
         "one shared RoPE key (its last `rope_dim` outputs); `attn_kv_b` expands c into each head's no-RoPE key "
         "(`qk_nope_dim`) and value (`v_head_dim`). Needs `head_dim` = `qk_nope_dim` + `rope_dim` (RoPE on each head's "
         "last `rope_dim` dims), `v_head_dim` >= 1, `n_kv_heads` = `n_heads`, no `qkv_bias` / `qk_norm` / "
         "`attn_sinks` / `sliding_window`")
ARCH_INT(q_lora_rank, 0, 0, EMOE_MAX_HIDDEN, 0, "> 0 (needs `kv_lora_rank`): queries are `attn_q_b(q_a_norm(attn_q_a "
         "x))` instead of `attn_q x`")
ARCH_INT(qk_nope_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0, "MLA: per-head key dims without RoPE")
ARCH_INT(v_head_dim, 0, 0, EMOE_MAX_HEAD_DIM, 0, "MLA: per-head value dims")
ARCH_FLOAT(mla_norm_eps, 0, 1e-6, "eps of `attn_q_a_norm` / `attn_kv_a_norm` (transformers builds them with its RMSNorm "
           "default, not `norm_eps`)")
ARCH_MAP(expert_map, "merged experts (MC-SMoE): per layer, routed expert e -> stored expert g (-1 = pruned: masked out "
         "of routing); empty (or an empty row) = identity; stored expert tensors are named by g (rules below)")
ARCH_ID(max_position, 1, INT32_MAX, 4096, "the longest context the model was trained for")
ARCH_ID(bos_token_id, -1, INT32_MAX, -1, "beginning-of-sequence token (null = none)")
ARCH_ID(eos_token_id, -1, INT32_MAX, -1, "end-of-sequence token (null = none)")

#undef ARCH_STRING
#undef ARCH_INT
#undef ARCH_FLOAT
#undef ARCH_BOOL
#undef ARCH_ENUM
#undef ARCH_LIST
#undef ARCH_MAP
#undef ARCH_ID
