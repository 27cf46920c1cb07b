"""Hugging Face checkpoint families: config.json -> ArchSpec, and the HF tensor-name table of each family.

Adding a family means adding a `Family` entry here; the forward passes never change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from edgemoe.arch import ArchSpec
from edgemoe.errors import UnsupportedModelError


def _rope_theta(cfg: dict, default: float, rope_types: tuple = ("default", None)) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(params, dict) and params.get("rope_type", "default") not in rope_types:
        raise UnsupportedModelError(f"RoPE scaling type {params.get('rope_type')!r} is not supported yet")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or default)


def _common(cfg: dict, family: str, theta_default: float, rope_types: tuple = ("default", None)) -> dict:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return {
        "family": family,
        "n_layers": int(cfg["num_hidden_layers"]),
        "hidden": hidden,
        "vocab": int(cfg["vocab_size"]),
        "n_heads": heads,
        "n_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_kind": "neox",  # HF applies rotate_half to every family (Mixtral's checkpoint rows are pre-permuted)
        "rope_theta": _rope_theta(cfg, theta_default, rope_types),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "max_position": int(cfg.get("max_position_embeddings", 4096)),
        "bos_token_id": _first_id(cfg.get("bos_token_id")),
        "eos_token_id": _first_id(cfg.get("eos_token_id")),
    }


def _first_id(v):
    if isinstance(v, list):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _qwen_dense_layers(cfg: dict) -> list[int]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    n_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    return [i for i in range(int(cfg["num_hidden_layers"])) if i in only or n_experts == 0 or (i + 1) % step]


def _no_sliding(cfg: dict, family: str) -> None:
    # Sliding-window attention only matters beyond the window; we refuse rather than silently differ.
    if (cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window"))) and (
            family != "mixtral" or int(cfg.get("sliding_window") or 0) < int(cfg.get("max_position_embeddings", 0))):
        raise UnsupportedModelError(f"{family} with sliding-window attention is not supported yet")


def olmoe_spec(cfg: dict) -> ArchSpec:
    if cfg.get("clip_qkv") is not None:
        raise UnsupportedModelError("OLMoE with clip_qkv is not supported yet")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("OLMoE with attention_bias is not supported yet")
    return ArchSpec(
        **_common(cfg, "olmoe", 10000.0), n_experts=int(cfg["num_experts"]), top_k=int(cfg["num_experts_per_tok"]),
        expert_ffn=int(cfg["intermediate_size"]), qk_norm="full", router_fn="softmax",
        norm_topk=bool(cfg.get("norm_topk_prob", False)),
    )


def qwen2moe_spec(cfg: dict) -> ArchSpec:
    _no_sliding(cfg, "qwen2moe")
    return ArchSpec(
        **_common(cfg, "qwen2moe", 10000.0), n_experts=int(cfg["num_experts"]), top_k=int(cfg["num_experts_per_tok"]),
        expert_ffn=int(cfg["moe_intermediate_size"]), qkv_bias=bool(cfg.get("qkv_bias", True)), router_fn="softmax",
        norm_topk=bool(cfg.get("norm_topk_prob", False)),
        shared_ffn=int(cfg.get("shared_expert_intermediate_size") or 0),
        shared_gate=bool(cfg.get("shared_expert_intermediate_size")),
        dense_ffn=int(cfg.get("intermediate_size", 0)), dense_layers=_qwen_dense_layers(cfg),
    )


def qwen3moe_spec(cfg: dict) -> ArchSpec:
    _no_sliding(cfg, "qwen3moe")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("Qwen3-MoE with attention_bias is not supported yet")
    n_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts"))
    return ArchSpec(
        **_common(cfg, "qwen3moe", 10000.0), n_experts=n_experts, top_k=int(cfg["num_experts_per_tok"]),
        expert_ffn=int(cfg["moe_intermediate_size"]), qk_norm="head", router_fn="softmax",
        norm_topk=bool(cfg.get("norm_topk_prob", False)),
        dense_ffn=int(cfg.get("intermediate_size", 0)), dense_layers=_qwen_dense_layers(cfg),
    )


def mixtral_spec(cfg: dict) -> ArchSpec:
    _no_sliding(cfg, "mixtral")
    return ArchSpec(
        **_common(cfg, "mixtral", 1e6), n_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg["num_experts_per_tok"]), expert_ffn=int(cfg["intermediate_size"]), router_fn="softmax",
        norm_topk=True,
    )


def smallthinker_spec(cfg: dict) -> ArchSpec:
    """SmallThinker (PowerInfer): not in transformers; keys and defaults from its published
    configuration_smallthinker.py / modeling_smallthinker.py (SmallThinker-4BA0.6B, -21BA3B).

    Semantics (checked against that modeling code and against llama.cpp's `smallthinker` graph):
    - the router reads the raw layer input (before input_layernorm), the experts the post-attention-normed state;
    - routing: top-k on the router logits, then softmax over the k (moe_primary_router_apply_softmax) or sigmoid
      of the k normalized to sum 1 (the default) -- i.e. softmax/sigmoid, top-k, renormalize;
    - experts are ReGLU: down(relu(gate(x)) * up(x)); no shared expert, no dense layers, no QKV bias, no QK-norm;
    - rope_layout[i] == 0: layer i applies no RoPE; sliding_window_layout[i] == 1: layer i attends to the last
      sliding_window_size positions;
    - tie_word_embeddings defaults to true (then there is no lm_head.weight).
    """
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    sliding = list(cfg.get("sliding_window_layout") or [])
    rope_layout = list(cfg.get("rope_layout") or [1] * n_layers)
    for key, layout in (("rope_layout", rope_layout), ("sliding_window_layout", sliding)):
        if layout and len(layout) != n_layers:
            raise UnsupportedModelError(f"SmallThinker config: {key} has {len(layout)} entries for {n_layers} layers")
    # Options of PowerInfer's internal configuration that the published model code does not implement.
    if cfg.get("use_qk_norm"):
        raise UnsupportedModelError("SmallThinker with use_qk_norm is not supported yet")
    if cfg.get("moe_enable_secondary_experts"):
        raise UnsupportedModelError("SmallThinker with secondary experts is not supported yet")
    if int(cfg.get("moe_shared_primary_experts") or 0):
        raise UnsupportedModelError("SmallThinker with shared primary experts is not supported yet")
    if cfg.get("moe_enable_early_router") is False:
        raise UnsupportedModelError("SmallThinker with moe_enable_early_router=false is not supported yet")
    if 0 in (cfg.get("moe_layer_layout") or []):
        raise UnsupportedModelError("SmallThinker with dense layers (moe_layer_layout) is not supported yet")
    window = int(cfg.get("sliding_window_size") or 4096)
    swa_layers = [i for i, s in enumerate(sliding) if s]
    return ArchSpec(
        family="smallthinker", n_layers=n_layers, hidden=hidden, vocab=int(cfg["vocab_size"]), n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or 2), head_dim=int(cfg.get("head_dim") or 128),
        n_experts=int(cfg["moe_num_primary_experts"]), top_k=int(cfg["moe_num_active_primary_experts"]),
        expert_ffn=int(cfg["moe_ffn_hidden_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_kind="neox", rope_theta=_rope_theta(cfg, 1e6),
        router_fn="softmax" if cfg.get("moe_primary_router_apply_softmax", False) else "sigmoid",
        norm_topk=True, router_input="layer_input", activation="reglu",
        nope_layers=[i for i in range(n_layers) if not rope_layout[i]],
        sliding_window=window if swa_layers else 0,
        swa_layers=swa_layers,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_position=int(cfg.get("max_position_embeddings", 4096 * 32)),
        bos_token_id=_first_id(cfg.get("bos_token_id")), eos_token_id=_first_id(cfg.get("eos_token_id")),
    )


def _yarn(cfg: dict) -> dict:
    """YaRN RoPE fields from rope_parameters (transformers 5) or rope_scaling, resolved as transformers'
    _compute_yarn_parameters does (factor from the context ratio when absent; attention_factor from mscale)."""
    p = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if p.get("rope_type", "default") in ("default", None):
        return {}
    if p.get("rope_type") != "yarn":
        raise UnsupportedModelError(f"RoPE scaling type {p.get('rope_type')!r} is not supported yet")
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("YaRN with partial_rotary_factor != 1 is not supported yet")
    orig = int(p["original_max_position_embeddings"])
    factor = p.get("factor")
    factor = float(factor) if factor is not None else int(cfg["max_position_embeddings"]) / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    return {"rope_scaling": "yarn", "rope_factor": factor, "yarn_beta_fast": float(p.get("beta_fast") or 32),
            "yarn_beta_slow": float(p.get("beta_slow") or 1), "yarn_orig_ctx": orig,
            "yarn_truncate": bool(p.get("truncate", True)), "rope_attn_factor": float(attn)}


GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")


def gpt_oss_spec(cfg: dict) -> ArchSpec:
    """gpt-oss (transformers 5 `gpt_oss`): attention sinks, sliding / full layers, YaRN, biases on q/k/v/o, router
    and experts, clamped SwiGLU, softmax over the top-k router logits (= softmax, top-k, renormalize)."""
    n_layers = int(cfg["num_hidden_layers"])
    types = list(cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                            for i in range(n_layers)])
    if len(types) != n_layers or any(t not in GPT_OSS_LAYER_TYPES for t in types):
        raise UnsupportedModelError(f"gpt-oss config: layer_types must list {n_layers} of {GPT_OSS_LAYER_TYPES}, "
                                    f"got {types}")
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise UnsupportedModelError(f"gpt-oss config: quantization {quant!r} is not supported (edgemoe reads "
                                    "f32/f16/bf16 and MXFP4 experts)")
    window = int(cfg.get("sliding_window") or 0)
    swa = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
    bias = bool(cfg.get("attention_bias", True))
    return ArchSpec(
        **_common(cfg, "gptoss", 150000.0, ("default", None, "yarn")), n_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg["num_experts_per_tok"]), expert_ffn=int(cfg["intermediate_size"]), qkv_bias=bias,
        o_bias=bias, router_fn="softmax", norm_topk=True, activation="swiglu_clamp",
        swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)), swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        attn_sinks=True, router_bias=True, expert_bias=True, sliding_window=window if swa else 0, swa_layers=swa,
        **_yarn(cfg),
    )


@dataclass(frozen=True)
class Family:
    name: str
    spec: Callable[[dict], ArchSpec]
    moe_prefix: str  # module holding the router and experts, under model.layers.{i}.
    router: str  # router weight name under moe_prefix
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) names under {moe_prefix}.experts.{e}.
    # fused expert tensors: "gate_first" = transformers 5's [E, 2F, H] (gate rows, then up); "gpt_oss" = [E, H, 2F]
    # with gate / up interleaved in the columns, down [E, F, H], biases gate_up_proj_bias [E, 2F] / down_proj_bias
    fused: str = "gate_first"


FAMILIES: dict[str, Family] = {
    "olmoe": Family("olmoe", olmoe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": Family("qwen2moe", qwen2moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": Family("qwen3moe", qwen3moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": Family("mixtral", mixtral_spec, "block_sparse_moe", "gate.weight", ("w1", "w3", "w2")),
    "smallthinker": Family("smallthinker", smallthinker_spec, "block_sparse_moe", "primary_router.weight",
                           ("gate", "up", "down")),
    "gpt_oss": Family("gptoss", gpt_oss_spec, "mlp", "router.weight", ("gate_proj", "up_proj", "down_proj"),
                      fused="gpt_oss"),
}

SUPPORTED = ("OLMoE (olmoe), Qwen2-MoE (qwen2_moe), Qwen3-MoE (qwen3_moe), Mixtral (mixtral), SmallThinker "
             "(smallthinker), gpt-oss (gpt_oss)")


def family_for(cfg: dict, where: str) -> Family:
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; edgemoe reads {SUPPORTED}"
        )
    return FAMILIES[model_type]


def dense_hf_names(fam: Family, spec: ArchSpec, layer: int) -> dict[str, str]:
    """Role -> HF tensor name for the dense tensors of one layer (roles as in edgemoe.arch.dense_tensor_names)."""
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    names = {
        "attn_norm": p + "input_layernorm.weight",
        "wq": a + "q_proj.weight", "wk": a + "k_proj.weight", "wv": a + "v_proj.weight", "wo": a + "o_proj.weight",
        "ffn_norm": p + "post_attention_layernorm.weight",
    }
    if spec.qkv_bias:
        names.update(bq=a + "q_proj.bias", bk=a + "k_proj.bias", bv=a + "v_proj.bias")
    if spec.qk_norm != "none":
        names.update(q_norm=a + "q_norm.weight", k_norm=a + "k_norm.weight")
    if spec.o_bias:
        names["bo"] = a + "o_proj.bias"
    if spec.attn_sinks:
        names["sinks"] = a + "sinks"
    m = p + fam.moe_prefix + "."
    if spec.is_moe_layer(layer):
        names["router"] = m + fam.router
        if spec.router_bias:
            names["router_b"] = m + fam.router.rsplit(".", 1)[0] + ".bias"
        if spec.expert_bias:  # read from the fused bias tensors by Checkpoint.layer_dense
            names.update(gate_b=m + "experts.gate_up_proj_bias", up_b=m + "experts.gate_up_proj_bias",
                         down_b=m + "experts.down_proj_bias")
        if spec.shared_ffn:
            names.update(sh_gate=m + "shared_expert.gate_proj.weight", sh_up=m + "shared_expert.up_proj.weight",
                         sh_down=m + "shared_expert.down_proj.weight")
            if spec.shared_gate:
                names["sh_gate_inp"] = m + "shared_expert_gate.weight"
    else:
        names.update(mlp_gate=p + "mlp.gate_proj.weight", mlp_up=p + "mlp.up_proj.weight",
                     mlp_down=p + "mlp.down_proj.weight")
    return names
