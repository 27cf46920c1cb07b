"""Write a random-weight Qwen3.5-MoE text checkpoint at Qwen3.5/3.6-35B-A3B's widths in transformers 5 layout
(`qwen3_5_moe_text`; speed studies only).

35B-A3B: hidden 2048, 16 query / 2 KV heads of 256 (a quarter rotated), Gated DeltaNet with 16 key / 32 value heads
of 128 and a 4-tap conv, 256 experts top-8 of width 512 plus a gated shared expert of 512, vocab 248320; every 4th
layer full attention. Depth is reduced (--layers, default 4 of 40: three DeltaNet layers and one attention layer) to
fit the disk and the time; weights are fp16.

    python bench/make_random_qwen35.py OUT_DIR --layers 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args(argv)
    from safetensors.numpy import save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    H, F, S, E, V, NH, NKV, HD = 2048, 512, 512, 256, 248320, 16, 2, 256
    KH, VH, DK, DV, CONV = 16, 32, 128, 128, 4
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(args.layers)]
    cfg = {
        "architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", "vocab_size": V,
        "hidden_size": H, "num_hidden_layers": args.layers, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "head_dim": HD, "linear_conv_kernel_dim": CONV, "linear_key_head_dim": DK, "linear_value_head_dim": DV,
        "linear_num_key_heads": KH, "linear_num_value_heads": VH, "moe_intermediate_size": F,
        "shared_expert_intermediate_size": S, "num_experts": E, "num_experts_per_tok": 8, "layer_types": types,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        "bos_token_id": None, "eos_token_id": 248046, "dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(0)

    def rand(*shape, scale=0.02):
        a = np.empty(shape, np.float16)
        flat = a.reshape(shape[0], -1)
        for i in range(shape[0]):  # row by row: a float32 copy of one row at a time
            flat[i] = rng.standard_normal(flat.shape[1], dtype=np.float32) * scale
        return a

    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})

    zeros = np.zeros(H, np.float16)  # the zero-centered norms scale by 1 + weight
    save({"model.embed_tokens.weight": rand(V, H), "lm_head.weight": rand(V, H), "model.norm.weight": zeros},
         "model-globals.safetensors")
    conv_dim = 2 * KH * DK + VH * DV
    for layer, kind in enumerate(types):
        q, m = f"model.layers.{layer}.", f"model.layers.{layer}.mlp."
        t = {q + "input_layernorm.weight": zeros, q + "post_attention_layernorm.weight": zeros}
        if kind == "full_attention":
            a = q + "self_attn."
            t.update({a + "q_proj.weight": rand(2 * NH * HD, H), a + "k_proj.weight": rand(NKV * HD, H),
                      a + "v_proj.weight": rand(NKV * HD, H), a + "o_proj.weight": rand(H, NH * HD),
                      a + "q_norm.weight": np.zeros(HD, np.float16), a + "k_norm.weight": np.zeros(HD, np.float16)})
        else:
            la = q + "linear_attn."
            t.update({la + "in_proj_qkv.weight": rand(conv_dim, H), la + "in_proj_z.weight": rand(VH * DV, H),
                      la + "in_proj_b.weight": rand(VH, H), la + "in_proj_a.weight": rand(VH, H),
                      la + "conv1d.weight": rand(conv_dim, 1, CONV, scale=0.3), la + "dt_bias": np.ones(VH, np.float16),
                      la + "A_log": np.log(rng.uniform(1.0, 16.0, VH)).astype(np.float16),
                      la + "norm.weight": np.ones(DV, np.float16), la + "out_proj.weight": rand(H, VH * DV)})
        t.update({m + "gate.weight": rand(E, H, scale=0.1), m + "experts.gate_up_proj": rand(E, 2 * F, H),
                  m + "experts.down_proj": rand(E, H, F), m + "shared_expert.gate_proj.weight": rand(S, H),
                  m + "shared_expert.up_proj.weight": rand(S, H), m + "shared_expert.down_proj.weight": rand(H, S),
                  m + "shared_expert_gate.weight": rand(1, H)})
        save(t, f"model-layer{layer:03d}.safetensors")
        print(f"layer {layer + 1}/{args.layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


if __name__ == "__main__":
    main()
