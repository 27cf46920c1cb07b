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
"""

from __future__ import annotations

import numpy as np

from edgemoe.arch import ArchSpec
from edgemoe.errors import EdgeMoEError

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
