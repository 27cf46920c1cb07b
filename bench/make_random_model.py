"""Write a random-weight MoE checkpoint of realistic shape in Hugging Face layout (for speed studies only).

Speed does not depend on weight values, so benchmarks use OLMoE-shaped models with random weights; quality studies
use the small trained model instead. Written shard by shard (one layer per shard) so memory stays bounded.

    python bench/make_random_model.py OUT_DIR --layers 8 --hidden 2048 --experts 16 --top-k 4 --expert-ffn 1024
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json to copy (vocab must fit)")
    args = p.parse_args(argv)
    from safetensors.numpy import save_file

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    H, I, E, V = args.hidden, args.expert_ffn, args.experts, args.vocab
    cfg = {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": V, "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads, "num_experts": E, "num_experts_per_tok": args.top_k,
        "norm_topk_prob": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "dtype": args.dtype,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(0)
    dt = np.dtype(args.dtype)

    def rand(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dt)

    weight_map = {}
    shards = []

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(out / name))
        weight_map.update({k: name for k in tensors})
        shards.append(name)

    save({"model.embed_tokens.weight": rand(V, H), "lm_head.weight": rand(V, H),
          "model.norm.weight": np.ones(H, dt)}, "model-globals.safetensors")
    for layer in range(args.layers):
        p_ = f"model.layers.{layer}."
        t = {
            p_ + "input_layernorm.weight": np.ones(H, dt), p_ + "post_attention_layernorm.weight": np.ones(H, dt),
            p_ + "self_attn.q_norm.weight": np.ones(H, dt), p_ + "self_attn.k_norm.weight": np.ones(H, dt),
            p_ + "mlp.gate.weight": rand(E, H, scale=0.1),
        }
        for proj in "qkvo":
            t[p_ + f"self_attn.{proj}_proj.weight"] = rand(H, H)
        for e in range(E):
            t[p_ + f"mlp.experts.{e}.gate_proj.weight"] = rand(I, H)
            t[p_ + f"mlp.experts.{e}.up_proj.weight"] = rand(I, H)
            t[p_ + f"mlp.experts.{e}.down_proj.weight"] = rand(H, I)
        save(t, f"model-layer{layer:03d}.safetensors")
        print(f"layer {layer + 1}/{args.layers}", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if args.tokenizer:
        shutil.copy(args.tokenizer, out / "tokenizer.json")


if __name__ == "__main__":
    main()
