"""Write a random-weight GLM-4.5 MoE checkpoint (Hugging Face layout, transformers 5 names) at real widths, with
reduced depth, for the real-size speed and memory run (speed does not depend on weight values).

Defaults are GLM-4.5-Air's: hidden 4096, 96 heads / 8 KV heads of 128 (RoPE on half of each head), q/k/v biases,
128 routed experts of width 1408, top-8, one shared expert, a dense first layer of width 10944, vocab 151552,
sigmoid routing with a selection bias, norm_topk_prob, routed_scaling_factor 1.0, n_group 1. Written one layer per
shard so memory stays bounded.

    python bench/make_random_glm4moe.py OUT_DIR --layers 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (GLM-4.5-Air has 46; the first is dense)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = p.parse_args(argv)
    from safetensors.numpy import save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    H, I, D, E, V, nh, nkv, hd = 4096, 1408, 10944, args.experts, 151552, 96, 8, 128
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": V, "hidden_size": H,
        "intermediate_size": D, "moe_intermediate_size": I, "num_hidden_layers": args.layers,
        "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd, "n_routed_experts": E,
        "num_experts_per_tok": args.top_k, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
        "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "attention_bias": True,
        "use_qk_norm": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
        "bos_token_id": None, "eos_token_id": 151329, "pad_token_id": 151329, "dtype": args.dtype,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(0)
    dt = np.dtype(args.dtype)
    # Speed does not depend on the values, and drawing ~4e9 normals would take longer than the run itself: every
    # tensor is a window of one pool of 2^24 normals at a random offset (distinct per tensor, so experts differ).
    pool = (rng.standard_normal(1 << 24, dtype=np.float32)).astype(dt)

    def rand(*shape, scale=0.02):
        n = int(np.prod(shape))
        start = int(rng.integers(0, pool.size))
        flat = np.resize(np.roll(pool, -start), n) if n > pool.size - start else pool[start:start + n]
        return (flat.reshape(shape) * dt.type(scale)).astype(dt)

    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rand(V, H), "lm_head.weight": rand(V, H),
          "model.norm.weight": np.ones(H, dt)}, "model-globals.safetensors")
    for layer in range(args.layers):
        p_ = f"model.layers.{layer}."
        a = p_ + "self_attn."
        t = {p_ + "input_layernorm.weight": np.ones(H, dt), p_ + "post_attention_layernorm.weight": np.ones(H, dt),
             a + "q_proj.weight": rand(nh * hd, H), a + "k_proj.weight": rand(nkv * hd, H),
             a + "v_proj.weight": rand(nkv * hd, H), a + "o_proj.weight": rand(H, nh * hd),
             a + "q_proj.bias": rand(nh * hd), a + "k_proj.bias": rand(nkv * hd), a + "v_proj.bias": rand(nkv * hd)}
        m = p_ + "mlp."
        if layer == 0:
            t.update({m + "gate_proj.weight": rand(D, H), m + "up_proj.weight": rand(D, H),
                      m + "down_proj.weight": rand(H, D)})
        else:
            t.update({m + "gate.weight": rand(E, H, scale=0.1).astype(np.float32),
                      m + "gate.e_score_correction_bias": (rng.standard_normal(E) * 0.05).astype(np.float32),
                      m + "shared_experts.gate_proj.weight": rand(I, H), m + "shared_experts.up_proj.weight": rand(I, H),
                      m + "shared_experts.down_proj.weight": rand(H, I)})
            for e in range(E):
                t[m + f"experts.{e}.gate_proj.weight"] = rand(I, H)
                t[m + f"experts.{e}.up_proj.weight"] = rand(I, H)
                t[m + f"experts.{e}.down_proj.weight"] = rand(H, I)
        save(t, f"model-layer{layer:03d}.safetensors")
        print(f"layer {layer + 1}/{args.layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


if __name__ == "__main__":
    main()
