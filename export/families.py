"""Hugging Face checkpoint families: config.json -> ArchSpec, and the HF tensor-name table of each family.

Adding a family means adding a `Family` entry here; the forward passes never change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgemoe.arch import ArchSpec
from edgemoe.errors import UnsupportedModelError


def _rope_theta(cfg: dict, default: float) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(params, dict) and params.get("rope_type", "default") not in ("default", None):
        raise UnsupportedModelError(f"RoPE scaling type {params.get('rope_type')!r} is not supported yet")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or default)


def _common(cfg: dict, family: str, theta_default: float) -> dict:
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
        "rope_theta": _rope_theta(cfg, theta_default),
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


def _rotary_fraction(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)


def glm4moe_spec(cfg: dict) -> ArchSpec:
    """GLM-4.5 MoE (transformers' modeling_glm4_moe.py): DeepSeek-V3 routing (sigmoid, e_score_correction_bias for
    selection, n_group / topk_group with the top-2-sum group score, norm_topk_prob, routed_scaling_factor), a shared
    expert of n_shared_experts * moe_intermediate_size, dense MLP layers before first_k_dense_replace, NeoX RoPE on
    the first partial_rotary_factor of each head, optional per-head QK-norm and q/k/v biases (o_proj has none).
    The next-token-prediction (MTP) layers after num_hidden_layers are not read."""
    base = _common(cfg, "glm4moe", 10000.0)
    n_experts = int(cfg["n_routed_experts"])
    moe_ffn = int(cfg["moe_intermediate_size"])
    return ArchSpec(
        **base, n_experts=n_experts, top_k=int(cfg["num_experts_per_tok"]), expert_ffn=moe_ffn,
        rope_dim=int(base["head_dim"] * _rotary_fraction(cfg)), qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head" if cfg.get("use_qk_norm") else "none", router_fn="sigmoid",
        norm_topk=bool(cfg.get("norm_topk_prob", True)), score_bias=True, n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1), routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
        shared_ffn=moe_ffn * int(cfg.get("n_shared_experts") or 0), dense_ffn=int(cfg["intermediate_size"]),
        dense_layers=list(range(min(int(cfg.get("first_k_dense_replace") or 0), base["n_layers"]))),
    )


def ernie45moe_spec(cfg: dict) -> ArchSpec:
    """ERNIE-4.5 MoE (transformers' modeling_ernie4_5_moe.py): MoE on layers i with (i + 1) % moe_layer_interval == 0
    and moe_layer_start_index <= i <= moe_layer_end_index (-1 = the last), a dense MLP elsewhere; softmax router,
    experts chosen by prob + e_score_correction_bias, weights = the chosen probs renormalized (denominator clamped
    at moe_norm_min, 1e-12: a sum of k probabilities that small does not occur in float32 routing, so plain
    renormalization is exact); shared experts of moe_num_shared_experts * moe_intermediate_size; interleaved
    ("norm") RoPE over the whole head; tied embeddings by default."""
    if cfg.get("use_bias"):
        raise UnsupportedModelError("ERNIE-4.5 MoE with use_bias=true (biases on every projection) is not supported yet")
    base = _common(cfg, "ernie4_5moe", 500000.0)
    base["rope_kind"] = "norm"  # its rotate_half pairs (2i, 2i+1)
    base["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    n = base["n_layers"]
    start, interval = int(cfg.get("moe_layer_start_index", 1)), int(cfg.get("moe_layer_interval", 1) or 1)
    end = int(cfg.get("moe_layer_end_index", -1))
    end = n - 1 if end == -1 else end
    moe_layers = [i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end]
    moe_ffn = int(cfg["moe_intermediate_size"])
    return ArchSpec(
        **base, n_experts=int(cfg["moe_num_experts"]), top_k=int(cfg["moe_k"]), expert_ffn=moe_ffn,
        router_fn="softmax", norm_topk=True, score_bias=True,
        shared_ffn=moe_ffn * int(cfg.get("moe_num_shared_experts") or 0), dense_ffn=int(cfg["intermediate_size"]),
        dense_layers=[i for i in range(n) if i not in moe_layers],
    )


@dataclass(frozen=True)
class Family:
    name: str
    spec: Callable[[dict], ArchSpec]
    moe_prefix: str  # module holding the router and experts, under model.layers.{i}.
    router: str  # router weight name under moe_prefix
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) names under {moe_prefix}.experts.{e}.
    shared: str = "shared_expert"  # the shared expert's module under moe_prefix
    score_bias: str = ""  # the selection-only router bias under moe_prefix (ArchSpec.score_bias)


FAMILIES: dict[str, Family] = {
    "olmoe": Family("olmoe", olmoe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": Family("qwen2moe", qwen2moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": Family("qwen3moe", qwen3moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": Family("mixtral", mixtral_spec, "block_sparse_moe", "gate.weight", ("w1", "w3", "w2")),
    "smallthinker": Family("smallthinker", smallthinker_spec, "block_sparse_moe", "primary_router.weight",
                           ("gate", "up", "down")),
    "glm4_moe": Family("glm4moe", glm4moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                       "shared_experts", "gate.e_score_correction_bias"),
    "ernie4_5_moe": Family("ernie4_5moe", ernie45moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                           "shared_experts", "moe_statics.e_score_correction_bias"),
}

SUPPORTED = ("OLMoE (olmoe), Qwen2-MoE (qwen2_moe), Qwen3-MoE (qwen3_moe), Mixtral (mixtral), SmallThinker (smallthinker), "
             "GLM-4.5 MoE (glm4_moe), ERNIE-4.5 MoE (ernie4_5_moe)")


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
    m = p + fam.moe_prefix + "."
    if spec.is_moe_layer(layer):
        names["router"] = m + fam.router
        if spec.score_bias:
            names["score_bias"] = m + fam.score_bias
        if spec.shared_ffn:
            sh = m + fam.shared + "."
            names.update(sh_gate=sh + "gate_proj.weight", sh_up=sh + "up_proj.weight", sh_down=sh + "down_proj.weight")
            if spec.shared_gate:
                names["sh_gate_inp"] = m + "shared_expert_gate.weight"
    else:
        names.update(mlp_gate=p + "mlp.gate_proj.weight", mlp_up=p + "mlp.up_proj.weight",
                     mlp_down=p + "mlp.down_proj.weight")
    return names
