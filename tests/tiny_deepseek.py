"""Tiny random DeepSeek-V2 / V3 checkpoints built locally with transformers (no network): the oracles of
tests/test_deepseek.py. Odd expert counts where the routing allows, top-k >= 2, dense first layers, q_lora on and off,
group-limited routing (V2's group max, V3's top-2 sum), YaRN with mscale_all_dim on one V3 variant.

transformers initialises e_score_correction_bias to zeros; every layer's bias is set to random values so the
selection-only path is exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0, "rms_norm_eps": 1e-5, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
          "v_head_dim": 24, "first_k_dense_replace": 1, "num_hidden_layers": 3, "tie_word_embeddings": False}

CONFIGS = {
    # V2: 7 experts, top-3, greedy, q_lora on, scaling 1.5, two shared experts, one dense first layer
    "v2": dict(COMMON, n_routed_experts=7, num_experts_per_tok=3, n_shared_experts=2, q_lora_rank=24,
               topk_method="greedy", routed_scaling_factor=1.5),
    # V2 group-limited: 8 experts in 4 groups (scored by their best expert), 2 kept, top-2, no q_lora
    "v2_group": dict(COMMON, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=None,
                     topk_method="group_limited_greedy", n_group=4, topk_group=2),
    # V3: 9 experts in 3 groups (top-2 sum), 2 kept, top-3, sigmoid + bias, renormalized, scaling 2.5, q_lora on
    "v3": dict(COMMON, n_routed_experts=9, num_experts_per_tok=3, n_shared_experts=1, q_lora_rank=24, n_group=3,
               topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    # V3 without q_lora, no groups, two dense layers, YaRN with mscale_all_dim (the softmax scale changes)
    "v3_yarn": dict(COMMON, n_routed_experts=5, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=None,
                    n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=2,
                    num_hidden_layers=4,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "mscale": 1.0, "mscale_all_dim": 1.0}),
}
MODEL_TYPE = {"v2": "deepseek_v2", "v2_group": "deepseek_v2", "v3": "deepseek_v3", "v3_yarn": "deepseek_v3"}


def build_deepseek_model(name: str, out_dir: Path, seed: int = 0, config: dict | None = None) -> Path:
    """name: a key of CONFIGS; config: overrides of its fields."""
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    cfg = tf.AutoConfig.for_model(MODEL_TYPE[name], **dict(CONFIGS[name], **(config or {})))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)  # larger than HF's 0.02 init so logits and routing vary a lot
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
        for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
            if pname.endswith("e_score_correction_bias"):
                t.normal_(0.0, 0.05)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir
