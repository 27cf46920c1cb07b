"""DeepSeek-V2-Lite at its real widths with random weights (depth reduced), exported and decoded under a budget.

Dimensions (the published DeepSeek-V2-Lite config.json): hidden 2048, 16 heads, Multi-head Latent Attention with
kv_lora_rank 512, no q_lora (q_lora_rank null), qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128; 64
routed experts of width 1408, top-6, 2 shared experts, greedy softmax routing; layer 0 dense (width 10944); vocab
102400; YaRN (factor 40 over 4096, mscale = mscale_all_dim = 0.707). Depth: --layers of the real 27 (the first
dense, the rest MoE; the per-layer cost does not depend on depth, the disk and the machine's time do). Writes the HF
checkpoint (bench/make_random_checkpoint.py's preset deepseek-v2-lite, f16), exports it (MWQ with MSB nesting: no calibration text needed), then decodes in a
child process resident and under --budget-frac of the file, and prints one JSON line per run (tok/s, peak RSS, bytes
read per token, the KV cache bytes of the plan) and whether every logit of the budgeted run is bit-identical to the
resident one (a prefill, then --tokens teacher-forced decode steps of random ids: random weights would greedily
repeat one token and one set of experts). Last, the KV bytes per token of MLA vs plain attention with the same heads.

    python bench/deepseek_v2_lite_real_size.py /tmp/dsv2lite --layers 4 --bits 4 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_random_checkpoint, beside this script

PRESET = "deepseek-v2-lite"  # bench/make_random_checkpoint.py: the published config's widths


def _config() -> dict:
    from make_random_checkpoint import PRESETS

    return PRESETS[PRESET][1]


CHILD = r"""
import hashlib, json, sys, time
import numpy as np
import edgemoe
path, budget, n = sys.argv[1], (int(sys.argv[2]) or None), int(sys.argv[3])
rng = np.random.default_rng(0)
ids = [int(i) for i in rng.integers(100, 100000, 32)]
feed = [int(i) for i in rng.integers(100, 100000, n)]  # teacher-forced: random weights would repeat one token
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
                  "bytes_read_per_token": st.get("bytes_read_per_token"),
                  "kv_cache_bytes": (st.get("budget_parts") or {}).get("kv_cache"), "logits_sha256": h.hexdigest()}))
"""


LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp
import llama_cpp.llama as llama_module
path, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
ids = [int(i) for i in rng.integers(100, 100000, 32)]
feed = [int(i) for i in rng.integers(100, 100000, n)]
default = llama_cpp.llama_model_default_params
def plain():  # llama.cpp's plain CPU kernels: its repacked ones segfault on this VM (tests/test_gguf.py _llama)
    p = default()
    p.use_extra_bufts = False
    return p
llama_module.llama_cpp.llama_model_default_params = plain
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=64, n_threads=2, n_threads_batch=2, verbose=False)
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


def write_checkpoint(out: Path, layers: int) -> Path:
    """The shared random-weight generator (transformers 5 in-memory names, f16) at the preset's widths."""
    from make_random_checkpoint import PRESETS, build_config, write

    model_type, keys = PRESETS[PRESET]
    write(out, build_config(model_type, keys, layers), "float16", 2 << 30, None)
    return out


def kv_bytes_per_token(layers: int, ctx_bytes: int = 4) -> dict:
    """Per token, all layers: MLA's latent + RoPE key vs plain attention's K (heads x (nope + rope)) and V (heads x
    v_head_dim) with the same heads, at f32 (ctx_bytes 4) or f16 (2)."""
    c = _config()
    mla = layers * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * ctx_bytes
    plain = layers * c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"])
    return {"layers": layers, "mla_bytes": mla, "plain_bytes": plain * ctx_bytes, "ratio": plain * ctx_bytes / mla}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--budget-frac", type=float, default=0.5)
    p.add_argument("--llama", default="", help="also run llama.cpp (llama-cpp-python) on a GGUF of this type, e.g. F16")
    p.add_argument("--skip-edgemoe", action="store_true", help="only the llama.cpp run (the .emoe runs done before)")
    args = p.parse_args(argv)
    from edgemoe_export import export

    ckpt = args.work / "hf_shared"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, args.layers)
    emoe = args.work / f"dsv2lite_{args.layers}l_{args.bits}b.emoe"
    if not emoe.exists():
        export(ckpt, emoe, bits=args.bits, nesting="msb" if args.bits <= 8 else "mwq", show_progress=False)
    size = emoe.stat().st_size
    runs = []
    for budget in () if args.skip_edgemoe else (0, int(size * args.budget_frac)):
        r = subprocess.run([sys.executable, "-c", CHILD, str(emoe), str(budget), str(args.tokens)],
                           capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps({"file_bytes": size, "layers": args.layers, **runs[-1]}), flush=True)
    if runs:
        print(json.dumps({"logits_bit_identical": runs[0]["logits_sha256"] == runs[1]["logits_sha256"]}))
    for layers in (args.layers, _config()["num_hidden_layers"]):
        print(json.dumps({"kv_per_token_f32": kv_bytes_per_token(layers)}))
    if args.llama:
        from edgemoe_export.gguf_export import export_gguf

        gguf = args.work / f"dsv2lite_{args.layers}l_{args.llama}.gguf"
        if not gguf.exists():
            export_gguf(ckpt, gguf, args.llama, show_progress=False)
        r = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(gguf), str(args.tokens)], capture_output=True,
                           text=True, check=True)
        print(json.dumps({"file_bytes": gguf.stat().st_size, "gguf_type": args.llama,
                          **json.loads(r.stdout.strip().splitlines()[-1])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
