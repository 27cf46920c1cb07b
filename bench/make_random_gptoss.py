"""Write a random-weight gpt-oss checkpoint at gpt-oss-20b's widths in transformers 5 layout (speed studies only).

gpt-oss-20b: hidden 2880, 64 query / 8 KV heads of 64, 32 experts top-4 of width 2880, vocab 201088, sliding window
128 on every other layer, YaRN (factor 32 over 4096 positions). Depth is reduced (--layers, default 2 of 24) to fit
the disk and the time; weights are fp16 (the published experts are MXFP4, which edgemoe does not read yet).

    python bench/make_random_gptoss.py OUT_DIR --layers 2
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
    H, F, E, V, NH, NKV, HD = 2880, 2880, 32, 201088, 64, 8, 64
    cfg = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": V, "hidden_size": H,
        "intermediate_size": F, "num_hidden_layers": args.layers, "num_attention_heads": NH,
        "num_key_value_heads": NKV, "head_dim": HD, "num_local_experts": E, "num_experts_per_tok": 4,
        "sliding_window": 128, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                               for i in range(args.layers)],
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "swiglu_limit": 7.0, "attention_bias": True,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        "tie_word_embeddings": False, "bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999,
        "dtype": "float16",
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

    save({"model.embed_tokens.weight": rand(V, H), "lm_head.weight": rand(V, H),
          "model.norm.weight": np.ones(H, np.float16)}, "model-globals.safetensors")
    for layer in range(args.layers):
        q, a, m = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        t = {
            q + "input_layernorm.weight": np.ones(H, np.float16),
            q + "post_attention_layernorm.weight": np.ones(H, np.float16),
            a + "q_proj.weight": rand(NH * HD, H), a + "q_proj.bias": rand(NH * HD),
            a + "k_proj.weight": rand(NKV * HD, H), a + "k_proj.bias": rand(NKV * HD),
            a + "v_proj.weight": rand(NKV * HD, H), a + "v_proj.bias": rand(NKV * HD),
            a + "o_proj.weight": rand(H, NH * HD), a + "o_proj.bias": rand(H), a + "sinks": rand(NH, scale=1.0),
            m + "router.weight": rand(E, H, scale=0.1), m + "router.bias": rand(E, scale=0.1),
            m + "experts.gate_up_proj": rand(E, H, 2 * F), m + "experts.gate_up_proj_bias": rand(E, 2 * F),
            m + "experts.down_proj": rand(E, F, H), m + "experts.down_proj_bias": rand(E, H),
        }
        save(t, f"model-layer{layer:03d}.safetensors")
        print(f"layer {layer + 1}/{args.layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


if __name__ == "__main__":
    main()
