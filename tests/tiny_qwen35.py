"""A tiny random Qwen3.5-MoE text checkpoint built with transformers 5 (`qwen3_5_moe_text`), locally: the oracle of
test_qwen35.py.

Mixed layer kinds (linear, full, linear, linear, full), an odd expert count with top-3, GQA, head_dim * heads !=
hidden, partial RoPE (a quarter of head_dim 24), value heads sharing key heads (4 over 2), a sigmoid-gated shared
expert. Every parameter is random, including the zero-centered RMSNorm offsets, A_log, dt_bias and the conv taps.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]
CONFIG = {
    "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 24, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 12,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "moe_intermediate_size": 40,
    "shared_expert_intermediate_size": 36, "num_experts": 5, "num_experts_per_tok": 3, "layer_types": LAYER_TYPES,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}


# Qwen3-Next: the same layers with fused DeltaNet projections, plus a dense MLP layer and unnormalized top-k.
NEXT_CONFIG = {**CONFIG, "mlp_only_layers": [2], "intermediate_size": 48, "norm_topk_prob": False}


def build_tiny_qwen35(out_dir: Path, seed: int = 0, model_type: str = "qwen3_5_moe_text", **overrides) -> Path:
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    base = NEXT_CONFIG if model_type == "qwen3_next" else CONFIG
    cfg = tf.AutoConfig.for_model(model_type, **{**base, **overrides})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):  # the gated norm scales by its weight
                p.uniform_(0.5, 1.5)
            elif "norm" in name:  # the others by 1 + weight
                p.normal_(0.0, 0.3)
            elif name.endswith("A_log"):
                p.uniform_(-2.0, 0.5)
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 0.5)
            elif "conv1d" in name:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.1)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir
