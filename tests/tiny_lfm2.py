"""A tiny random LFM2-MoE checkpoint built locally with transformers 5 (`lfm2_moe`): the oracle of test_lfm2.py.

Shapes chosen so every LFM2-MoE feature is exercised: conv and attention layers mixed (a conv layer first and last),
two dense first layers, an odd expert count with top-3, GQA, head_dim * heads != hidden, a routed scaling != 1, and
a random expert bias (transformers initialises it to zeros, which would leave the selection-only path untested).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
    "layer_types": ["conv", "full_attention", "conv", "conv", "full_attention", "conv"],
    "num_dense_layers": 2, "num_experts": 7, "num_experts_per_tok": 3, "routed_scaling_factor": 1.5,
    "conv_L_cache": 3, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def build_tiny_lfm2(out_dir: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    cfg = tf.AutoConfig.for_model("lfm2_moe", **{**CONFIG, **overrides})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)  # larger than HF's 0.02 init so logits and routing vary a lot
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
        n_bias = 0
        for name, t in model.named_buffers():
            if name.endswith("expert_bias"):
                t.normal_(0.0, 0.05)
                n_bias += 1
        assert n_bias, "lfm2_moe: no expert_bias found"
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir
