/* The tensor table (see tensor_table.h): the one statement of which tensors a model reads. */
#include "tensor_table.h"

#include <stdio.h>
#include <string.h>

#include "json.h"
#include "model.h"

#define G(f) offsetof(emoe_model, f)
#define L(f) offsetof(layer_weights, f)
#define IF(option) (int32_t) offsetof(emoe_config, option), #option, 0 /* the arch option the tensor needs */
#define UNLESS(option) (int32_t) offsetof(emoe_config, option), #option, 1 /* ... or must not have */
#define NONE -1, NULL, 0
/* role, pattern, scope, rows, cols, layers, option, need, slot, doc. Order = enumeration order (Python's
 * TENSOR_TABLE is this table: emoe_tensor_table_json). */
const tt_entry tt_table[] = {
    {"embed", "token_embd.weight", TT_GLOBAL, TD_VOCAB, TD_HIDDEN, TL_ALL, NONE, TN_REQUIRED, G(embed), ""},
    {"final_norm", "output_norm.weight", TT_GLOBAL, TD_ONE, TD_HIDDEN, TL_ALL, NONE, TN_REQUIRED, G(final_norm), ""},
    {"lm_head", "output.weight", TT_GLOBAL, TD_VOCAB, TD_HIDDEN, TL_ALL, NONE, TN_UNLESS_TIED, G(lm_head), ""},
    {"attn_norm", "blk.%d.attn_norm.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_ALL, NONE, TN_REQUIRED, L(attn_norm),
     ""},
    {"wq", "blk.%d.attn_q.weight", TT_LAYER, TD_Q, TD_HIDDEN, TL_ATTN, UNLESS(q_lora_rank), TN_REQUIRED, L(wq), ""},
    {"wk", "blk.%d.attn_k.weight", TT_LAYER, TD_KV, TD_HIDDEN, TL_ATTN, UNLESS(kv_lora_rank), TN_REQUIRED, L(wk), ""},
    {"wv", "blk.%d.attn_v.weight", TT_LAYER, TD_KV, TD_HIDDEN, TL_ATTN_V, UNLESS(kv_lora_rank), TN_REQUIRED, L(wv),
     ""},
    {"wo", "blk.%d.attn_output.weight", TT_LAYER, TD_HIDDEN, TD_O, TL_ATTN, NONE, TN_REQUIRED, L(wo), ""},
    {"ffn_norm", "blk.%d.ffn_norm.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_ALL, NONE, TN_REQUIRED, L(ffn_norm), ""},
    {"bq", "blk.%d.attn_q.bias", TT_LAYER, TD_ONE, TD_Q, TL_ATTN, IF(qkv_bias), TN_REQUIRED, L(bq), ""},
    {"bk", "blk.%d.attn_k.bias", TT_LAYER, TD_ONE, TD_KV, TL_ATTN, IF(qkv_bias), TN_REQUIRED, L(bk), ""},
    {"bv", "blk.%d.attn_v.bias", TT_LAYER, TD_ONE, TD_KV, TL_ATTN, IF(qkv_bias), TN_REQUIRED, L(bv), ""},
    {"q_norm", "blk.%d.attn_q_norm.weight", TT_LAYER, TD_ONE, TD_QNORM, TL_ATTN, IF(qk_norm), TN_REQUIRED, L(q_norm),
     ""},
    {"k_norm", "blk.%d.attn_k_norm.weight", TT_LAYER, TD_ONE, TD_KNORM, TL_ATTN, IF(qk_norm), TN_REQUIRED, L(k_norm),
     ""},
    {"router", "blk.%d.ffn_gate_inp.weight", TT_LAYER, TD_EXPERTS, TD_HIDDEN, TL_MOE, NONE, TN_REQUIRED, L(router),
     "the router"},
    {"predictor", "blk.%d.ffn_gate_inp_pre.weight", TT_LAYER, TD_EXPERTS, TD_HIDDEN, TL_MOE, NONE, TN_OPTIONAL, L(pre),
     "the fitted expert predictor: the streaming engine's prefetch hint"},
    {"score_bias", "blk.%d.exp_probs_b.bias", TT_LAYER, TD_ONE, TD_EXPERTS, TL_MOE, IF(score_bias), TN_REQUIRED,
     L(score_bias), "selection-only router bias"},
    {"sh_gate", "blk.%d.ffn_gate_shexp.weight", TT_LAYER, TD_SHARED_FFN, TD_HIDDEN, TL_MOE, IF(shared_ffn),
     TN_REQUIRED, L(sh_gate), "shared expert"},
    {"sh_up", "blk.%d.ffn_up_shexp.weight", TT_LAYER, TD_SHARED_FFN, TD_HIDDEN, TL_MOE, IF(shared_ffn), TN_REQUIRED,
     L(sh_up), "shared expert"},
    {"sh_down", "blk.%d.ffn_down_shexp.weight", TT_LAYER, TD_HIDDEN, TD_SHARED_FFN, TL_MOE, IF(shared_ffn),
     TN_REQUIRED, L(sh_down), "shared expert"},
    {"sh_gate_inp", "blk.%d.ffn_gate_inp_shexp.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_MOE, IF(shared_gate),
     TN_REQUIRED, L(sh_gate_inp), "shared-expert gate (sigmoid)"},
    {"mlp_gate", "blk.%d.ffn_gate.weight", TT_LAYER, TD_DENSE_FFN, TD_HIDDEN, TL_DENSE, NONE, TN_REQUIRED,
     L(mlp_gate), "dense MLP"},
    {"mlp_up", "blk.%d.ffn_up.weight", TT_LAYER, TD_DENSE_FFN, TD_HIDDEN, TL_DENSE, NONE, TN_REQUIRED, L(mlp_up),
     "dense MLP"},
    {"mlp_down", "blk.%d.ffn_down.weight", TT_LAYER, TD_HIDDEN, TD_DENSE_FFN, TL_DENSE, NONE, TN_REQUIRED,
     L(mlp_down), "dense MLP"},
    {"bo", "blk.%d.attn_output.bias", TT_LAYER, TD_ONE, TD_HIDDEN, TL_ATTN, IF(o_bias), TN_REQUIRED, L(bo), ""},
    {"sinks", "blk.%d.attn_sinks.weight", TT_LAYER, TD_ONE, TD_HEADS, TL_ATTN, IF(attn_sinks), TN_REQUIRED, L(sinks),
     "per-head sink logits"},
    {"router_b", "blk.%d.ffn_gate_inp.bias", TT_LAYER, TD_ONE, TD_EXPERTS, TL_MOE, IF(router_bias), TN_REQUIRED,
     L(router_b), "router bias"},
    /* MLA (kv_lora_rank > 0): llama.cpp's deepseek2 names */
    {"wq_a", "blk.%d.attn_q_a.weight", TT_LAYER, TD_Q_LORA, TD_HIDDEN, TL_ALL, IF(q_lora_rank), TN_REQUIRED, L(wq_a),
     "MLA's low-rank queries"},
    {"q_a_norm", "blk.%d.attn_q_a_norm.weight", TT_LAYER, TD_ONE, TD_Q_LORA, TL_ALL, IF(q_lora_rank), TN_REQUIRED,
     L(q_a_norm), "MLA's low-rank queries"},
    {"wq_b", "blk.%d.attn_q_b.weight", TT_LAYER, TD_Q, TD_Q_LORA, TL_ALL, IF(q_lora_rank), TN_REQUIRED, L(wq_b),
     "MLA's low-rank queries"},
    {"wkv_a", "blk.%d.attn_kv_a_mqa.weight", TT_LAYER, TD_KV_A, TD_HIDDEN, TL_ALL, IF(kv_lora_rank), TN_REQUIRED,
     L(wkv_a), "MLA: the latent, then the shared RoPE key"},
    {"kv_a_norm", "blk.%d.attn_kv_a_norm.weight", TT_LAYER, TD_ONE, TD_KV_LORA, TL_ALL, IF(kv_lora_rank), TN_REQUIRED,
     L(kv_a_norm), "MLA: the latent's norm"},
    {"wkv_b", "blk.%d.attn_kv_b.weight", TT_LAYER, TD_KV_B, TD_KV_LORA, TL_ALL, IF(kv_lora_rank), TN_REQUIRED,
     L(wkv_b), "MLA: per head its no-RoPE key rows, then its value rows"},
    /* expert biases: resident (dense) like every bias */
    {"gate_b", "blk.%d.ffn_gate_exps.bias", TT_LAYER, TD_EXPERTS, TD_EXPERT_FFN, TL_MOE, IF(expert_bias), TN_REQUIRED,
     L(gate_b), "row g = stored expert g; f32 like every `*.bias`; dense (resident)"},
    {"up_b", "blk.%d.ffn_up_exps.bias", TT_LAYER, TD_EXPERTS, TD_EXPERT_FFN, TL_MOE, IF(expert_bias), TN_REQUIRED,
     L(up_b), "row g = stored expert g; f32 like every `*.bias`; dense (resident)"},
    {"down_b", "blk.%d.ffn_down_exps.bias", TT_LAYER, TD_EXPERTS, TD_HIDDEN, TL_MOE, IF(expert_bias), TN_REQUIRED,
     L(down_b), "row g = stored expert g; f32 like every `*.bias`; dense (resident)"},
    /* Qwen3.5 / Next: the attention output gate; Gated DeltaNet layers (deltanet.c) */
    {"attn_gate", "blk.%d.attn_gate.weight", TT_LAYER, TD_Q, TD_HIDDEN, TL_ATTN, IF(attn_gate), TN_REQUIRED,
     L(attn_gate), "the attention output times sigmoid(this x), before `attn_output`"},
    {"la_qkv", "blk.%d.ssm_in_qkv.weight", TT_LAYER, TD_LA_CONV_DIM, TD_HIDDEN, TL_LINEAR, NONE, TN_REQUIRED,
     L(la_qkv), "rows q, k, v (the conv's input)"},
    {"la_z", "blk.%d.ssm_in_z.weight", TT_LAYER, TD_LA_V, TD_HIDDEN, TL_LINEAR, NONE, TN_REQUIRED, L(la_z),
     "the output gate's input"},
    {"la_b", "blk.%d.ssm_in_b.weight", TT_LAYER, TD_LA_HEADS, TD_HIDDEN, TL_LINEAR, NONE, TN_REQUIRED, L(la_b),
     "the update strength (beta)"},
    {"la_a", "blk.%d.ssm_in_a.weight", TT_LAYER, TD_LA_HEADS, TD_HIDDEN, TL_LINEAR, NONE, TN_REQUIRED, L(la_a),
     "the decay's input"},
    {"la_conv", "blk.%d.ssm_conv1d.weight", TT_LAYER, TD_ONE, TD_LA_CONV_TAPS, TL_LINEAR, NONE, TN_REQUIRED,
     L(la_conv), "the causal conv taps, channel-major"},
    {"la_dt", "blk.%d.ssm_dt.bias", TT_LAYER, TD_ONE, TD_LA_HEADS, TL_LINEAR, NONE, TN_REQUIRED, L(la_dt),
     "decay = exp(-exp(a_log) * softplus(a + dt))"},
    {"la_a_log", "blk.%d.ssm_a_log.weight", TT_LAYER, TD_ONE, TD_LA_HEADS, TL_LINEAR, NONE, TN_REQUIRED, L(la_a_log),
     "see `ssm_dt`"},
    {"la_norm", "blk.%d.ssm_norm.weight", TT_LAYER, TD_ONE, TD_LA_VDIM, TL_LINEAR, NONE, TN_REQUIRED, L(la_norm),
     "the gated RMSNorm per value head"},
    {"la_out", "blk.%d.ssm_out.weight", TT_LAYER, TD_HIDDEN, TD_LA_V, TL_LINEAR, NONE, TN_REQUIRED, L(la_out), ""},
    /* Gemma-4's norms and layer scale */
    {"post_attn_norm", "blk.%d.post_attention_norm.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_ALL, IF(post_norms),
     TN_REQUIRED, L(post_attn_norm), "the attention block's output norm, before the residual add"},
    {"post_ffn_norm", "blk.%d.post_ffw_norm.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_ALL, IF(post_norms), TN_REQUIRED,
     L(post_ffn_norm), "the FFN block's output norm, before the residual add"},
    {"mlp_post_norm", "blk.%d.post_ffw_norm_1.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_MOE, IF(dense_beside_moe),
     TN_REQUIRED, L(mlp_post_norm), "the dense branch's output norm"},
    {"moe_pre_norm", "blk.%d.pre_ffw_norm_2.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_MOE, IF(dense_beside_moe),
     TN_REQUIRED, L(moe_pre_norm), "the experts' input norm"},
    {"moe_post_norm", "blk.%d.post_ffw_norm_2.weight", TT_LAYER, TD_ONE, TD_HIDDEN, TL_MOE, IF(dense_beside_moe),
     TN_REQUIRED, L(moe_post_norm), "the experts' output norm"},
    {"layer_scale", "blk.%d.layer_output_scale.weight", TT_LAYER, TD_ONE, TD_ONE, TL_ALL, IF(layer_scale),
     TN_REQUIRED, L(layer_scale), "the layer's output scale"},
    /* LFM2 short convolution (shortconv.c) */
    {"conv_in", "blk.%d.shortconv.in_proj.weight", TT_LAYER, TD_CONV_IN, TD_HIDDEN, TL_CONV, NONE, TN_REQUIRED,
     L(conv_in), "rows B, then C, then x"},
    {"conv_w", "blk.%d.shortconv.conv.weight", TT_LAYER, TD_HIDDEN, TD_CONV_KERNEL, TL_CONV, NONE, TN_REQUIRED,
     L(conv_w), "depthwise causal taps; the last tap reads the current token"},
    {"conv_out", "blk.%d.shortconv.out_proj.weight", TT_LAYER, TD_HIDDEN, TD_HIDDEN, TL_CONV, NONE, TN_REQUIRED,
     L(conv_out), ""},
    /* routed experts: streamed under a budget */
    {"gate", "blk.%d.expert.%d.ffn_gate.weight", TT_EXPERT, TD_EXPERT_FFN, TD_HIDDEN, TL_MOE, NONE, TN_IF_ROUTED, 0,
     "`kind = expert`, 4 KiB aligned; `f32`/`f16`/`mwq`"},
    {"up", "blk.%d.expert.%d.ffn_up.weight", TT_EXPERT, TD_EXPERT_FFN, TD_HIDDEN, TL_MOE, NONE, TN_IF_ROUTED, 1,
     "`kind = expert`, 4 KiB aligned; `f32`/`f16`/`mwq`"},
    {"down", "blk.%d.expert.%d.ffn_down.weight", TT_EXPERT, TD_HIDDEN, TD_EXPERT_FFN, TL_MOE, NONE, TN_IF_ROUTED, 2,
     "`kind = expert`, 4 KiB aligned; `f32`/`f16`/`mwq`"},
};
#undef G
#undef L
#undef IF
#undef UNLESS
#undef NONE
const int tt_count = (int)(sizeof(tt_table) / sizeof(tt_table[0]));

int64_t tt_dim(const emoe_model *m, int dim, int layer) {
    const emoe_config *c = &m->cfg;
    const layer_weights *L = &m->layers[layer];
    const int64_t q = (int64_t)c->n_heads * L->hd, kv = (int64_t)L->n_kv * L->hd; /* the layer's own sizes */
    switch (dim) {
    case TD_ONE: return 1;
    case TD_HIDDEN: return c->hidden;
    case TD_VOCAB: return c->vocab;
    case TD_Q: return q;
    case TD_KV: return kv;
    case TD_QNORM: return c->qk_norm == EMOE_QK_NORM_FULL ? q : L->hd;
    case TD_KNORM: return c->qk_norm == EMOE_QK_NORM_FULL ? kv : L->hd;
    case TD_EXPERTS: return c->n_experts;
    case TD_EXPERT_FFN: return c->expert_ffn;
    case TD_SHARED_FFN: return c->shared_ffn;
    case TD_DENSE_FFN: return c->dense_ffn;
    case TD_HEADS: return c->n_heads;
    case TD_LA_CONV_DIM: return deltanet_conv_dim(c);
    case TD_LA_CONV_TAPS: return (int64_t)deltanet_conv_dim(c) * c->linear_conv;
    case TD_LA_V: return (int64_t)c->linear_v_heads * c->linear_v_dim;
    case TD_LA_HEADS: return c->linear_v_heads;
    case TD_LA_VDIM: return c->linear_v_dim;
    case TD_CONV_IN: return 3 * (int64_t)c->hidden;
    case TD_CONV_KERNEL: return c->conv_kernel;
    case TD_O: return c->kv_lora_rank ? (int64_t)c->n_heads * c->v_head_dim : q;
    case TD_Q_LORA: return c->q_lora_rank;
    case TD_KV_LORA: return c->kv_lora_rank;
    case TD_KV_A: return (int64_t)c->kv_lora_rank + c->rope_dim;
    case TD_KV_B: return (int64_t)c->n_heads * (c->qk_nope_dim + c->v_head_dim);
    }
    return 0;
}

int tt_present(const emoe_model *m, int e, int layer) {
    const tt_entry *t = &tt_table[e];
    if (t->scope != TT_GLOBAL) {
        const layer_weights *L = &m->layers[layer];
        const int kind_ok[] = {[TL_ALL] = 1, [TL_MOE] = L->is_moe, [TL_DENSE] = !L->is_moe || m->cfg.dense_beside_moe,
                               [TL_ATTN] = L->is_attn, [TL_LINEAR] = L->is_linear, [TL_CONV] = L->conv_idx >= 0,
                               [TL_ATTN_V] = L->is_attn && !(m->cfg.global_k_eq_v && L->global)};
        if (!kind_ok[t->layers]) return 0;
    }
    return t->option < 0 || (*(const int32_t *)((const char *)&m->cfg + t->option) != 0) != t->unless;
}

/* The names and docs of the shape terms, layer kinds and needs (emoe_tensor_table_json; Python's arch._dim and
 * arch._present compute them by these names; docs/FORMAT.md shows the docs). */
struct info {
    const char *name, *doc, *what; /* what: the layer kinds' words in messages ("needs a MoE layer") */
};
static const struct info TD_INFO[] = {
    [TD_ONE] = {"one", "1"},
    [TD_HIDDEN] = {"hidden", "`hidden`"},
    [TD_VOCAB] = {"vocab", "`vocab`"},
    [TD_Q] = {"q", "`n_heads` * the layer's head size (`head_dim`, or `global_head_dim` on a full-attention layer)"},
    [TD_KV] = {"kv", "the layer's KV heads (`n_kv_heads`, or `global_kv_heads` on a full-attention layer) * its head "
                     "size"},
    [TD_QNORM] = {"q_norm", "the layer's head size (`qk_norm` = `head`), or q (`full`)"},
    [TD_KNORM] = {"k_norm", "the layer's head size (`qk_norm` = `head`), or kv (`full`)"},
    [TD_EXPERTS] = {"experts", "`n_experts`"},
    [TD_EXPERT_FFN] = {"expert_ffn", "`expert_ffn`"},
    [TD_SHARED_FFN] = {"shared_ffn", "`shared_ffn`"},
    [TD_DENSE_FFN] = {"dense_ffn", "`dense_ffn`"},
    [TD_HEADS] = {"heads", "`n_heads`"},
    [TD_LA_CONV_DIM] = {"la_conv_dim", "2 * `linear_k_heads` * `linear_k_dim` + `linear_v_heads` * `linear_v_dim` "
                                       "(q, k and v: the conv's channels)"},
    [TD_LA_CONV_TAPS] = {"la_conv_taps", "la_conv_dim * `linear_conv`"},
    [TD_LA_V] = {"la_v", "`linear_v_heads` * `linear_v_dim`"},
    [TD_LA_HEADS] = {"la_heads", "`linear_v_heads`"},
    [TD_LA_VDIM] = {"la_vdim", "`linear_v_dim`"},
    [TD_CONV_IN] = {"conv_in", "3 * `hidden`"},
    [TD_CONV_KERNEL] = {"conv_kernel", "`conv_kernel`"},
    [TD_O] = {"o", "q; with MLA (`kv_lora_rank`): `n_heads` * `v_head_dim`"},
    [TD_Q_LORA] = {"q_lora", "`q_lora_rank`"},
    [TD_KV_LORA] = {"kv_lora", "`kv_lora_rank`"},
    [TD_KV_A] = {"kv_a", "`kv_lora_rank` + `rope_dim`"},
    [TD_KV_B] = {"kv_b", "`n_heads` * (`qk_nope_dim` + `v_head_dim`)"},
};
static const struct info TL_INFO[] = {
    [TL_ALL] = {"all", "every layer", ""},
    [TL_MOE] = {"moe", "MoE layers", "a MoE layer"},
    [TL_DENSE] = {"dense", "layers with a dense MLP (non-MoE; all under `dense_beside_moe`)", "a dense layer"},
    [TL_ATTN] = {"attn", "attention layers", "an attention layer"},
    [TL_LINEAR] = {"linear", "Gated DeltaNet layers", "a linear-attention layer"},
    [TL_CONV] = {"conv", "short-convolution layers", "a conv layer"},
    [TL_ATTN_V] = {"attn_v", "attention layers with their own values (not full layers under `global_k_eq_v`)",
                   "a layer with its own values (not global_k_eq_v)"},
};
static const struct info TN_INFO[] = {
    [TN_REQUIRED] = {"required", "required"},
    [TN_UNLESS_TIED] = {"unless_tied", "absent when `tie_embeddings`"},
    [TN_OPTIONAL] = {"optional", "optional"},
    [TN_IF_ROUTED] = {"if_routed", "one per stored expert (`expert_map`); required when a routed expert maps to it"},
};
static const char *const TT_SCOPES[] = {[TT_GLOBAL] = "global", [TT_LAYER] = "layer", [TT_EXPERT] = "expert"};

const char *tt_condition_name(int e) {
    const tt_entry *t = &tt_table[e];
    return t->option_name ? t->option_name : TL_INFO[t->layers].what;
}

static void put_infos(json_out *o, const char *key, const struct info *info, size_t n) {
    json_put(o, "\"%s\": [", key);
    for (size_t i = 0; i < n; i++) {
        json_put(o, "%s{\"name\": ", i ? ",\n  " : "");
        json_put_string(o, info[i].name);
        json_put(o, ", \"doc\": ");
        json_put_string(o, info[i].doc);
        json_put(o, "}");
    }
    json_put(o, "]");
}

/* One row; its pattern with {layer} and {expert} for the %d (Python's str.format fields). */
static void put_entry(json_out *o, const tt_entry *t) {
    json_put(o, "{\"role\": ");
    json_put_string(o, t->role);
    json_put(o, ", \"pattern\": \"");
    int k = 0;
    for (const char *p = t->pattern; *p; p++) {
        if (p[0] == '%' && p[1] == 'd') json_put(o, "%s", k++ ? "{expert}" : "{layer}"), p++;
        else json_put(o, "%c", *p); /* the patterns are plain ASCII names */
    }
    json_put(o, "\", \"scope\": \"%s\", \"rows\": ", TT_SCOPES[t->scope]);
    json_put_string(o, t->rows == TD_ONE ? NULL : TD_INFO[t->rows].name);
    json_put(o, ", \"cols\": \"%s\", \"layers\": \"%s\", \"option\": ", TD_INFO[t->cols].name, TL_INFO[t->layers].name);
    json_put_string(o, t->option_name);
    json_put(o, ", \"negated\": %s, \"need\": \"%s\", \"doc\": ", t->unless ? "true" : "false", TN_INFO[t->need].name);
    json_put_string(o, t->doc);
    json_put(o, "}");
}

size_t emoe_tensor_table_json(char *buf, size_t len) {
    json_out o = {buf, buf ? len : 0, 0};
    if (o.cap) buf[0] = '\0';
    json_put(&o, "{");
    put_infos(&o, "dims", TD_INFO, sizeof TD_INFO / sizeof TD_INFO[0]);
    json_put(&o, ",\n ");
    put_infos(&o, "layer_kinds", TL_INFO, sizeof TL_INFO / sizeof TL_INFO[0]);
    json_put(&o, ",\n ");
    put_infos(&o, "needs", TN_INFO, sizeof TN_INFO / sizeof TN_INFO[0]);
    json_put(&o, ",\n \"tensors\": [");
    for (int e = 0; e < tt_count; e++) {
        json_put(&o, "%s", e ? ",\n  " : "");
        put_entry(&o, &tt_table[e]);
    }
    json_put(&o, "]}");
    return o.n;
}

/* Match one decimal number without sign or leading zeros; the number of characters read, 0 if none. */
static int match_number(const char *s, int *out) {
    if (*s < '0' || *s > '9' || (s[0] == '0' && s[1] >= '0' && s[1] <= '9')) return 0;
    long v = 0;
    int n = 0;
    while (s[n] >= '0' && s[n] <= '9') {
        v = v * 10 + (s[n++] - '0');
        if (v > 100000000) return 0; /* no model has that many layers or experts */
    }
    *out = (int)v;
    return n;
}

int tt_parse(const char *name, int *layer, int *expert) {
    for (int e = 0; e < tt_count; e++) {
        const char *p = tt_table[e].pattern, *s = name;
        int nums[2] = {0, 0}, k = 0, ok = 1;
        while (ok && *p) {
            if (p[0] == '%' && p[1] == 'd') {
                const int n = match_number(s, &nums[k++]);
                ok = n > 0, s += n, p += 2;
            } else {
                ok = *p++ == *s++;
            }
        }
        if (ok && !*s) {
            *layer = nums[0], *expert = nums[1];
            return e;
        }
    }
    return -1;
}

int tt_name(char *buf, size_t n, int e, int layer, int expert) {
    int len;
    /* the patterns are literals of this file with 0..2 %d: say so to the compiler's format checks */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
    switch (tt_table[e].scope) {
    case TT_GLOBAL: len = snprintf(buf, n, tt_table[e].pattern, 0); break;
    case TT_LAYER: len = snprintf(buf, n, tt_table[e].pattern, layer); break;
    default: len = snprintf(buf, n, tt_table[e].pattern, layer, expert); break;
    }
#pragma GCC diagnostic pop
    return len < 0 || (size_t)len >= n ? -1 : len;
}

void tt_instance(const emoe_model *m, int e, int layer, int expert, tt_item *it) {
    const tt_entry *t = &tt_table[e];
    it->entry = e, it->layer = layer, it->expert = expert;
    it->rows = tt_dim(m, t->rows, layer), it->cols = tt_dim(m, t->cols, layer);
    it->one_d = t->rows == TD_ONE;
    switch (t->need) {
    case TN_REQUIRED: it->required = 1; break;
    case TN_UNLESS_TIED: it->required = !m->cfg.tie_embeddings; break;
    case TN_OPTIONAL: it->required = 0; break;
    default: { /* TN_IF_ROUTED */
        const layer_weights *L = &m->layers[layer];
        it->required = !L->emap;
        for (int r = 0; L->emap && r < m->cfg.n_experts && !it->required; r++) it->required = L->emap[r] == expert;
    }
    }
    (void)tt_name(it->name, sizeof it->name, e, layer, expert); /* layer, expert < 1e8: always fits */
}

int tt_walk(const emoe_model *m, int (*fn)(void *ctx, const tt_item *it), void *ctx) {
    tt_item it;
    int rc;
    for (int e = 0; e < tt_count; e++)
        if (tt_table[e].scope == TT_GLOBAL) {
            tt_instance(m, e, 0, 0, &it);
            if ((rc = fn(ctx, &it))) return rc;
        }
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (int e = 0; e < tt_count; e++)
            if (tt_table[e].scope == TT_LAYER && tt_present(m, e, l)) {
                tt_instance(m, e, l, 0, &it);
                if ((rc = fn(ctx, &it))) return rc;
            }
        const int n_st = m->layers[l].is_moe ? m->layers[l].n_stored : 0;
        for (int x = 0; x < n_st; x++)
            for (int e = 0; e < tt_count; e++)
                if (tt_table[e].scope == TT_EXPERT && tt_present(m, e, l)) {
                    tt_instance(m, e, l, x, &it);
                    if ((rc = fn(ctx, &it))) return rc;
                }
    }
    return 0;
}
