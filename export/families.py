"""Hugging Face checkpoint families: config.json -> ArchSpec, and the HF tensor-name table of each family.

Adding a family means adding a `Family` entry here; the forward passes never change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgemoe.arch import ArchSpec
from edgemoe.errors import FormatError, UnsupportedModelError

# Bounds on what a config may say, far above any real model (hidden 16384, 256 experts, 262k vocabularies, 126
# layers): a value beyond them is a damaged or hostile file, refused before any loop or allocation depends on it.
MAX_DIM = 1 << 20  # widths, head counts, expert counts
MAX_VOCAB = 1 << 24
MAX_LAYERS = 1 << 12
MAX_POSITION = (1 << 31) - 1  # the runtime's positions are int32
_ABSENT = object()


class ConfigFields:
    """Typed, bounded reads of config.json fields. Each bad value is a FormatError naming the field, its value and
    what was expected (the caller prefixes the file). JSON null counts as absent (configs write "head_dim": null)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def _get(self, key: str, default):
        v = self.cfg.get(key)
        if v is None:
            if default is _ABSENT:
                raise FormatError(f"missing key '{key}'")
            return default
        return v

    def int(self, key: str, default=_ABSENT, lo: int = 1, hi: int = MAX_DIM) -> int:
        v = self._get(key, default)
        if type(v) is not int or not lo <= v <= hi:
            raise FormatError(f"{key} = {v!r}: expected an integer in {lo}..{hi}")
        return v

    def float(self, key: str, default, lo: float = 0.0, hi: float = math.inf) -> float:
        """A finite number with lo < value < hi."""
        v = self._get(key, default)
        if type(v) not in (int, float) or not math.isfinite(v) or not lo < v < hi:
            bound = f"a finite number above {lo}" + (f" and below {hi}" if math.isfinite(hi) else "")
            raise FormatError(f"{key} = {v!r}: expected {bound}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if type(v) is not bool:
            raise FormatError(f"{key} = {v!r}: expected true or false")
        return v

    def layer_list(self, key: str, n_layers: int) -> list[int]:
        v = self._get(key, [])
        if not isinstance(v, list) or not all(type(i) is int and 0 <= i < n_layers for i in v):
            raise FormatError(f"{key} = {v!r:.80}: expected a list of layer indices in 0..{n_layers - 1}")
        return v

    def flags(self, key: str, n_layers: int, default: int) -> list[int]:
        """A per-layer list of 0/1 (SmallThinker's layouts); absent = `default` for every layer."""
        v = self._get(key, [])
        if v == []:
            return [default] * n_layers
        if not isinstance(v, list) or len(v) != n_layers or not all(type(i) is int and i in (0, 1) for i in v):
            raise FormatError(f"{key} = {v!r:.80}: expected a list of {n_layers} flags (0 or 1), one per layer")
        return v

    def token_id(self, key: str, vocab: int) -> int | None:
        """bos/eos: an id or a list of ids (the first is the one recorded), each in 0..vocab-1."""
        v = self._get(key, None)
        ids = v if isinstance(v, list) else [] if v is None else [v]
        if not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise FormatError(f"{key} = {v!r:.80}: expected a token id (or a list of them) in 0..{vocab - 1}")
        return ids[0] if ids else None


def _rope_theta(c: ConfigFields, default: float, rope_types: tuple = ("default", None)) -> float:
    for key in ("rope_parameters", "rope_scaling"):
        params = c.cfg.get(key)
        if params is not None and not isinstance(params, dict):
            raise FormatError(f"{key} = {params!r:.80}: expected an object (or null)")
        if params and params.get("rope_type", params.get("type", "default")) not in rope_types:
            raise UnsupportedModelError(f"RoPE scaling type {params.get('rope_type', params.get('type'))!r} is not "
                                        "supported yet")
    params = c.cfg.get("rope_parameters") or c.cfg.get("rope_scaling") or {}
    top = c.float("rope_theta", default)  # checked even when rope_parameters holds the value
    if params.get("rope_theta") is None:
        return top
    theta = ConfigFields(params).float("rope_theta", default)
    if c.cfg.get("rope_theta") is not None and top != theta:
        raise FormatError(f"rope_theta = {top} disagrees with rope_parameters.rope_theta = {theta}; which is it?")
    return theta


def _common(c: ConfigFields, family: str, theta_default: float, kv_default: int | None = None,
            head_dim_default: int | None = None, tie_default: bool = False, max_position_default: int = 4096,
            rope_types: tuple = ("default", None)) -> dict:
    heads = c.int("num_attention_heads")
    hidden = c.int("hidden_size")
    n_layers = c.int("num_hidden_layers", lo=1, hi=MAX_LAYERS)
    vocab = c.int("vocab_size", lo=1, hi=MAX_VOCAB)
    n_kv = c.int("num_key_value_heads", kv_default or heads, hi=heads)
    if heads % n_kv:
        raise FormatError(f"num_attention_heads = {heads} is not a multiple of num_key_value_heads = {n_kv}")
    if head_dim_default is None and c.cfg.get("head_dim") is None and hidden % heads:
        raise FormatError(f"hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} (and there is "
                          "no head_dim)")
    head_dim = c.int("head_dim", head_dim_default or hidden // heads)
    if head_dim % 2:
        raise FormatError(f"head_dim = {head_dim}: RoPE rotates pairs of dimensions, expected an even number")
    return {
        "family": family,
        "n_layers": n_layers,
        "hidden": hidden,
        "vocab": vocab,
        "n_heads": heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "norm_eps": c.float("rms_norm_eps", 1e-6, 0.0, 1.0),
        "rope_kind": "neox",  # HF applies rotate_half to every family (Mixtral's checkpoint rows are pre-permuted)
        "rope_theta": _rope_theta(c, theta_default, rope_types),
        "tie_embeddings": c.bool("tie_word_embeddings", tie_default),
        "max_position": c.int("max_position_embeddings", max_position_default, hi=MAX_POSITION),
        "bos_token_id": c.token_id("bos_token_id", vocab),
        "eos_token_id": c.token_id("eos_token_id", vocab),
    }


def _experts(c: ConfigFields, count_key: str, topk_key: str, count_default=_ABSENT) -> tuple[int, int]:
    n = c.int(count_key, count_default)
    return n, c.int(topk_key, hi=n)


def _qwen_dense_layers(c: ConfigFields, n_layers: int) -> list[int]:
    step = c.int("decoder_sparse_step", 1, hi=MAX_LAYERS)
    only = set(c.layer_list("mlp_only_layers", n_layers))
    return [i for i in range(n_layers) if i in only or (i + 1) % step]


def _dense_ffn(c: ConfigFields, dense_layers: list[int]) -> int:
    """intermediate_size: the width of the plain MLP of dense layers (required only when there are some)."""
    return c.int("intermediate_size", 0 if not dense_layers else _ABSENT, lo=1 if dense_layers else 0)


def _no_sliding(cfg: dict, family: str) -> None:
    # Sliding-window attention only matters beyond the window; we refuse rather than silently differ.
    window = cfg.get("sliding_window")
    if window is not None and (type(window) is not int or window < 0):
        raise FormatError(f"sliding_window = {window!r:.40}: expected a number of positions (or null)")
    if (cfg.get("use_sliding_window") or (family == "mixtral" and window)) and (
            family != "mixtral" or (window or 0) < (cfg.get("max_position_embeddings") or 0)):
        raise UnsupportedModelError(f"{family} with sliding-window attention is not supported yet")


def olmoe_spec(cfg: dict) -> ArchSpec:
    c = ConfigFields(cfg)
    if cfg.get("clip_qkv") is not None:
        raise UnsupportedModelError("OLMoE with clip_qkv is not supported yet")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("OLMoE with attention_bias is not supported yet")
    common = _common(c, "olmoe", 10000.0)
    n_experts, top_k = _experts(c, "num_experts", "num_experts_per_tok")
    return _spec(common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("intermediate_size"), qk_norm="full",
                 router_fn="softmax", norm_topk=c.bool("norm_topk_prob", False))


def qwen2moe_spec(cfg: dict) -> ArchSpec:
    c = ConfigFields(cfg)
    common = _common(c, "qwen2moe", 10000.0)
    _no_sliding(cfg, "qwen2moe")
    n_experts, top_k = _experts(c, "num_experts", "num_experts_per_tok")
    dense = _qwen_dense_layers(c, common["n_layers"])
    shared = c.int("shared_expert_intermediate_size", 0, lo=0)
    return _spec(common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("moe_intermediate_size"),
                 qkv_bias=c.bool("qkv_bias", True), router_fn="softmax", norm_topk=c.bool("norm_topk_prob", False),
                 shared_ffn=shared, shared_gate=bool(shared), dense_ffn=_dense_ffn(c, dense), dense_layers=dense)


def qwen3moe_spec(cfg: dict) -> ArchSpec:
    c = ConfigFields(cfg)
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("Qwen3-MoE with attention_bias is not supported yet")
    common = _common(c, "qwen3moe", 10000.0)
    _no_sliding(cfg, "qwen3moe")
    count_key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    n_experts, top_k = _experts(c, count_key, "num_experts_per_tok")
    dense = _qwen_dense_layers(c, common["n_layers"])
    return _spec(common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("moe_intermediate_size"),
                 qk_norm="head", router_fn="softmax", norm_topk=c.bool("norm_topk_prob", False),
                 dense_ffn=_dense_ffn(c, dense), dense_layers=dense)


def mixtral_spec(cfg: dict) -> ArchSpec:
    c = ConfigFields(cfg)
    common = _common(c, "mixtral", 1e6)
    _no_sliding(cfg, "mixtral")
    n_experts, top_k = _experts(c, "num_local_experts", "num_experts_per_tok")
    return _spec(common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("intermediate_size"),
                 router_fn="softmax", norm_topk=True)


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
    c = ConfigFields(cfg)
    common = _common(c, "smallthinker", 1e6, kv_default=2, head_dim_default=128, tie_default=True,
                     max_position_default=4096 * 32)
    n_layers = common["n_layers"]
    sliding = c.flags("sliding_window_layout", n_layers, 0)
    rope_layout = c.flags("rope_layout", n_layers, 1)
    # Options of PowerInfer's internal configuration that the published model code does not implement.
    if cfg.get("use_qk_norm"):
        raise UnsupportedModelError("SmallThinker with use_qk_norm is not supported yet")
    if cfg.get("moe_enable_secondary_experts"):
        raise UnsupportedModelError("SmallThinker with secondary experts is not supported yet")
    if c.int("moe_shared_primary_experts", 0, lo=0):
        raise UnsupportedModelError("SmallThinker with shared primary experts is not supported yet")
    if cfg.get("moe_enable_early_router") is False:
        raise UnsupportedModelError("SmallThinker with moe_enable_early_router=false is not supported yet")
    if 0 in c.flags("moe_layer_layout", n_layers, 1):
        raise UnsupportedModelError("SmallThinker with dense layers (moe_layer_layout) is not supported yet")
    window = c.int("sliding_window_size", 4096, hi=MAX_POSITION)
    swa_layers = [i for i, s in enumerate(sliding) if s]
    n_experts, top_k = _experts(c, "moe_num_primary_experts", "moe_num_active_primary_experts")
    return _spec(
        common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("moe_ffn_hidden_size"),
        router_fn="softmax" if c.bool("moe_primary_router_apply_softmax", False) else "sigmoid",
        norm_topk=True, router_input="layer_input", activation="reglu",
        nope_layers=[i for i in range(n_layers) if not rope_layout[i]],
        sliding_window=window if swa_layers else 0, swa_layers=swa_layers,
    )


def _spec(common: dict, **fields) -> ArchSpec:
    try:
        return ArchSpec(**common, **fields)
    except ValueError as e:  # ArchSpec's own consistency checks
        raise FormatError(str(e)) from None


def granitemoe_spec(cfg: dict) -> ArchSpec:
    """Granite-MoE and its shared-expert variant (transformers' modeling_granitemoe / modeling_granitemoeshared).

    - embeddings x embedding_multiplier; attention scores x attention_multiplier (instead of 1/sqrt(head_dim));
      each block's output (attention, then MoE + shared MLP) x residual_multiplier before the residual add;
      logits / logits_scaling;
    - routing: top-k of the router logits, then softmax over those k = softmax over all, top-k, renormalize;
    - experts fused: input_linear [E, 2F, H] (rows: gate, then up: `.chunk(2)`), output_linear [E, H, F] = down;
      the shared MLP (shared_intermediate_size > 0) the same with [2S, H] / [H, S], ungated, in every layer.
    """
    c = ConfigFields(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"Granite-MoE with hidden_act={cfg.get('hidden_act')!r} is not supported yet "
                                    f"(expected 'silu')")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("Granite-MoE with attention_bias is not supported yet")
    common = _common(c, "granitemoe", 10000.0)
    scales = {field: c.float(key, 1.0) for key, field in (
        ("embedding_multiplier", "embed_scale"), ("attention_multiplier", "attn_scale"),
        ("residual_multiplier", "residual_scale"), ("logits_scaling", "logit_divisor"))}
    n_experts, top_k = _experts(c, "num_local_experts", "num_experts_per_tok")
    return _spec(common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("intermediate_size"),
                 router_fn="softmax", norm_topk=True, shared_ffn=c.int("shared_intermediate_size", 0, lo=0),
                 **scales)


def _rotary_fraction(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)


def glm4moe_spec(cfg: dict) -> ArchSpec:
    """GLM-4.5 MoE (transformers' modeling_glm4_moe.py): DeepSeek-V3 routing (sigmoid, e_score_correction_bias for
    selection, n_group / topk_group with the top-2-sum group score, norm_topk_prob, routed_scaling_factor), a shared
    expert of n_shared_experts * moe_intermediate_size, dense MLP layers before first_k_dense_replace, NeoX RoPE on
    the first partial_rotary_factor of each head, optional per-head QK-norm and q/k/v biases (o_proj has none).
    The next-token-prediction (MTP) layers after num_hidden_layers are not read."""
    c = ConfigFields(cfg)
    base = _common(c, "glm4moe", 10000.0)
    n_experts, top_k = _experts(c, "n_routed_experts", "num_experts_per_tok")
    moe_ffn = c.int("moe_intermediate_size")
    return _spec(
        base, n_experts=n_experts, top_k=top_k, expert_ffn=moe_ffn,
        rope_dim=int(base["head_dim"] * _rotary_fraction(cfg)), qkv_bias=c.bool("attention_bias", False),
        qk_norm="head" if c.bool("use_qk_norm", False) else "none", router_fn="sigmoid",
        norm_topk=c.bool("norm_topk_prob", True), score_bias=True, n_group=c.int("n_group", 1),
        topk_group=c.int("topk_group", 1), routed_scaling=c.float("routed_scaling_factor", 1.0),
        shared_ffn=moe_ffn * c.int("n_shared_experts", 0, lo=0), dense_ffn=c.int("intermediate_size"),
        dense_layers=list(range(min(c.int("first_k_dense_replace", 0, lo=0), base["n_layers"]))),
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
    c = ConfigFields(cfg)
    base = _common(c, "ernie4_5moe", 500000.0, tie_default=True)
    base["rope_kind"] = "norm"  # its rotate_half pairs (2i, 2i+1)
    n = base["n_layers"]
    start, interval = c.int("moe_layer_start_index", 1, lo=0), c.int("moe_layer_interval", 1)
    end = c.int("moe_layer_end_index", -1, lo=-1)
    end = n - 1 if end == -1 else end
    moe_layers = [i for i in range(n) if (i + 1) % interval == 0 and start <= i <= end]
    moe_ffn = c.int("moe_intermediate_size")
    n_experts, top_k = _experts(c, "moe_num_experts", "moe_k")
    return _spec(
        base, n_experts=n_experts, top_k=top_k, expert_ffn=moe_ffn,
        router_fn="softmax", norm_topk=True, score_bias=True,
        shared_ffn=moe_ffn * c.int("moe_num_shared_experts", 0, lo=0), dense_ffn=c.int("intermediate_size"),
        dense_layers=[i for i in range(n) if i not in moe_layers],
    )


def _yarn(c: ConfigFields) -> dict:
    """YaRN RoPE fields from rope_parameters (transformers 5) or rope_scaling, resolved as transformers'
    _compute_yarn_parameters does (factor from the context ratio when absent; attention_factor from mscale)."""
    p = c.cfg.get("rope_parameters") or c.cfg.get("rope_scaling") or {}
    if not isinstance(p, dict):
        raise FormatError(f"rope_parameters = {p!r:.80}: expected an object (or null)")
    if p.get("rope_type", "default") in ("default", None):
        return {}
    if p.get("rope_type") != "yarn":
        raise UnsupportedModelError(f"RoPE scaling type {p.get('rope_type')!r} is not supported yet")
    y = ConfigFields(p)
    if y.float("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("YaRN with partial_rotary_factor != 1 is not supported yet")
    orig = y.int("original_max_position_embeddings", hi=MAX_POSITION)
    factor = y.float("factor", c.int("max_position_embeddings", hi=MAX_POSITION) / orig)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, y.float("mscale", 1.0)) / mscale(factor, y.float("mscale_all_dim", 1.0)) \
            if ms and ms_all else mscale(factor)
    else:
        attn = y.float("attention_factor", 1.0)
    return {"rope_scaling": "yarn", "rope_factor": factor, "yarn_beta_fast": y.float("beta_fast", 32.0),
            "yarn_beta_slow": y.float("beta_slow", 1.0), "yarn_orig_ctx": orig,
            "yarn_truncate": y.bool("truncate", True), "rope_attn_factor": float(attn)}


def _mla(c: ConfigFields, base: dict) -> dict:
    """Multi-head Latent Attention fields (DeepSeek-V2/V3): the q/k head is qk_nope_head_dim + qk_rope_head_dim with
    RoPE on its last qk_rope_head_dim dims, one expanded key and value per head; q_lora_rank null = a plain q_proj.
    transformers scales the scores by qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    if c.bool("attention_bias", False):
        raise UnsupportedModelError("DeepSeek with attention_bias=true is not supported yet")
    if c.bool("mlp_bias", False):
        raise UnsupportedModelError("DeepSeek with mlp_bias=true is not supported yet")
    if c.cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"DeepSeek with hidden_act={c.cfg.get('hidden_act')!r} is not supported yet "
                                    "(expected 'silu')")
    nope, rope = c.int("qk_nope_head_dim", 128, lo=0, hi=4096), c.int("qk_rope_head_dim", 64, hi=4096)
    if rope % 2:
        raise FormatError(f"qk_rope_head_dim = {rope}: RoPE rotates pairs of dimensions, expected an even number")
    head_dim = nope + rope
    fields = {"head_dim": head_dim, "n_kv_heads": base["n_heads"], "rope_dim": rope,
              "kv_lora_rank": c.int("kv_lora_rank", 512), "q_lora_rank": c.int("q_lora_rank", 0, lo=0),
              "qk_nope_dim": nope, "v_head_dim": c.int("v_head_dim", 128)}
    yarn = _yarn(c)
    fields.update(yarn)
    p = c.cfg.get("rope_parameters") or c.cfg.get("rope_scaling") or {}
    if yarn and p.get("mscale_all_dim"):
        m = 0.1 * ConfigFields(p).float("mscale_all_dim", 0.0) * math.log(yarn["rope_factor"]) + 1.0 \
            if yarn["rope_factor"] > 1 else 1.0
        fields["attn_scale"] = float(head_dim ** -0.5 * m * m)
    return fields


def _deepseek_base(c: ConfigFields, family: str, theta: float) -> dict:
    # num_key_value_heads does not shape MLA (every head expands the one latent; V3's default 128 is not the head
    # count of a smaller config) and head_dim is transformers' alias of qk_rope_head_dim: both replaced by _mla
    plain = ConfigFields(dict(c.cfg, num_key_value_heads=None, head_dim=None))
    base = _common(plain, family, theta, head_dim_default=2, rope_types=("default", None, "yarn"))
    base.update(_mla(c, base))
    base["rope_kind"] = "norm"  # DeepSeek's RoPE rotates adjacent pairs (2i, 2i+1)
    return base


def _first_dense(c: ConfigFields, n_layers: int) -> list[int]:
    return list(range(min(c.int("first_k_dense_replace", 0, lo=0, hi=MAX_LAYERS), n_layers)))


def deepseek_v2_spec(cfg: dict) -> ArchSpec:
    """DeepSeek-V2 / V2-Lite (transformers' modeling_deepseek_v2.py): MLA with interleaved RoPE (a complex product
    over pairs (2i, 2i+1)); softmax router, topk_method greedy or group_limited_greedy (groups scored by their best
    expert, topk_group kept), no renormalization (its router ignores norm_topk_prob), weights x routed_scaling_factor;
    shared experts of n_shared_experts * moe_intermediate_size; dense MLP layers before first_k_dense_replace."""
    c = ConfigFields(cfg)
    base = _deepseek_base(c, "deepseek2", 10000.0)
    method = cfg.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"DeepSeek-V2 topk_method {method!r:.40} is not supported (edgemoe runs 'greedy' "
                                    "and 'group_limited_greedy')")
    groups = {}
    if method == "group_limited_greedy":
        groups = {"n_group": c.int("n_group"), "topk_group": c.int("topk_group"), "group_score": "max"}
    n_experts, top_k = _experts(c, "n_routed_experts", "num_experts_per_tok")
    moe_ffn = c.int("moe_intermediate_size")
    dense = _first_dense(c, base["n_layers"])
    return _spec(base, n_experts=n_experts, top_k=top_k, expert_ffn=moe_ffn, router_fn="softmax", norm_topk=False,
                 routed_scaling=c.float("routed_scaling_factor", 1.0),
                 shared_ffn=moe_ffn * c.int("n_shared_experts", 0, lo=0),
                 dense_ffn=_dense_ffn(c, dense), dense_layers=dense, **groups)


def deepseek_v3_spec(cfg: dict) -> ArchSpec:
    """DeepSeek-V3 / Moonlight (transformers' modeling_deepseek_v3.py): MLA (RoPE over pairs (2i, 2i+1) when
    rope_interleave, the default: its output order differs from V2's, but q and k share it, so the scores are the same;
    rotate-half otherwise); sigmoid router, experts chosen by score + e_score_correction_bias among the topk_group best
    of n_group groups (a group's two best summed), weights the chosen scores (renormalized if norm_topk_prob) x
    routed_scaling_factor; shared experts; dense layers before first_k_dense_replace. MTP layers are not read."""
    c = ConfigFields(cfg)
    base = _deepseek_base(c, "deepseek2", 10000.0)
    if not c.bool("rope_interleave", True):
        base["rope_kind"] = "neox"
    n_experts, top_k = _experts(c, "n_routed_experts", "num_experts_per_tok")
    moe_ffn = c.int("moe_intermediate_size")
    dense = _first_dense(c, base["n_layers"])
    return _spec(base, n_experts=n_experts, top_k=top_k, expert_ffn=moe_ffn, router_fn="sigmoid",
                 norm_topk=c.bool("norm_topk_prob", True), score_bias=True, n_group=c.int("n_group", 1),
                 topk_group=c.int("topk_group", 1), routed_scaling=c.float("routed_scaling_factor", 1.0),
                 shared_ffn=moe_ffn * c.int("n_shared_experts", 0, lo=0),
                 dense_ffn=_dense_ffn(c, dense), dense_layers=dense)


GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")


def gpt_oss_spec(cfg: dict) -> ArchSpec:
    """gpt-oss (transformers 5 `gpt_oss`): attention sinks, sliding / full layers, YaRN, biases on q/k/v/o, router
    and experts, clamped SwiGLU, softmax over the top-k router logits (= softmax, top-k, renormalize)."""
    c = ConfigFields(cfg)
    common = _common(c, "gptoss", 150000.0, rope_types=("default", None, "yarn"))
    n_layers = common["n_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                       for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not all(isinstance(t, str) for t in types):
        raise FormatError(f"layer_types = {types!r:.80}: expected a list of {n_layers} layer type names")
    if any(t not in GPT_OSS_LAYER_TYPES for t in types):  # a layer kind edgemoe does not run
        raise UnsupportedModelError(f"gpt-oss layer_types {sorted(set(types) - set(GPT_OSS_LAYER_TYPES))} are not "
                                    f"supported (edgemoe runs {GPT_OSS_LAYER_TYPES})")
    qcfg = cfg.get("quantization_config") or {}
    quant = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
    if quant not in (None, "mxfp4"):
        raise UnsupportedModelError(f"gpt-oss quantization {quant!r:.40} is not supported (edgemoe reads "
                                    "f32/f16/bf16 and MXFP4 experts)")
    window = c.int("sliding_window", 0, lo=0, hi=MAX_POSITION)
    swa = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
    bias = c.bool("attention_bias", True)
    n_experts, top_k = _experts(c, "num_local_experts", "num_experts_per_tok")
    return _spec(
        common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("intermediate_size"), qkv_bias=bias,
        o_bias=bias, router_fn="softmax", norm_topk=True, activation="swiglu_clamp",
        swiglu_alpha=c.float("swiglu_alpha", 1.702), swiglu_limit=c.float("swiglu_limit", 7.0),
        attn_sinks=True, router_bias=True, expert_bias=True, sliding_window=window if swa else 0, swa_layers=swa,
        **_yarn(c),
    )


QWEN35_LAYER_TYPES = ("linear_attention", "full_attention")


def qwen3next_spec(cfg: dict) -> ArchSpec:
    """Qwen3-Next (`qwen3_next`, modeling_qwen3_next.py): Qwen3.5-MoE's layers (qwen35moe_spec) with the DeltaNet
    projections fused per key head (in_proj_qkvz, in_proj_ba: Checkpoint.layer_dense splits them), norm_topk_prob
    from the config and dense MLP layers by decoder_sparse_step / mlp_only_layers."""
    c = ConfigFields(cfg)
    spec = qwen35moe_spec(cfg, "qwen3next")
    dense = _qwen_dense_layers(c, spec.n_layers)
    return dataclasses.replace(spec, norm_topk=c.bool("norm_topk_prob", True), dense_layers=dense,
                               dense_ffn=_dense_ffn(c, dense))


def qwen35moe_spec(cfg: dict, family: str = "qwen35moe") -> ArchSpec:
    """Qwen3.5 / 3.6 MoE text model (transformers 5 `qwen3_5_moe_text`, modeling_qwen3_5_moe.py): layer_types mixes
    Gated DeltaNet (`linear_attention`) and gated full attention (q_proj also yields a per-head output gate; per-head
    QK-norm; NeoX RoPE on the first partial_rotary_factor of each head -- its multimodal sections coincide for text
    positions); every layer MoE: softmax router, top-k renormalized, plus a sigmoid-gated shared expert. Its RMSNorms
    scale by (1 + weight): the reader stores 1 + weight (Family.norm_offset)."""
    c = ConfigFields(cfg)
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("Qwen3.5-MoE with attention_bias is not supported yet")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"Qwen3.5-MoE with hidden_act={cfg.get('hidden_act')!r} is not supported "
                                    "(expected 'silu')")
    common = _common(c, family, 10000.0)
    n_layers = common["n_layers"]
    interval = c.int("full_attention_interval", 4, hi=MAX_LAYERS)
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                       for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not all(isinstance(t, str) for t in types):
        raise FormatError(f"layer_types = {types!r:.80}: expected a list of {n_layers} layer type names")
    if any(t not in QWEN35_LAYER_TYPES for t in types):
        raise UnsupportedModelError(f"Qwen3.5-MoE layer_types {sorted(set(types) - set(QWEN35_LAYER_TYPES))} are not "
                                    f"supported (edgemoe runs {QWEN35_LAYER_TYPES})")
    rope_dim = int(common["head_dim"] * _rotary_fraction(cfg))
    if rope_dim % 2 or rope_dim < 2:
        raise UnsupportedModelError(f"head_dim {common['head_dim']} x partial_rotary_factor {_rotary_fraction(cfg)} = "
                                    f"{rope_dim} rotated dims: edgemoe needs an even number >= 2")
    n_experts, top_k = _experts(c, "num_experts", "num_experts_per_tok")
    shared = c.int("shared_expert_intermediate_size", 0, lo=0)
    return _spec(
        common, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("moe_intermediate_size"), qk_norm="head",
        rope_dim=rope_dim, router_fn="softmax", norm_topk=True, shared_ffn=shared, shared_gate=bool(shared),
        attn_gate=True, linear_attn_layers=[i for i, t in enumerate(types) if t == "linear_attention"],
        linear_k_heads=c.int("linear_num_key_heads"), linear_v_heads=c.int("linear_num_value_heads"),
        linear_k_dim=c.int("linear_key_head_dim", hi=4096), linear_v_dim=c.int("linear_value_head_dim", hi=4096),
        linear_conv=c.int("linear_conv_kernel_dim", 4, hi=64),
    )


LFM2_LAYER_TYPES = ("conv", "full_attention")


def lfm2moe_spec(cfg: dict) -> ArchSpec:
    """LFM2-MoE (transformers 5 `lfm2_moe`, modeling_lfm2_moe.py): layer_types mixes "conv" layers (a gated short
    causal convolution of conv_L_cache taps: ArchSpec.conv_layers) and "full_attention" layers (GQA, per-head RMSNorm
    on q and k, NeoX RoPE); both read operator_norm(x). The first num_dense_layers layers have a dense SwiGLU MLP
    (intermediate_size), the others experts of moe_intermediate_size: sigmoid router, experts chosen by prob +
    expert_bias (use_expert_bias: selection only), weights = the chosen probs / (their sum + 1e-6) (norm_topk_prob)
    times routed_scaling_factor. RMSNorm eps is norm_eps; the final norm is model.embedding_norm."""
    c = ConfigFields(cfg)
    if c.bool("conv_bias", False):
        raise UnsupportedModelError("LFM2-MoE with conv_bias=true (biases on in_proj, conv and out_proj) is not "
                                    "supported yet")
    tie = c.bool("tie_word_embeddings", c.bool("tie_embedding", True))  # the config's older key as the default
    base = _common(c, "lfm2moe", 1e6, tie_default=tie, max_position_default=128000)
    base["norm_eps"] = c.float("norm_eps", 1e-5, 0.0, 1.0)
    n = base["n_layers"]
    types = cfg.get("layer_types")
    if not isinstance(types, list) or len(types) != n or not all(isinstance(t, str) for t in types):
        raise FormatError(f"layer_types = {types!r:.80}: expected a list of {n} layer type names")
    if any(t not in LFM2_LAYER_TYPES for t in types):
        raise UnsupportedModelError(f"LFM2-MoE layer_types {sorted(set(types) - set(LFM2_LAYER_TYPES))} are not "
                                    f"supported (edgemoe runs {LFM2_LAYER_TYPES})")
    n_experts, top_k = _experts(c, "num_experts", "num_experts_per_tok")
    norm_topk = c.bool("norm_topk_prob", True)
    dense = list(range(min(c.int("num_dense_layers", 2, lo=0, hi=MAX_LAYERS), n)))
    return _spec(
        base, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("moe_intermediate_size"), qk_norm="head",
        router_fn="sigmoid", norm_topk=norm_topk, norm_topk_eps=1e-6 if norm_topk else 0.0,
        score_bias=c.bool("use_expert_bias", True), routed_scaling=c.float("routed_scaling_factor", 1.0),
        dense_ffn=_dense_ffn(c, dense), dense_layers=dense,
        conv_layers=[i for i, t in enumerate(types) if t == "conv"], conv_kernel=c.int("conv_L_cache", 3, hi=64),
    )


def lfm2_hf_names(spec: ArchSpec, layer: int) -> dict[str, str]:
    """Role -> HF tensor name of one LFM2 layer's dense tensors (its own module names, over the common ones)."""
    p = f"model.layers.{layer}."
    names = {"attn_norm": p + "operator_norm.weight", "ffn_norm": p + "ffn_norm.weight"}
    if layer in spec.conv_layers:
        names.update(conv_in=p + "conv.in_proj.weight", conv_w=p + "conv.conv.weight",
                     conv_out=p + "conv.out_proj.weight")
    else:
        a = p + "self_attn."
        names.update(wq=a + "q_proj.weight", wk=a + "k_proj.weight", wv=a + "v_proj.weight", wo=a + "out_proj.weight",
                     q_norm=a + "q_layernorm.weight", k_norm=a + "k_layernorm.weight")
    f = p + "feed_forward."
    if spec.is_moe_layer(layer):
        names["router"] = f + "gate.weight"
        if spec.score_bias:
            names["score_bias"] = f + "expert_bias"
    else:
        names.update(mlp_gate=f + "w1.weight", mlp_up=f + "w3.weight", mlp_down=f + "w2.weight")
    return names


GEMMA4_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma4_text(cfg: dict) -> dict:
    """The text model's config: the top level (gemma4_text) or text_config of a multimodal gemma4 checkpoint."""
    if cfg.get("model_type") != "gemma4":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedModelError("this gemma4 checkpoint has no text_config (a vision or audio tower only?): "
                                    "edgemoe runs the Gemma-4 text model, which it needs")
    return text


def _gemma4_rope(c: ConfigFields, global_head_dim: int) -> tuple[float, float, int]:
    """(sliding theta, full-attention theta, full-attention rotated angles) from rope_parameters per layer type."""
    params = c.cfg.get("rope_parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(params.get(t, {}), dict) for t in GEMMA4_LAYER_TYPES):
        raise FormatError(f"rope_parameters = {params!r:.80}: expected an object per layer type")
    sliding, full = (ConfigFields(params.get(t) or {}) for t in GEMMA4_LAYER_TYPES)
    for name, p in (("sliding_attention", sliding), ("full_attention", full)):
        kind = p.cfg.get("rope_type", "default")
        if kind not in ("default", "proportional") or (kind == "proportional" and p.float("factor", 1.0) != 1.0):
            raise UnsupportedModelError(f"rope_parameters.{name}: RoPE type {kind!r} (factor "
                                        f"{p.cfg.get('factor', 1.0)}) is not supported (edgemoe runs 'default' and "
                                        "'proportional' with factor 1)")
    if sliding.cfg.get("rope_type", "default") != "default" and sliding.float("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("rope_parameters.sliding_attention: partial rotation is not supported")
    fraction = full.float("partial_rotary_factor", 1.0, 0.0, 1.0 + 1e-9) if full.cfg.get("rope_type") == \
        "proportional" else 1.0
    return sliding.float("rope_theta", 10000.0), full.float("rope_theta", 1e6), int(fraction * global_head_dim // 2)


def _gemma4_global_attention(c: ConfigFields, types: list[str], head_dim: int, n_kv: int) -> tuple[int, int]:
    """(head size, KV heads) of the full-attention layers: per_layer_config (as transformers 5 writes it) or
    global_head_dim / num_global_key_value_heads (the published configs)."""
    per = c.cfg.get("per_layer_config")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if per is None:
        kv = c.int("num_global_key_value_heads", n_kv) if c.bool("attention_k_eq_v", False) else n_kv
        return c.int("global_head_dim", 512), kv
    if not isinstance(per, dict):
        raise FormatError(f"per_layer_config = {per!r:.80}: expected an object of layer -> overrides")
    sizes = set()
    for key, over in per.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(over, dict)) or int(key) not in full or \
                set(over) - {"head_dim", "num_key_value_heads"}:
            raise UnsupportedModelError(f"per_layer_config[{key!r:.20}] = {over!r:.80}: edgemoe runs overrides of "
                                        "head_dim / num_key_value_heads on full-attention layers only")
        o = ConfigFields(over)
        sizes.add((o.int("head_dim", head_dim), o.int("num_key_value_heads", n_kv)))
    if len(sizes) > 1 or (sizes and len(per) != len(full)):
        raise UnsupportedModelError(f"per_layer_config gives full-attention layers different sizes {sorted(sizes)}: "
                                    "edgemoe runs one head size for all of them")
    return sizes.pop() if sizes else (head_dim, n_kv)


def gemma4_spec(cfg: dict) -> ArchSpec:
    """Gemma-4 MoE text model (transformers 5 modeling_gemma4.py, Gemma4TextDecoderLayer with enable_moe_block):
    sliding / full-attention layers (layer_types) with their own head size, KV heads and RoPE (default on sliding
    layers, proportional on full ones), values = keys on full layers (attention_k_eq_v), q/k norms with weights and
    a weightless v norm, attention scale 1; every layer runs the dense GELU-tanh MLP and the MoE block side by side
    with Gemma's pre/post norms, then multiplies the residual stream by its layer_scalar; embeddings x sqrt(hidden),
    logits soft-capped. Router: softmax over all experts, top-k renormalized, x per_expert_scale (folded into the
    down matrices by the reader), on the residual RMS-normalized without weight x scale / sqrt(hidden) (folded
    into the router). Not read: per-layer input embeddings, KV sharing between layers, the vision / audio towers."""
    text = _gemma4_text(cfg)
    c = ConfigFields(text)
    if not c.bool("enable_moe_block", False):
        raise UnsupportedModelError("Gemma-4 without enable_moe_block (a dense Gemma-4) is not supported: edgemoe "
                                    "runs the MoE variant (26B-A4B)")
    for key, what in (("hidden_size_per_layer_input", "per-layer input embeddings"),
                      ("num_kv_shared_layers", "KV sharing between layers")):
        if c.int(key, 0, lo=0):
            raise UnsupportedModelError(f"Gemma-4 with {key} = {text[key]} ({what}) is not supported yet")
    if text.get("use_bidirectional_attention") not in (None, "vision"):
        raise UnsupportedModelError("Gemma-4 with use_bidirectional_attention = 'all' is not supported (edgemoe "
                                    "decodes causally)")
    if c.bool("attention_bias", False):
        raise UnsupportedModelError("Gemma-4 with attention_bias is not supported yet")
    act = text.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"Gemma-4 with hidden_activation = {act!r:.40} is not supported (expected "
                                    "'gelu_pytorch_tanh')")
    base = _common(c, "gemma4", 10000.0, tie_default=True, max_position_default=131072)
    n = base["n_layers"]
    types = text.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in GEMMA4_LAYER_TYPES for t in types):
        raise UnsupportedModelError(f"layer_types = {types!r:.80}: expected {n} of {GEMMA4_LAYER_TYPES}")
    ghd, gkv = _gemma4_global_attention(c, types, base["head_dim"], base["n_kv_heads"])
    theta, gtheta, angles = _gemma4_rope(c, ghd)
    base["rope_theta"] = theta
    swa = [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = c.int("sliding_window", 512, lo=1, hi=MAX_POSITION) if swa else 0
    cap = text.get("final_logit_softcapping")
    n_experts, top_k = _experts(c, "num_experts", "top_k_experts")
    return _spec(
        base, n_experts=n_experts, top_k=top_k, expert_ffn=c.int("moe_intermediate_size"), qk_norm="head",
        router_fn="softmax", norm_topk=True, router_input="residual_norm", activation="geglu_tanh",
        dense_ffn=c.int("intermediate_size"), sliding_window=window, swa_layers=swa,
        embed_scale=float(np.float32(base["hidden"] ** 0.5)), attn_scale=1.0,
        global_head_dim=ghd, global_kv_heads=gkv, global_rope_theta=gtheta, global_rope_angles=angles or ghd // 2,
        global_k_eq_v=c.bool("attention_k_eq_v", False), v_norm=True, post_norms=True, dense_beside_moe=True,
        layer_scale=True, logit_softcap=0.0 if cap is None else c.float("final_logit_softcapping", None),
    )


def gemma4_hf_names(spec: ArchSpec, layer: int) -> dict[str, str]:
    """Gemma-4's layer tensors whose HF names differ from the common ones (dense_hf_names)."""
    p = f"model.layers.{layer}."
    return {"ffn_norm": p + "pre_feedforward_layernorm.weight", "post_attn_norm": p + "post_attention_layernorm.weight",
            "post_ffn_norm": p + "post_feedforward_layernorm.weight",
            "mlp_post_norm": p + "post_feedforward_layernorm_1.weight",
            "moe_pre_norm": p + "pre_feedforward_layernorm_2.weight",
            "moe_post_norm": p + "post_feedforward_layernorm_2.weight", "layer_scale": p + "layer_scalar",
            "mlp_gate": p + "mlp.gate_proj.weight", "mlp_up": p + "mlp.up_proj.weight",
            "mlp_down": p + "mlp.down_proj.weight"}


@dataclass(frozen=True)
class Family:
    name: str
    spec: Callable[[dict], ArchSpec]
    moe_prefix: str  # module holding the router and experts, under model.layers.{i}.
    router: str  # router weight name under moe_prefix
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) names under {moe_prefix}.experts.{e}.
    # Fused expert tensors under model.layers.{i}.: (gate+up [E, 2F, H], down [E, H, F]) name pairs, tried in order
    # after transformers 5's in-memory names (mlp.experts.gate_up_proj, mlp.experts.down_proj).
    fused_experts: tuple[tuple[str, str], ...] = ()
    router_fused: str = "mlp.gate.weight"  # the router's name in transformers 5's in-memory layout
    shared_fused: str = ""  # a shared MLP stored fused (input_linear = gate+up [2S, H], output_linear = down)
    shared: str = "shared_expert"  # the shared expert's module under moe_prefix
    score_bias: str = ""  # the selection-only router bias under moe_prefix (ArchSpec.score_bias)
    # "gpt_oss": mlp.experts.gate_up_proj is [E, H, 2F] with gate / up interleaved in the columns, down [E, F, H],
    # biases gate_up_proj_bias [E, 2F] / down_proj_bias; or MXFP4 (*_blocks / *_scales, [out, in] rows interleaved)
    fused: str = "gate_first"
    norm_offset: bool = False  # RMSNorm weights stored as w - 1 (the norm scales by 1 + w): the reader adds 1
    fused_qkvz: bool = False  # Qwen3-Next: DeltaNet in_proj_qkvz / in_proj_ba grouped per key head
    final_norm: str = "model.norm.weight"
    # "gemma4": the router's scale vector / sqrt(hidden) is folded into the router rows and per_expert_scale into
    # each expert's down matrix (Checkpoint.layer_dense / layer_experts); the text model of a multimodal checkpoint
    # is under model.language_model.
    fold: str = ""
    names: Callable[[ArchSpec, int], dict[str, str]] | None = None  # per-layer HF names overriding the common ones


FAMILIES: dict[str, Family] = {
    "olmoe": Family("olmoe", olmoe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": Family("qwen2moe", qwen2moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": Family("qwen3moe", qwen3moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": Family("mixtral", mixtral_spec, "block_sparse_moe", "gate.weight", ("w1", "w3", "w2")),
    "smallthinker": Family("smallthinker", smallthinker_spec, "block_sparse_moe", "primary_router.weight",
                           ("gate", "up", "down")),
    "granitemoe": Family("granitemoe", granitemoe_spec, "block_sparse_moe", "router.layer.weight", ("", "", ""),
                         (("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
                          ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj")),
                         "block_sparse_moe.router.weight", "shared_mlp"),
    "glm4_moe": Family("glm4moe", glm4moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                       shared="shared_experts", score_bias="gate.e_score_correction_bias"),
    "ernie4_5_moe": Family("ernie4_5moe", ernie45moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                           shared="shared_experts", score_bias="moe_statics.e_score_correction_bias"),
    "deepseek_v2": Family("deepseek2", deepseek_v2_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                          shared="shared_experts"),
    "deepseek_v3": Family("deepseek2", deepseek_v3_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                          shared="shared_experts", score_bias="gate.e_score_correction_bias"),
    "gpt_oss": Family("gptoss", gpt_oss_spec, "mlp", "router.weight", ("gate_proj", "up_proj", "down_proj"),
                      fused="gpt_oss"),
    "qwen3_5_moe_text": Family("qwen35moe", qwen35moe_spec, "mlp", "gate.weight", ("gate_proj", "up_proj",
                                                                                  "down_proj"), norm_offset=True),
    "qwen3_next": Family("qwen3next", qwen3next_spec, "mlp", "gate.weight", ("gate_proj", "up_proj", "down_proj"),
                         norm_offset=True, fused_qkvz=True),
    "lfm2_moe": Family("lfm2moe", lfm2moe_spec, "feed_forward", "gate.weight", ("w1", "w3", "w2"),
                       (("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),),
                       "feed_forward.gate.weight", score_bias="expert_bias", final_norm="model.embedding_norm.weight",
                       names=lfm2_hf_names),
}
FAMILIES["granitemoeshared"] = FAMILIES["granitemoe"]
FAMILIES["gemma4_text"] = Family("gemma4", gemma4_spec, "router", "proj.weight", ("", "", ""),
                                 (("experts.gate_up_proj", "experts.down_proj"),), "router.proj.weight",
                                 fold="gemma4", names=gemma4_hf_names)
FAMILIES["gemma4"] = FAMILIES["gemma4_text"]

SUPPORTED = ("OLMoE (olmoe), Qwen2-MoE (qwen2_moe), Qwen3-MoE (qwen3_moe), Mixtral (mixtral), SmallThinker "
             "(smallthinker), Granite-MoE (granitemoe, granitemoeshared), GLM-4.5 MoE (glm4_moe), ERNIE-4.5 MoE "
             "(ernie4_5_moe), gpt-oss (gpt_oss), Qwen3.5/3.6-MoE (qwen3_5_moe_text), Qwen3-Next (qwen3_next), "
             "LFM2-MoE (lfm2_moe), Gemma-4 MoE (gemma4, gemma4_text), DeepSeek-V2 (deepseek_v2), DeepSeek-V3 "
             "(deepseek_v3)")


# Multimodal checkpoints whose text model edgemoe runs (the vision tower is not read): model_type -> (the text
# model's model_type, the prefix its tensors carry instead of "model.").
TEXT_PARTS = {"qwen3_5_moe": ("qwen3_5_moe_text", "model.language_model.")}


def text_part(cfg: dict, where: str) -> tuple[dict, str | None]:
    """(the config of the model edgemoe runs, the tensor-name prefix of a multimodal checkpoint's text model or
    None)."""
    model_type = cfg.get("model_type")
    if model_type not in TEXT_PARTS:
        return cfg, None
    text_type, prefix = TEXT_PARTS[model_type]
    tc = cfg.get("text_config")
    if not isinstance(tc, dict):
        raise FormatError(f"{where}: model_type {model_type!r} has no text_config object; edgemoe runs its text model")
    tc = {**tc, "model_type": text_type}
    if cfg.get("tie_word_embeddings") is not None:  # the composite model ties (or not) its own lm_head
        tc["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return tc, prefix


def family_for(cfg: dict, where: str) -> Family:
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
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
    if spec.kv_lora_rank:  # MLA (names the table does not list for this spec are not read)
        names.update(wq_a=a + "q_a_proj.weight", q_a_norm=a + "q_a_layernorm.weight", wq_b=a + "q_b_proj.weight",
                     wkv_a=a + "kv_a_proj_with_mqa.weight", kv_a_norm=a + "kv_a_layernorm.weight",
                     wkv_b=a + "kv_b_proj.weight")
    if spec.qkv_bias:
        names.update(bq=a + "q_proj.bias", bk=a + "k_proj.bias", bv=a + "v_proj.bias")
    if spec.qk_norm != "none":
        names.update(q_norm=a + "q_norm.weight", k_norm=a + "k_norm.weight")
    if spec.o_bias:
        names["bo"] = a + "o_proj.bias"
    if spec.attn_sinks:
        names["sinks"] = a + "sinks"
    if spec.attn_gate:  # the gate rows are interleaved in q_proj (Checkpoint.layer_dense splits them)
        names["attn_gate"] = a + "q_proj.weight"
    la = p + "linear_attn."
    qkv, z, b, a = ((la + "in_proj_qkvz.weight",) * 2 + (la + "in_proj_ba.weight",) * 2 if fam.fused_qkvz else
                    (la + "in_proj_qkv.weight", la + "in_proj_z.weight", la + "in_proj_b.weight",
                     la + "in_proj_a.weight"))
    names.update(la_qkv=qkv, la_z=z, la_b=b, la_a=a, la_conv=la + "conv1d.weight", la_dt=la + "dt_bias",
                 la_a_log=la + "A_log", la_norm=la + "norm.weight", la_out=la + "out_proj.weight")
    m = p + fam.moe_prefix + "."
    if spec.is_moe_layer(layer):
        names["router"] = m + fam.router
        if spec.score_bias:
            names["score_bias"] = m + fam.score_bias
        if spec.router_bias:
            names["router_b"] = m + fam.router.rsplit(".", 1)[0] + ".bias"
        if spec.expert_bias:  # read from the fused bias tensors by Checkpoint.layer_dense
            names.update(gate_b=m + "experts.gate_up_proj_bias", up_b=m + "experts.gate_up_proj_bias",
                         down_b=m + "experts.down_proj_bias")
        if spec.shared_ffn:
            sh = m + fam.shared + "."
            names.update(sh_gate=sh + "gate_proj.weight", sh_up=sh + "up_proj.weight", sh_down=sh + "down_proj.weight")
            if spec.shared_gate:
                names["sh_gate_inp"] = m + "shared_expert_gate.weight"
    else:
        names.update(mlp_gate=p + "mlp.gate_proj.weight", mlp_up=p + "mlp.up_proj.weight",
                     mlp_down=p + "mlp.down_proj.weight")
    if fam.names:
        names.update(fam.names(spec, layer))
    return names
