"""Tiny random GLM-4.5 MoE and ERNIE-4.5 MoE checkpoints built locally with transformers (no network): the oracles of
the DeepSeek-V3-style routing tests (tests/test_v3_routing.py).

transformers initialises e_score_correction_bias to zeros; a zero bias would leave the selection-only path untested,
so every layer's bias is set to random values (a few hundredths, like trained ones) before saving.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON = {"vocab_size": 320, "hidden_size": 64, "max_position_embeddings": 256, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 0, "intermediate_size": 96, "moe_intermediate_size": 32,
          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}

CONFIGS = {
    # GLM-4.5: 8 experts in 4 groups of which 2 are kept, top-3, scaling 2.5, one dense first layer, a shared expert,
    # per-head QK-norm, q/k/v biases, RoPE on half of each head (head_dim != hidden / heads).
    "glm4_moe": dict(COMMON, num_hidden_layers=3, head_dim=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                     topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                     n_shared_experts=1, use_qk_norm=True, attention_bias=True, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    # the same without group limiting (llama.cpp's glm4moe graph has none; real GLM-4.5 uses n_group = 1 too)
    "glm4_moe_g1": None,
    # ERNIE-4.5: an odd expert count, top-3, two shared experts, MoE on layers 1..3 (start 1, interval 1), tied
    # embeddings (its default), interleaved RoPE.
    "ernie4_5_moe": dict(COMMON, num_hidden_layers=4, moe_num_experts=7, moe_k=3, moe_num_shared_experts=2,
                         moe_layer_start_index=1, moe_layer_interval=1, moe_layer_end_index=-1,
                         tie_word_embeddings=True),
}


CONFIGS["glm4_moe_g1"] = dict(CONFIGS["glm4_moe"], n_group=1, topk_group=1)
# ERNIE with MoE on every second layer (1 and 3): the reader's interval rule (llama.cpp's loader takes step 1 only)
CONFIGS["ernie4_5_moe_i2"] = dict(CONFIGS["ernie4_5_moe"], moe_layer_interval=2)
MODEL_TYPE = {"glm4_moe_g1": "glm4_moe", "ernie4_5_moe_i2": "ernie4_5_moe"}


def build_v3_model(name: str, out_dir: Path, seed: int = 0, **save_kwargs) -> Path:
    """name: a key of CONFIGS (its model_type, or a variant of one); save_kwargs go to save_pretrained
    (save_original_format=False: transformers 5's in-memory tensor names and fused experts)."""
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    model_type = MODEL_TYPE.get(name, name)
    cfg = tf.AutoConfig.for_model(model_type, **CONFIGS[name])
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "e_score_correction_bias" in pname:
                continue
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)  # larger than HF's 0.02 init so logits and routing vary a lot
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
        n_bias = 0
        for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
            if pname.endswith("e_score_correction_bias"):
                t.normal_(0.0, 0.05)
                n_bias += 1
        assert n_bias, f"{model_type}: no e_score_correction_bias found"
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, **save_kwargs)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir
