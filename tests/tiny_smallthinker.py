"""A tiny random SmallThinker checkpoint in Hugging Face layout, written by hand (SmallThinker is not in transformers).

config.json uses the keys of PowerInfer's `configuration_smallthinker.py` (model_type "smallthinker",
moe_num_primary_experts, moe_num_active_primary_experts, moe_ffn_hidden_size, moe_primary_router_apply_softmax,
rope_layout, sliding_window_layout, sliding_window_size, ...); model.safetensors uses the tensor names of its
`modeling_smallthinker.py` (model.layers.N.block_sparse_moe.primary_router, ...experts.E.{gate,up,down}); the
tokenizer is a byte-level BPE with the Qwen2 pre-tokenizer regex, as the real SmallThinker tokenizer (Qwen2Tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

VARIANTS = {
    # SmallThinker-4B-A0.6B's shape of config: RoPE + full attention everywhere, sigmoid router (normalized over the
    # top-k), tied embeddings, head_dim * heads != hidden.
    "sigmoid_tied": {"num_hidden_layers": 2, "tie_word_embeddings": True, "moe_primary_router_apply_softmax": False},
    # softmax over the top-k logits, separate lm_head
    "softmax": {"num_hidden_layers": 2, "tie_word_embeddings": False, "moe_primary_router_apply_softmax": True},
    # SmallThinker-21B-A3B's hybrid layout as llama.cpp implements it: layers i % 4 == 0 use full attention without
    # RoPE, the others sliding-window attention with RoPE (window 4096, longer than any test sequence).
    "hybrid": {"num_hidden_layers": 5, "tie_word_embeddings": True, "moe_primary_router_apply_softmax": False,
                   "rope_layout": [0, 1, 1, 1, 0], "sliding_window_layout": [0, 1, 1, 1, 0], "sliding_window_size": 4096},
}


def tiny_config(variant: str = "sigmoid_tied", **overrides) -> dict:
    v = {**VARIANTS[variant], **overrides}
    n = v["num_hidden_layers"]
    cfg = {
        "architectures": ["SmallThinkerForCausalLM"],
        "model_type": "smallthinker",
        "model_name": "smallthinker_tiny_random",
        "num_hidden_layers": n,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "vocab_size": 320,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1.5e6,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "rope_layout": [1] * n,
        "sliding_window_layout": [0] * n,
        "sliding_window_size": 4096,
        "moe_num_primary_experts": 6,
        "moe_num_active_primary_experts": 2,
        "moe_ffn_hidden_size": 48,
        "moe_primary_router_apply_softmax": False,
        "norm_topk_prob": True,
        "bos_token_id": 1,
        "eos_token_id": [2],
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    cfg.update(v)
    return cfg


def build_tiny_smallthinker(out_dir: Path, variant: str = "sigmoid_tied", seed: int = 0, **overrides) -> Path:
    from safetensors.numpy import save_file

    cfg = tiny_config(variant, **overrides)
    rng = np.random.default_rng(seed)
    H, V, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, F = cfg["moe_num_primary_experts"], cfg["moe_ffn_hidden_size"]

    def mat(*shape):  # larger than the 0.02 init so logits and routing vary a lot (as tiny_models.py)
        return rng.normal(0.0, 0.15, size=shape).astype(np.float32)

    def norm(n):
        return rng.uniform(0.5, 1.5, size=n).astype(np.float32)

    t = {"model.embed_tokens.weight": mat(V, H), "model.norm.weight": norm(H)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(H)
        t[p + "post_attention_layernorm.weight"] = norm(H)
        t[p + "self_attn.q_proj.weight"] = mat(nh * hd, H)
        t[p + "self_attn.k_proj.weight"] = mat(nkv * hd, H)
        t[p + "self_attn.v_proj.weight"] = mat(nkv * hd, H)
        t[p + "self_attn.o_proj.weight"] = mat(H, nh * hd)
        t[p + "block_sparse_moe.primary_router.weight"] = mat(E, H)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "gate.weight"] = mat(F, H)
            t[q + "up.weight"] = mat(F, H)
            t[q + "down.weight"] = mat(H, F)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(t, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_qwen2_style_tokenizer(out_dir, V)
    return out_dir


def _write_qwen2_style_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog 12345 " * 4, "to be, or not to be: that is the question!"] * 50
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8,  # leave padded embedding rows without a token, as real Qwen vocabularies do
        special_tokens=["<|pad|>", "<|im_start|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
