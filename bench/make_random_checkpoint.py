"""Write a random-weight checkpoint of any transformers model type at real widths (speed and memory studies only).

Speed does not depend on weight values, so real-size benchmarks use random weights (quality studies use the small
trained model). transformers builds the model on the meta device, which gives every tensor's name and shape without
memory; the tensors are then drawn and written shard by shard, so memory stays one shard. Names are transformers 5's
in-memory names (fused experts where the family fuses them), which the exporter reads like any checkpoint.

Real widths per family (FAMILIES.md) are presets; --set overrides or adds config keys; --layers reduces depth (the
per-layer shape is what speed depends on; say how much depth was cut when you report a figure).

    python bench/make_random_checkpoint.py OUT --preset olmoe-1b-7b --layers 4
    python bench/make_random_checkpoint.py OUT --model-type qwen3_moe --set hidden_size=2048 --set num_experts=128 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

# model_type and the config keys that differ from transformers' defaults, at the published widths.
PRESETS: dict[str, tuple[str, dict]] = {
    "olmoe-1b-7b": ("olmoe", {
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False}),
    "qwen3-30b-a3b": ("qwen3_moe", {
        "vocab_size": 151936, "hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": []}),
    "gpt-oss-20b": ("gpt_oss", {
        "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
        "num_experts_per_tok": 4, "sliding_window": 128}),
    "glm-4.5-air": ("glm4_moe", {
        "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "partial_rotary_factor": 0.5,
        "use_qk_norm": False}),
    "deepseek-v2-lite": ("deepseek_v2", {
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
        "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 0.707, "mscale_all_dim": 0.707}}),
    "ernie-4.5-21b-a3b": ("ernie4_5_moe", {  # transformers' defaults are this model's widths
        "vocab_size": 103424, "hidden_size": 2560, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 28, "num_attention_heads": 20, "num_key_value_heads": 4, "moe_num_experts": 64,
        "moe_k": 6, "moe_num_shared_experts": 2, "moe_layer_start_index": 1}),
    "granite-3.1-3b-a800m": ("granitemoe", {
        "vocab_size": 49155, "hidden_size": 1536, "intermediate_size": 512, "num_hidden_layers": 32,
        "num_attention_heads": 24, "num_key_value_heads": 8, "num_local_experts": 40, "num_experts_per_tok": 8,
        "embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
        "logits_scaling": 6.0}),
}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_config(model_type: str, keys: dict, layers: int | None):
    import transformers as tf

    # special tokens inside any vocab (the defaults of some families lie outside a reduced one)
    keys = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **keys}
    if layers:
        keys = dict(keys, num_hidden_layers=layers)
        if isinstance(keys.get("layer_types"), list):  # a per-layer list follows the reduced depth
            keys["layer_types"] = keys["layer_types"][:layers]
    return tf.AutoConfig.for_model(model_type, **keys)


def tensor_shapes(config) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) of every tensor of the model, from a meta-device build (no memory)."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    return {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in model.state_dict().items()}


def draw(rng, name: str, shape, dt):
    if len(shape) == 1 and "norm" in name:
        return np.ones(shape, dt)  # norm weights near 1 keep activations finite through many layers
    if len(shape) == 1 or "bias" in name:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(dt)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)


def write(out: Path, config, dtype: str, shard_bytes: int, tokenizer: Path | None, log=print) -> int:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(out)
    shapes = tensor_shapes(config)
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    weight_map, shard, size, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out / name))
            weight_map.update({k: name for k in shard})
            n_shard += 1
            log(f"shard {n_shard}: {size / 2**30:.2f} GiB ({len(weight_map)}/{len(shapes)} tensors)")
        shard, size = {}, 0

    for name, (shape, _) in shapes.items():
        t = draw(rng, name, shape, dt)
        shard[name] = t
        size += t.nbytes
        total += t.nbytes
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    if tokenizer:
        shutil.copy(tokenizer, out / "tokenizer.json")
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published model's widths")
    p.add_argument("--model-type", help="transformers model_type (with --set for the widths)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config key (VALUE is JSON, or a string); repeatable")
    p.add_argument("--layers", type=int, help="reduce depth to this many layers")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size (memory holds one shard)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json to copy (its vocab must fit vocab_size)")
    args = p.parse_args(argv)
    if not (args.preset or args.model_type):
        p.error("give --preset or --model-type")
    model_type, keys = PRESETS[args.preset] if args.preset else (args.model_type, {})
    for kv in args.set:
        k, sep, v = kv.partition("=")
        if not sep:
            p.error(f"--set {kv!r}: expected KEY=VALUE")
        keys = dict(keys, **{k: _value(v)})
    config = build_config(args.model_type or model_type, keys, args.layers)
    total = write(args.out, config, args.dtype, int(args.shard_gb * 2**30), args.tokenizer)
    print(f"{args.out}: {model_type}, {config.num_hidden_layers} layers, {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
