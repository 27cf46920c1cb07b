"""A tiny random Gemma-4 MoE checkpoint built with transformers 5 (`gemma4_text`, or `gemma4` with the text model
under text_config), locally: the oracle of test_gemma4.py.

Shapes chosen so every Gemma-4 feature matters on a 24-token sequence: sliding window 5 on layers 0, 1, 3 (shorter
than the sequence), full-attention layers 2 and 4 with their own head size (32 vs 24) and one KV head (values =
keys), proportional RoPE on a quarter of their head, an odd expert count with top-3, GQA, head_dim * heads !=
hidden. Every norm, the router's scales, the per-expert scales and the layer scalars get random values.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "global_head_dim": 32,
    "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 5,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "enable_moe_block": True, "num_experts": 5, "top_k_experts": 3, "moe_intermediate_size": 40,
    "hidden_size_per_layer_input": 0, "final_logit_softcapping": 30.0, "max_position_embeddings": 4096,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1e6}},
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}


def build_tiny_gemma4(out_dir: Path, seed: int = 0, multimodal: bool = False, **overrides) -> Path:
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    text = {**TEXT, **overrides}
    cfg = tf.AutoConfig.for_model("gemma4", text_config=text) if multimodal else \
        tf.AutoConfig.for_model("gemma4_text", **text)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.6, 1.4)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, text["vocab_size"])
    return out_dir
