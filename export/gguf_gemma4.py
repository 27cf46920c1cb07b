"""llama.cpp's `gemma4` as the GGUF writer spells it (gguf_export calls these for that architecture only).

What llama.cpp's graph reads, found by running the tiny model through llama-cpp-python 0.3.36 (tests/test_gemma4.py):
- per-layer KV heads (`attention.head_count_kv` a list), the full-attention layers' head size as `key_length` /
  `value_length` and the sliding ones' as `*_swa`, `attention.sliding_window_pattern` (true = sliding),
  `rope.freq_base` / `rope.freq_base_swa`, `final_logit_softcapping`;
- proportional RoPE as `rope_freqs.weight` (one divisor per frequency of the full-attention head: 1 for the rotated
  ones, 1e30 for the rest, whose angle is then 0 as in transformers);
- the router as `ffn_gate_inp.weight` applied to the residual RMS-normalized x `ffn_gate_inp.scale` / sqrt(hidden):
  the container's router already holds transformers' scale / sqrt(hidden), so the scale written is sqrt(hidden);
- experts fused as `ffn_gate_up_exps` ([E, 2F, H], gate rows first); per_expert_scale is already in the down
  matrices; full-attention layers without `attn_v` take the keys as values.
Reading such a file back (gguf_reader) inverts each of these: hf_config, expected_extra, fold_router.
"""

from __future__ import annotations

import numpy as np

from edgemoe.arch import ArchSpec
from edgemoe.errors import EdgeMoEError, FormatError

ROPE_FREQS = "rope_freqs.weight"
NO_ROTATION = 1e30  # a rope_freqs divisor that makes a frequency 0


def check(spec: ArchSpec, where: str) -> None:
    """What llama.cpp's gemma4 graph hard-codes (everything edgemoe's reader gives a Gemma-4 MoE checkpoint)."""
    want = {"v_norm": True, "post_norms": True, "dense_beside_moe": True, "layer_scale": True, "qk_norm": "head",
            "router_input": "residual_norm", "router_fn": "softmax", "norm_topk": True, "activation": "geglu_tanh",
            "attn_scale": 1.0, "qkv_bias": False, "o_bias": False, "rope_scaling": "none"}
    off = {k: getattr(spec, k) for k, v in want.items() if getattr(spec, k) != v}
    if off or spec.embed_scale != float(np.float32(spec.hidden ** 0.5)) or spec.dense_layers:
        raise EdgeMoEError(f"{where}: llama.cpp's gemma4 graph needs the Gemma-4 MoE layer as transformers defines "
                           f"it; this model differs in {off or 'embed_scale / dense_layers'}")


def _global_dim(spec: ArchSpec) -> int:
    return spec.global_head_dim or spec.head_dim


def metadata(w, spec: ArchSpec) -> None:
    w.add_head_count_kv([spec.layer_kv_heads(layer) for layer in range(spec.n_layers)])
    w.add_key_length(_global_dim(spec))
    w.add_value_length(_global_dim(spec))
    w.add_key_length_swa(spec.head_dim)
    w.add_value_length_swa(spec.head_dim)
    w.add_rope_dimension_count(_global_dim(spec))
    w.add_rope_dimension_count_swa(spec.head_dim)
    w.add_rope_freq_base(spec.global_rope_theta or spec.rope_theta)
    w.add_rope_freq_base_swa(spec.rope_theta)
    w.add_sliding_window(spec.sliding_window or spec.max_position)
    w.add_sliding_window_pattern([not spec.is_global_layer(layer) for layer in range(spec.n_layers)])
    w.add_feed_forward_length(spec.dense_ffn)
    if spec.logit_softcap:
        w.add_final_logit_softcapping(spec.logit_softcap)
    w.add_embedding_length_per_layer_input(0)
    w.add_shared_kv_layers(0)


def global_tensors(spec: ArchSpec) -> list[tuple[str, np.ndarray]]:
    freqs = np.ones(_global_dim(spec) // 2, np.float32)
    if spec.global_rope_angles:
        freqs[spec.global_rope_angles:] = NO_ROTATION
    return [(ROPE_FREQS, freqs)]


def layer_tensors(spec: ArchSpec, layer: int) -> list[tuple[str, np.ndarray]]:
    return [(f"blk.{layer}.ffn_gate_inp.scale", np.full(spec.hidden, np.sqrt(np.float32(spec.hidden)), np.float32))]


def expert_stacks(stacks: dict[str, np.ndarray], layer: int) -> list[tuple[str, np.ndarray]]:
    """The gate / up / down stacks as llama.cpp's gemma4 reads them: gate and up fused, gate rows first."""
    return [(f"blk.{layer}.ffn_gate_up_exps.weight", np.concatenate([stacks["gate"], stacks["up"]], axis=1)),
            (f"blk.{layer}.ffn_down_exps.weight", stacks["down"])]


# --- reading llama.cpp's gemma4 back (gguf_reader) ------------------------------------------------------------

def hf_config(r, base: dict) -> dict:
    """A gemma4_text config.json from a gemma4 GGUF's metadata and tensors (r: the GGUFCheckpoint being opened;
    base: the common keys gguf_reader derived, whose head sizes are the full-attention layers')."""
    p, n = "gemma4.", base["num_hidden_layers"]
    kv = r._kv(p + "attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * n
    sliding = r._kv(p + "attention.sliding_window_pattern", [False] * n)
    if not (isinstance(kv, list) and len(kv) == n and isinstance(sliding, list) and len(sliding) == n):
        raise FormatError(f"{r.path}: gemma4 head_count_kv / sliding_window_pattern must have one entry per layer")
    types = ["sliding_attention" if s else "full_attention" for s in sliding]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    ghd, hd = base["head_dim"], r._kv_int(p + "attention.key_length_swa", base["head_dim"])
    freqs = r._get_raw(ROPE_FREQS).reshape(-1) if ROPE_FREQS in r._tensors else np.ones(ghd // 2, np.float32)
    angles = int((freqs < NO_ROTATION / 2).sum())
    full_rope = {"rope_type": "default", "rope_theta": r._kv_float(p + "rope.freq_base", 1e6)}
    if angles != ghd // 2:
        full_rope.update(rope_type="proportional", partial_rotary_factor=2 * angles / ghd)
    cap = r._kv(p + "final_logit_softcapping", None)
    sliding_kv = next((kv[i] for i in range(n) if i not in full), kv[0])
    return {**base, "model_type": "gemma4_text", "head_dim": hd, "num_key_value_heads": sliding_kv,
            "global_head_dim": ghd, "num_global_key_value_heads": kv[full[0]] if full else sliding_kv,
            "attention_k_eq_v": bool(full) and f"blk.{full[0]}.attn_v.weight" not in r._tensors,
            "layer_types": types, "sliding_window": r._kv_int(p + "attention.sliding_window", 512, hi=1 << 31),
            "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                      "rope_theta": r._kv_float(p + "rope.freq_base_swa", 1e4)},
                                "full_attention": full_rope},
            "final_logit_softcapping": None if cap is None else float(cap), "enable_moe_block": True,
            "intermediate_size": r._kv_int(p + "feed_forward_length"),
            "moe_intermediate_size": r._kv_int(p + "expert_feed_forward_length"),
            "num_experts": base["num_experts"], "top_k_experts": base["top_k"],
            "hidden_size_per_layer_input": r._kv_int(p + "embedding_length_per_layer_input", 0, lo=0),
            "num_kv_shared_layers": r._kv_int(p + "attention.shared_kv_layers", 0, lo=0)}


def expected_extra(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """The gemma4 GGUF tensors beyond the container's: rope_freqs, each router's scale, the fused gate/up experts."""
    exp = {ROPE_FREQS: ((spec.global_head_dim or spec.head_dim) // 2,)}
    for layer in range(spec.n_layers):
        exp[f"blk.{layer}.ffn_gate_inp.scale"] = (spec.hidden,)
        exp[f"blk.{layer}.ffn_gate_up_exps.weight"] = (spec.n_experts, 2 * spec.expert_ffn, spec.hidden)
        exp[f"blk.{layer}.ffn_down_exps.weight"] = (spec.n_experts, spec.hidden, spec.expert_ffn)
    return exp


def fold_router(router: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """llama.cpp's router input is the normalized residual x scale / sqrt(hidden): fold it into the rows."""
    return (router * (scale / np.sqrt(np.float32(router.shape[1])))[None, :]).astype(np.float32)
