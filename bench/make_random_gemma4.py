"""Write a random-weight Gemma-4 MoE checkpoint at Gemma-4-26B-A4B's widths in transformers 5 layout (`gemma4_text`,
the published config's keys global_head_dim / num_global_key_value_heads; speed studies only).

Gemma-4-26B-A4B: hidden 2816, 16 query heads; sliding layers 8 KV heads of 256 (window 1024, RoPE theta 1e4), full
layers 2 KV heads of 512 with values = keys and proportional RoPE (a quarter of the head, theta 1e6); 128 experts
top-8 of width 704 beside a dense GELU-tanh MLP of width 2112; vocab 262144, tied embeddings, logits soft-capped at
30. Depth is reduced (--layers, default 2 of 30: one sliding, one full layer) to fit the disk and the time; weights
are fp16.

    python bench/make_random_gemma4.py OUT_DIR --layers 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    from safetensors.numpy import save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    H, D, F, E, V, NH = 2816, 2112, 704, 128, 262144, 16
    HD, NKV, GHD, GKV = 256, 8, 512, 2
    types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(args.layers)]
    cfg = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "vocab_size": V, "hidden_size": H,
        "intermediate_size": D, "num_hidden_layers": args.layers, "num_attention_heads": NH,
        "num_key_value_heads": NKV, "head_dim": HD, "global_head_dim": GHD, "num_global_key_value_heads": GKV,
        "attention_k_eq_v": True, "sliding_window": 1024, "layer_types": types, "enable_moe_block": True,
        "num_experts": E, "top_k_experts": 8, "moe_intermediate_size": F, "hidden_size_per_layer_input": 0,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1000000.0}},
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(0)

    def rand(*shape, scale=0.02):
        a = np.empty(shape, np.float16)
        flat = a.reshape(shape[0], -1)
        for i in range(shape[0]):  # row by row: a float32 copy of one row at a time
            flat[i] = rng.standard_normal(flat.shape[1], dtype=np.float32) * scale
        return a

    def ones(n):
        return np.ones(n, np.float16)

    weight_map = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rand(V, H), "model.norm.weight": ones(H)}, "model-globals.safetensors")
    for layer, kind in enumerate(types):
        q, a = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
        hd, nkv = (HD, NKV) if kind == "sliding_attention" else (GHD, GKV)
        t = {q + n + ".weight": ones(H) for n in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
            "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")}
        t.update({
            q + "layer_scalar": ones(1),
            a + "q_proj.weight": rand(NH * hd, H), a + "k_proj.weight": rand(nkv * hd, H),
            a + "o_proj.weight": rand(H, NH * hd), a + "q_norm.weight": ones(hd), a + "k_norm.weight": ones(hd),
            q + "mlp.gate_proj.weight": rand(D, H), q + "mlp.up_proj.weight": rand(D, H),
            q + "mlp.down_proj.weight": rand(H, D),
            q + "router.proj.weight": rand(E, H, scale=1.0), q + "router.scale": ones(H),
            q + "router.per_expert_scale": ones(E),
            q + "experts.gate_up_proj": rand(E, 2 * F, H), q + "experts.down_proj": rand(E, H, F),
        })
        if kind == "sliding_attention":  # full-attention layers take the keys as values (attention_k_eq_v)
            t[a + "v_proj.weight"] = rand(nkv * hd, H)
        save(t, f"model-layer{layer:03d}.safetensors")
        print(f"layer {layer + 1}/{args.layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


if __name__ == "__main__":
    main()
