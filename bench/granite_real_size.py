"""Granite-3.1-3B-A800M at its real widths with random weights (depth reduced), exported and decoded under a budget.

Dimensions (the published granite-3.1-3b-a800m config.json): hidden 1536, 24 heads of 64 (8 KV heads), 40 experts
of width 512, top-8, vocab 49155, tied embeddings, RoPE theta 1e7, multipliers embedding 12, attention 0.015625,
residual 0.22, logits 1/6. Depth: --layers of the real 32 (the speed per layer does not depend on depth; the disk
and the machine's time do). Writes the HF checkpoint (original Granite names: input_linear / output_linear /
router.layer, f16), exports it (MWQ, MSB nesting: no calibration text needed), then decodes in a child process
resident and under --budget-frac of the file, and prints one JSON line per run (tok/s, peak RSS, bytes read per
token) and whether every logit of the budgeted run is bit-identical to the resident one (prefill, then --tokens
teacher-forced decode steps of random ids: random weights would greedily repeat one token and one set of experts).

    python bench/granite_real_size.py /tmp/granite3b --layers 4 --bits 4 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "vocab_size": 49155, "hidden_size": 1536,
    "intermediate_size": 512, "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
    "num_local_experts": 40, "num_experts_per_tok": 8, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072, "rope_theta": 10000000.0, "attention_bias": False,
    "embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
    "logits_scaling": 6.0, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}

CHILD = r"""
import hashlib, json, sys, time
import numpy as np
import edgemoe
path, budget, n = sys.argv[1], (int(sys.argv[2]) or None), int(sys.argv[3])
rng = np.random.default_rng(0)
ids = [int(i) for i in rng.integers(100, 49000, 32)]
feed = [int(i) for i in rng.integers(100, 49000, n)]  # teacher-forced: random weights would repeat one token
with edgemoe.load(path, memory_budget=budget, max_ctx=256, threads=2) as m:
    eng = m._engine
    t0 = time.perf_counter()
    logits = eng.prefill(ids)
    t1 = time.perf_counter()
    h = hashlib.sha256(logits.tobytes())
    for t in feed:
        logits = eng.decode(t)
        h.update(logits.tobytes())
    t2 = time.perf_counter()
    st = m.stats
hwm = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]  # not inherited
print(json.dumps({"engine": m.engine_name, "budget": budget, "prefill_tok_s": len(ids) / (t1 - t0),
                  "decode_tok_s": n / (t2 - t1), "peak_rss_bytes": hwm,
                  "bytes_read_per_token": st.get("bytes_read_per_token"), "logits_sha256": h.hexdigest()}))
"""

LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
ids = [int(i) for i in rng.integers(100, 49000, 32)]
feed = [int(i) for i in rng.integers(100, 49000, n)]
llm = Llama(model_path=path, n_ctx=256, n_batch=64, n_threads=2, n_threads_batch=2, verbose=False)
t0 = time.perf_counter()
llm.eval(ids)
t1 = time.perf_counter()
for t in feed:
    llm.eval([t])
t2 = time.perf_counter()
hwm = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
print(json.dumps({"engine": "llama.cpp", "prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": n / (t2 - t1),
                  "peak_rss_bytes": hwm}))
"""


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = {**CONFIG, "num_hidden_layers": layers}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    H, F, E, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]
    hd = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    index = {}

    def save(tensors: dict, name: str) -> None:
        save_file(tensors, str(out / name))
        index.update({k: name for k in tensors})

    save({"model.embed_tokens.weight": rand(V, H), "model.norm.weight": np.ones(H, np.float16)}, "globals.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        save({p + "input_layernorm.weight": np.ones(H, np.float16),
              p + "post_attention_layernorm.weight": np.ones(H, np.float16),
              p + "self_attn.q_proj.weight": rand(q, H), p + "self_attn.k_proj.weight": rand(kv, H),
              p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, q),
              p + "block_sparse_moe.router.layer.weight": rand(E, H, scale=0.5),
              p + "block_sparse_moe.input_linear.weight": rand(E, 2 * F, H),
              p + "block_sparse_moe.output_linear.weight": rand(E, H, F)}, f"layer{i:03d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--budget-frac", type=float, default=0.5)
    p.add_argument("--llama", default="", help="also run llama.cpp (llama-cpp-python) on a GGUF of this type, e.g. F16")
    args = p.parse_args(argv)
    from edgemoe_export import export

    ckpt = args.work / "hf"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, args.layers)
    emoe = args.work / f"granite3b_{args.layers}l_{args.bits}b.emoe"
    if not emoe.exists():
        export(ckpt, emoe, bits=args.bits, nesting="msb" if args.bits <= 8 else "mwq", show_progress=False)
    size = emoe.stat().st_size
    runs = []
    for budget in (0, int(size * args.budget_frac)):
        r = subprocess.run([sys.executable, "-c", CHILD, str(emoe), str(budget), str(args.tokens)],
                           capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps({"file_bytes": size, "layers": args.layers, **runs[-1]}))
    print(json.dumps({"logits_bit_identical": runs[0]["logits_sha256"] == runs[1]["logits_sha256"]}))
    if args.llama:
        from edgemoe_export.gguf_export import export_gguf

        gguf = args.work / f"granite3b_{args.layers}l_{args.llama}.gguf"
        if not gguf.exists():
            export_gguf(ckpt, gguf, args.llama, show_progress=False)
        r = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(gguf), str(args.tokens)], capture_output=True,
                           text=True, check=True)
        print(json.dumps({"file_bytes": gguf.stat().st_size, "gguf_type": args.llama,
                          **json.loads(r.stdout.strip().splitlines()[-1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
