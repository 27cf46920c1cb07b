"""A tiny random gpt-oss checkpoint built with transformers 5 (`gpt_oss`), locally: the oracle of test_gptoss.py.

Shapes chosen so every gpt-oss feature is exercised by a 24-token test sequence: sliding window 5 on layers 0 and 2
(shorter than the sequence), YaRN with a ramp that falls inside the rotated dims (original context 4096, factor 8,
no truncation as in the published configs), swiglu_limit 1.5 so the clamps bite on random weights, an odd expert
count with top-3, GQA and head_dim * heads != hidden. Sinks and every bias get random values.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = {
    "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 40,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "num_local_experts": 5,
    "num_experts_per_tok": 3, "sliding_window": 5, "max_position_embeddings": 32768, "swiglu_limit": 1.5,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
}


def build_tiny_gptoss(out_dir: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers as tf
    from tiny_models import _write_tokenizer

    cfg = tf.AutoConfig.for_model("gpt_oss", **{**CONFIG, **overrides})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 and not name.endswith("_bias"):
                p.normal_(0.0, 0.15)
            else:  # biases (1-D, and the experts' [E, width]) and sinks
                p.normal_(0.0, 0.3)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    _write_tokenizer(out_dir, cfg.vocab_size)
    return out_dir
