"""Write a random-weight LFM2-MoE checkpoint at LFM2-8B-A1B's widths in the published (per-expert) layout, for speed
studies only.

LFM2-8B-A1B: hidden 2048, 32 query / 8 KV heads of 64, 32 experts top-4 of width 1792, 2 dense first layers of
width 7168, vocab 65536, conv_L_cache 3, 24 layers of which 6 attention (2, 6, 10, 14, 18, 21), tied embeddings.
Depth is reduced (--layers, default 8: the first 8 layer types) to fit the disk and the time; weights are fp16.

    python bench/make_random_lfm2.py OUT_DIR --layers 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ATTENTION_LAYERS = (2, 6, 10, 14, 18, 21)  # of 24


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args(argv)
    from safetensors.numpy import save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    H, F, D, E, V, NH, NKV, HD, K, N_DENSE = 2048, 1792, 7168, 32, 65536, 32, 8, 64, 3, 2
    types = ["full_attention" if i in ATTENTION_LAYERS else "conv" for i in range(args.layers)]
    cfg = {
        "architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "vocab_size": V, "hidden_size": H,
        "intermediate_size": D, "moe_intermediate_size": F, "num_hidden_layers": args.layers,
        "num_attention_heads": NH, "num_key_value_heads": NKV, "num_experts": E, "num_experts_per_tok": 4,
        "num_dense_layers": N_DENSE, "conv_L_cache": K, "conv_bias": False, "layer_types": types,
        "norm_eps": 1e-5, "max_position_embeddings": 128000, "use_expert_bias": True, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, "dtype": "float16",
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

    save({"model.embed_tokens.weight": rand(V, H), "model.embedding_norm.weight": np.ones(H, np.float16)},
         "model-globals.safetensors")
    for layer in range(args.layers):
        q, f = f"model.layers.{layer}.", f"model.layers.{layer}.feed_forward."
        t = {q + "operator_norm.weight": np.ones(H, np.float16), q + "ffn_norm.weight": np.ones(H, np.float16)}
        if types[layer] == "conv":
            t.update({q + "conv.in_proj.weight": rand(3 * H, H), q + "conv.conv.weight": rand(H, 1, K, scale=0.5),
                      q + "conv.out_proj.weight": rand(H, H)})
        else:
            a = q + "self_attn."
            t.update({a + "q_proj.weight": rand(NH * HD, H), a + "k_proj.weight": rand(NKV * HD, H),
                      a + "v_proj.weight": rand(NKV * HD, H), a + "out_proj.weight": rand(H, NH * HD),
                      a + "q_layernorm.weight": np.ones(HD, np.float16),
                      a + "k_layernorm.weight": np.ones(HD, np.float16)})
        if layer < N_DENSE:
            t.update({f + "w1.weight": rand(D, H), f + "w3.weight": rand(D, H), f + "w2.weight": rand(H, D)})
        else:
            t.update({f + "gate.weight": rand(E, H, scale=0.1), f + "expert_bias": rand(E, scale=0.05)})
            for e in range(E):
                x = f"{f}experts.{e}."
                t.update({x + "w1.weight": rand(F, H), x + "w3.weight": rand(F, H), x + "w2.weight": rand(H, F)})
        save(t, f"model-layer{layer:03d}.safetensors")
        print(f"layer {layer + 1}/{args.layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


if __name__ == "__main__":
    main()
