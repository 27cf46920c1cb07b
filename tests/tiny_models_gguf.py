"""Extra tiny checkpoints for the GGUF tests (tiny_models.py stays the shared source of the standard ones).

- "olmoe_mha": OLMoE with n_kv_heads == n_heads (llama.cpp's olmoe cannot load GQA: its k_norm is n_embd wide).
- "qwen2moe_hd": Qwen2-MoE with head_dim == hidden / heads (llama.cpp's qwen2moe cannot take another head_dim).
- "qwen3moe_k256": Qwen3-MoE with hidden and expert widths of 256, so llama.cpp's K-quants (256-value super-blocks)
  apply to the expert and attention matrices instead of falling back to Q5_0/Q8_0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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


def q8_0_container_like_gguf(src, gguf_path: Path, out: Path) -> Path:
    """An edgemoe container holding the same weights, in the same formats, as the GGUF `gguf_path` exported from
    `src`: every tensor the GGUF stores as Q8_0 is quantized here by edgemoe's own `quantize_q8_0` (experts split
    from the stacked ggml tensors) and checked to be byte-identical to the GGUF's blocks; F32 tensors (norms,
    routers) stay f32. Both engines then run exactly the same weights. Raises AssertionError on any difference
    (Mixtral's q/k rows are permuted in the GGUF, so this mirrors the other architectures only)."""
    import gguf
    from edgemoe_export.sources import open_source

    from edgemoe.arch import EXPERT_MATRICES, expert_tensor_name
    from edgemoe.container import ContainerWriter
    from edgemoe.quant import quantize_q8_0

    ck = open_source(src)
    spec = ck.spec
    ggml = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}

    def encode(gguf_name: str, arr: np.ndarray, expert: int | None = None):
        t = ggml[gguf_name]
        kind = t.tensor_type.name
        if kind == "F32":
            return arr.astype(np.float32), "f32"
        assert kind == "Q8_0", f"{gguf_name}: GGUF type {kind}; this container mirrors F32 / Q8_0 GGUFs only"
        mine = quantize_q8_0(arr)
        theirs = np.asarray(t.data if expert is None else t.data[expert]).reshape(-1)
        assert mine.tobytes() == theirs.tobytes(), f"{gguf_name}: edgemoe's Q8_0 bytes differ from the GGUF's"
        return mine, "q8_0"

    with ContainerWriter(out, spec, {"source": f"{Path(str(src)).name} (Q8_0 as {Path(gguf_path).name})"}) as w:
        if ck.tokenizer_json is not None:
            w.add_tensor("tokenizer.json", np.frombuffer(ck.tokenizer_json, np.uint8), "bytes", kind="blob")
        for name, arr in ck.global_tensors().items():
            w.add_tensor(name, *encode(name, arr), shape=arr.shape)
        for layer in range(spec.n_layers):
            for name, arr in ck.layer_dense(layer).items():
                w.add_tensor(name, *encode(name, arr), shape=arr.shape)
        for layer in range(spec.n_layers):
            if not spec.is_moe_layer(layer):
                continue
            experts = dict(ck.layer_experts(layer))
            for e in range(spec.n_experts):
                for m in EXPERT_MATRICES:
                    arr = experts[expert_tensor_name(layer, e, m)]
                    data, dtype = encode(f"blk.{layer}.ffn_{m}_exps.weight", arr, expert=e)
                    w.add_tensor(expert_tensor_name(layer, e, m), data, dtype, shape=arr.shape, kind="expert")
    return out
