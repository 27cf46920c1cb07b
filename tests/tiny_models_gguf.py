"""Extra tiny checkpoints for the GGUF tests (tiny_models.py stays the shared source of the standard ones).

- "olmoe_mha": OLMoE with n_kv_heads == n_heads (llama.cpp's olmoe cannot load GQA: its k_norm is n_embd wide).
- "qwen2moe_hd": Qwen2-MoE with head_dim == hidden / heads (llama.cpp's qwen2moe cannot take another head_dim).
- "qwen3moe_k256": Qwen3-MoE with hidden and expert widths of 256, so llama.cpp's K-quants (256-value super-blocks)
  apply to the expert and attention matrices instead of falling back to Q5_0/Q8_0.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import COMMON, _write_tokenizer


def _configs():
    import transformers as tf

    return {
        "olmoe_mha": tf.OlmoeConfig(
            **COMMON, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, num_experts=6,
            num_experts_per_tok=2, rms_norm_eps=1e-5,
        ),
        # Qwen2-MoE as tiny_models' but head_dim == hidden/heads: llama.cpp's qwen2moe sizes attn_q n_embd x n_embd.
        "qwen2moe_hd": tf.Qwen2MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=40, shared_expert_intermediate_size=56,
            num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3,
            decoder_sparse_step=1, norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        ),
        "qwen3moe_k256": tf.Qwen3MoeConfig(
            **{**COMMON, "hidden_size": 256}, intermediate_size=256, moe_intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1,
        ),
    }


VARIANTS = ("olmoe_mha", "qwen2moe_hd", "qwen3moe_k256")


def build_gguf_variant(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Random-init one of the variants above (same init recipe as tiny_models.build_tiny_model)."""
    import torch
    import transformers as tf

    cfg = _configs()[name]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if cfg.hidden_size <= 64 else 0.08)
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir
