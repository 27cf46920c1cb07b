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


def to_mxfp4(w):
    """Quantize f32 [..., n] (n % 32 == 0) to MXFP4 (blocks [..., n/32, 16] uint8, scales [..., n/32] uint8): per
    group of 32 the smallest power-of-two scale that fits max |x| in FP4's +-6, each value rounded to the nearest
    FP4 magnitude. Written here (not edgemoe's code) so the reader is checked against transformers' dequantizer."""
    import numpy as np

    mags = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).astype(np.float32)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).astype(np.int32)
    x = g / np.ldexp(np.float32(1), exp)
    idx = np.abs(np.abs(x)[..., None] - mags).argmin(axis=-1).astype(np.uint8) | np.where(x < 0, 8, 0).astype(np.uint8)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp[..., 0] + 127).astype(np.uint8)


def mxfp4_copy(src: Path, dst: Path) -> Path:
    """The checkpoint at src with its experts stored as the published gpt-oss checkpoints store them: MXFP4
    `*_blocks` / `*_scales` of the [out, in] matrices (gate_up rows interleaved), biases kept, quantization_config."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json",):
        shutil.copy(Path(src) / f, dst / f)
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                  "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(Path(src) / "model.safetensors"))
    out = {}
    for k, v in t.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = to_mxfp4(np.ascontiguousarray(np.swapaxes(v, 1, 2)))  # [E, in, out] -> [E, out, in]
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"))
    return dst
