"""GGUF export: llama.cpp (through llama-cpp-python) is the oracle.

- F32 GGUF -> llama.cpp logits == transformers logits (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral), and == the edgemoe
  NumPy engine for SmallThinker, which is not in transformers.
- F16 / Q8_0 / Q4_0 / Q4_K_M GGUF -> llama.cpp logits == transformers running the weights read back (dequantized)
  from the same GGUF, within a bound set by llama.cpp's own activation rounding (see TOL), and the same top-1 token.
- llama.cpp's tokenizer (from the GGUF metadata) == the Hugging Face tokenizer.
- combinations llama.cpp cannot express are refused with a clear message, and a failed export leaves no file.

Tolerances (relative error = max |a - b| / max |b| over all positions and the vocabulary):
- F32: 1e-4. Both sides compute in fp32 (with `type_k=type_v=0`, llama.cpp's KV cache is fp32 too); the measured
  difference is 5e-7..2e-6 (summation order). 1e-4 leaves a 50x margin yet stays 10x below the ~1e-3 that any fp16
  rounding on the way (fp16 KV cache, fp16 weights) produces, so a silent precision loss still fails.
- F16: 5e-3 against fp16-rounded weights. llama.cpp rounds matmul activations to fp16 too (2^-11 relative per
  element); measured 0.6e-3..1.0e-3.
- Q8_0, Q4_0, Q4_K_M: 0.1 against the dequantized weights. llama.cpp quantizes every matmul input to 8 bits per
  block of 32 (Q8_0, for Q8_0/Q4_0/Q5_0 weights) or 256 (Q8_K, for K-quants): a rounding step of max|block|/127,
  about 0.4-1% of a typical activation, applied at every matmul of every layer. These tiny random models have
  deliberately large weights (std 0.15) and sharp attention, which amplify it: measured 1.6e-2..5.7e-2 (the worst
  single position; most positions are at 1-3e-2). 0.1 is well below the weight-quantization error itself (Q4_0 and
  Q4_K_M against the original weights: 0.41..0.98), so the test fails if the GGUF holds other weights than the ones
  the reference runs, and far below what a layout error (transposed or misordered blocks) gives (O(1)).
  Activation rounding can also flip a top-k routing decision where two experts' router logits are nearly tied
  (seen: a 3e-4 probability gap); such a flip changes that token and, through attention, every later one. The
  quantized comparisons therefore run on an id sequence without near-ties (every k-th/(k+1)-th router-logit gap
  >= ROUTER_GAP, about twice the measured logit perturbation, computed from the dequantized weights).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from tiny_models_gguf import build_gguf_variant
from tiny_smallthinker import build_tiny_smallthinker

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except Exception:  # noqa: BLE001 -- not installed, or its shared library fails to load
    HAVE_LLAMA = False

gguf = importlib.import_module("gguf")
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA, reason="llama-cpp-python is not importable (pip install llama-cpp-python==0.3.36; builds ~15 min)"
)

from edgemoe_export.gguf_export import export_gguf

from edgemoe.errors import EdgeMoEError

F32_TOL = 1e-4
TOL = {"F16": 5e-3, "Q8_0": 0.1, "Q4_0": 0.1, "Q4_K_M": 0.1}
# smallest router-logit gap between the k-th and (k+1)-th expert that activation rounding cannot close (see above)
ROUTER_GAP = {"F16": 0.005, "Q8_0": 0.05, "Q4_0": 0.05, "Q4_K_M": 0.05}
IDS = [int(i) for i in np.random.default_rng(0).integers(3, 312, size=24)]
HF_FAMILIES = ("olmoe", "qwen2moe", "qwen3moe", "mixtral")
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "To be, or not to be: that is the question!  12345 67\n\tnew line   spaces",
    "ünïcödé and émojis 🙂 mixed with ASCII's contractions we'll they're",
]


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def gguf_src(tiny_dir, tmp_path_factory):
    """family -> HF checkpoint directory that llama.cpp's architecture can express."""
    root = tmp_path_factory.mktemp("gguf_src")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            if name == "olmoe":  # llama.cpp's olmoe needs n_kv_heads == n_heads
                cache[name] = build_gguf_variant("olmoe_mha", root / name)
            elif name == "qwen2moe":  # llama.cpp's qwen2moe needs head_dim == hidden / heads
                cache[name] = build_gguf_variant("qwen2moe_hd", root / name)
            elif name == "qwen3moe_k256":
                cache[name] = build_gguf_variant(name, root / name)
            elif name.startswith("smallthinker_"):
                cache[name] = build_tiny_smallthinker(root / name, name.split("_", 1)[1])
            else:
                cache[name] = tiny_dir(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def gguf_file(gguf_src, tmp_path_factory):
    """(source name, type) -> exported GGUF path (built once per session)."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple, Path] = {}

    def get(name: str, gguf_type: str = "F32") -> Path:
        key = (name, gguf_type)
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the F16 fallback notice; checked in its own test
                cache[key] = export_gguf(gguf_src(name), root / f"{name}_{gguf_type}.gguf", gguf_type,
                                         show_progress=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_ref(gguf_src):
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = hf_logits(gguf_src(name), IDS)
        return cache[name]

    return get



def _llama(**kwargs):
    """llama_cpp.Llama with llama.cpp's plain CPU kernels: its repacked ("extra buffer") Q8_0 kernels segfault in
    decode on these tiny shapes at 8+ tokens (llama-cpp-python 0.3.36 on an AVX-512 machine; reproduced outside
    edgemoe). The comparison is about the file, not about which of llama.cpp's kernels reads it."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    default = llama_cpp.llama_model_default_params

    def plain():
        params = default()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = plain
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def llama_logits(path: Path, ids) -> np.ndarray:

    llm = _llama(model_path=str(path), n_ctx=256, n_batch=128, n_threads=2, n_threads_batch=2, logits_all=True,
                type_k=0, type_v=0, verbose=False)  # type_k/v=0: fp32 KV cache (fp16 would add ~1e-3)
    try:
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()


def dequantized_hf_dir(gguf_path: Path, src_dir: Path, out_dir: Path) -> Path:
    """A copy of the HF checkpoint `src_dir` holding the weights read back from `gguf_path` (dequantized, Mixtral's
    q/k rows un-permuted, stacked experts split), for transformers to run exactly what llama.cpp was given."""
    from edgemoe_export import open_checkpoint
    from edgemoe_export.families import dense_hf_names
    from safetensors.numpy import load_file, save_file

    from edgemoe.arch import GLOBAL_TENSORS, dense_tensor_names

    ck = open_checkpoint(src_dir)
    spec, fam = ck.spec, ck.family
    orig: dict[str, np.ndarray] = {}
    for f in sorted(Path(src_dir).glob("*.safetensors")):
        orig.update(load_file(str(f)))
    to_hf = {GLOBAL_TENSORS["embed"]: "model.embed_tokens.weight", GLOBAL_TENSORS["final_norm"]: "model.norm.weight",
             GLOBAL_TENSORS["lm_head"]: "lm_head.weight"}
    for layer in range(spec.n_layers):
        hf = dense_hf_names(fam, spec, layer)
        if "router" in hf and hf["router"] not in orig:
            hf["router"] = f"model.layers.{layer}.mlp.gate.weight"
        for role, name in dense_tensor_names(spec, layer).items():
            to_hf[name] = hf[role]
    out = dict(orig)
    seen = set()
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if "_exps." in t.name:  # blk.N.ffn_{gate,up,down}_exps.weight
            layer, matrix = int(t.name.split(".")[1]), t.name.split(".")[2][len("ffn_"): -len("_exps")]
            leaf = fam.expert_names[("gate", "up", "down").index(matrix)]
            for e in range(arr.shape[0]):
                name = f"model.layers.{layer}.{fam.moe_prefix}.experts.{e}.{leaf}.weight"
                out[name] = np.ascontiguousarray(arr[e])
                seen.add(name)
            continue
        name = to_hf[t.name]
        if spec.family == "mixtral" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            nh = spec.n_heads if "attn_q" in t.name else spec.n_kv_heads  # undo the NORM-RoPE row permutation
            arr = arr.reshape(nh, spec.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
        out[name] = np.ascontiguousarray(arr.reshape(orig[name].shape))
        seen.add(name)
    assert seen == set(orig), f"GGUF does not cover the checkpoint: {sorted(set(orig) ^ seen)[:5]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(src_dir) / "config.json", out_dir / "config.json")
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def well_conditioned_ids(ckpt_dir: Path, min_gap: float, length: int = 16, tries: int = 500) -> list[int]:
    """The first of a fixed series of random id sequences whose top-k routing has no near-tie: at every position
    and layer, the k-th and (k+1)-th router logits (computed by the edgemoe NumPy reference on `ckpt_dir`'s weights)
    differ by at least `min_gap`. Deterministic for given weights."""
    from edgemoe_export import open_checkpoint

    import edgemoe.reference as ref

    ck = open_checkpoint(ckpt_dir)
    weights = dict(ck.global_tensors())
    for layer in range(ck.spec.n_layers):
        weights.update(ck.layer_dense(layer))
        if ck.spec.is_moe_layer(layer):
            weights.update(dict(ck.layer_experts(layer)))
    smallest = [np.inf]
    orig_route = ref.route

    def recording_route(spec, logits, bias=None):
        srt = -np.sort(-logits, axis=-1)
        smallest[0] = min(smallest[0], float((srt[:, spec.top_k - 1] - srt[:, spec.top_k]).min()))
        return orig_route(spec, logits, bias)

    ref.route = recording_route
    try:
        for seed in range(tries):
            ids = [int(i) for i in np.random.default_rng(1000 + seed).integers(3, 312, size=length)]
            smallest[0] = np.inf
            ref.reference_logits(ck.spec, weights.__getitem__, ids)
            if smallest[0] >= min_gap:
                return ids
    finally:
        ref.route = orig_route
    raise AssertionError(f"no id sequence of {length} without a routing near-tie (< {min_gap}) in {tries} tries")


# ---------------------------------------------------------------------------------------------------------------
# F32: llama.cpp == transformers


@needs_llama
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_f32_logits_match_transformers(family, gguf_file, hf_ref, gguf_src, tmp_path):
    if family == "mixtral":  # also: export from an opened Checkpoint rather than a directory
        from edgemoe_export import open_checkpoint

        path = export_gguf(open_checkpoint(gguf_src(family)), tmp_path / "m.gguf", "F32", show_progress=False)
    else:
        path = gguf_file(family, "F32")
    got, ref = llama_logits(path, IDS), hf_ref(family)
    assert got.shape == ref.shape
    err = rel_err(got, ref)
    print(f"{family} F32 rel err {err:.2e}")
    assert err < F32_TOL, f"{family}: llama.cpp vs transformers relative error {err:.2e} >= {F32_TOL}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# ---------------------------------------------------------------------------------------------------------------
# quantized: llama.cpp == transformers on the dequantized GGUF weights


QUANT_CASES = [(f, t) for t in ("F16", "Q8_0", "Q4_0") for f in HF_FAMILIES] + [("qwen3moe_k256", "Q4_K_M")]


@needs_llama
@pytest.mark.parametrize("family,gguf_type", QUANT_CASES)
def test_quantized_logits_match_dequantized_transformers(family, gguf_type, gguf_file, gguf_src, tmp_path):
    path = gguf_file(family, gguf_type)
    deq = dequantized_hf_dir(path, gguf_src(family), tmp_path / "deq")
    ids = well_conditioned_ids(deq, ROUTER_GAP[gguf_type])
    got, ref = llama_logits(path, ids), hf_logits(deq, ids)
    err = rel_err(got, ref)
    err_orig = rel_err(got, hf_logits(gguf_src(family), ids))
    print(f"{family} {gguf_type}: rel err {err:.2e} vs dequantized weights, {err_orig:.2e} vs original weights")
    assert err < TOL[gguf_type], f"{family} {gguf_type}: relative error {err:.2e} >= {TOL[gguf_type]}"
    # next token: these random models' top-2 logits are often closer than the activation-rounding difference
    # (2-3% of the largest logit), so require llama.cpp's top-1 among the reference's top 3 everywhere and equal to
    # the reference's top-1 on at least 3/4 of the positions (measured: 14-16 of 16)
    top3 = np.argsort(-ref, axis=-1)[:, :3]
    assert all(g in t for g, t in zip(got.argmax(-1), top3)), f"{family} {gguf_type}: top-1 outside reference top-3"
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert agree >= 0.75, f"{family} {gguf_type}: top-1 agrees on {agree:.0%} of positions"
    if gguf_type in ("Q4_0", "Q4_K_M"):
        # the reference really runs the quantized weights: the original weights are much further away
        assert err_orig > 3 * err


@needs_llama
def test_q4_k_m_uses_k_quants(gguf_file):
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_file("qwen3moe_k256", "Q4_K_M"))).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
    assert {types["blk.0.ffn_down_exps.weight"], types["blk.1.ffn_down_exps.weight"]} <= {"Q4_K", "Q6_K"}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"


def test_quantized_tensor_types_and_fallback_warning(gguf_src, tmp_path):
    # mixtral: expert_ffn = 40 is not a multiple of 32, so ffn_down_exps (rows of 40) cannot be Q8_0
    with pytest.warns(UserWarning, match=r"stored as F16 instead of Q8_0: blk\.0\.ffn_down_exps\.weight"):
        path = export_gguf(gguf_src("mixtral"), tmp_path / "q8.gguf", "Q8_0", show_progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and types["blk.0.ffn_up_exps.weight"] == "Q8_0"
    assert types["blk.0.ffn_down_exps.weight"] == "F16"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    with pytest.warns(UserWarning, match="instead of Q4_0"):
        path = export_gguf(gguf_src("qwen3moe"), tmp_path / "q4.gguf", "Q4_0", show_progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.1.ffn_up_exps.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"
    r = gguf.GGUFReader(str(path))
    exps = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert [int(x) for x in exps.shape] == [64, 40, 8]  # ggml ne order: {n_embd, n_ff_exp, n_expert}


SMALL_MOE = Path(__file__).resolve().parents[1] / "export" / "assets" / "small-moe"


GREEDY_GAP = 0.2  # smallest top-1/top-2 logit gap along a greedy path that activation rounding cannot close


def decisive_prompts(engine, tokenizer, n: int, steps: int = 16, length: int = 32) -> list[tuple[str, list[int]]]:
    """The first `n` of a fixed series of held-out text windows (both shipped domains, every 1500 characters)
    whose greedy continuation of `steps` tokens, decoded by `engine`, keeps a top-1/top-2 logit gap >= GREEDY_GAP
    at every step. Deterministic for given weights."""
    texts = {d: (SMALL_MOE / "heldout" / f"{d}.txt").read_text(encoding="utf-8") for d in ("pydocs", "shakespeare")}
    found = []
    for start in range(0, 240000, 1500):
        for doc, text in texts.items():
            prompt = tokenizer.encode(text[start: start + 20 * length])[:length]
            if len(prompt) < length:
                continue
            logits, smallest = engine.prefill(prompt), np.inf
            for _ in range(steps):
                top2 = np.sort(logits)[-2:]
                smallest = min(smallest, float(top2[1] - top2[0]))
                logits = engine.decode(int(np.argmax(logits)))
            if smallest >= GREEDY_GAP:
                found.append((f"{doc}@{start}", prompt))
                if len(found) == n:
                    return found
    raise AssertionError(f"only {len(found)} held-out windows with a decisive {steps}-token greedy path")


@needs_llama
@pytest.mark.skipif(not (SMALL_MOE / "model.safetensors").exists(), reason="export/assets/small-moe is not present")
def test_q8_0_greedy_16_steps_identical_to_edgemoe(tmp_path):
    """The Q8_0 GGUF in llama.cpp and the same Q8_0 weights in edgemoe's C engine decode the same 16 greedy tokens.

    Model: the small trained OLMoE (export/assets/small-moe, real routing), not a random one. The container is
    built with edgemoe's own quantizer and checked byte-identical to the GGUF's blocks first
    (tiny_models_gguf.q8_0_container_like_gguf), so both engines run exactly the same weights.

    Why the prompts are selected: both engines quantize matmul activations to 8 bits per block of 32 (ggml's
    Q8_0 x Q8_0 dot; edgemoe's default int8-activation kernels), with different rounding and summation order, so
    their logits differ by ~2e-3 relative (max |difference| over the vocabulary ~0.02). What flips a greedy token
    is the change of the top-1 minus top-2 difference: measured against the exact path (f32 activations, same
    weights) over 448 decode steps, median 0.006, 99th percentile 0.07. Even this trained model's greedy paths on
    held-out text pass through near-ties (1 % of steps have a top-2 gap < 0.006; 2 of 40 random 16-step paths
    differed between the engines, each at a gap < 0.001). The prompts are therefore held-out windows whose
    greedy path, decoded with exact f32 activations (an engine neither side uses), keeps every top-2 gap >=
    GREEDY_GAP = 0.2, about 3x that 99th percentile. On such paths any difference in the weights (layout,
    quantizer, tensor mapping: f32 instead of Q8_0 weights already moves logits by 5e-3..7e-2 relative) or in
    the decode path through the KV cache shows up as a different token.
    """
    from tiny_models_gguf import q8_0_container_like_gguf

    import edgemoe
    from edgemoe.engine_c import CEngine

    path = export_gguf(SMALL_MOE, tmp_path / "small_q8_0.gguf", "Q8_0", show_progress=False)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} == {"F32", "Q8_0"}
    emoe = q8_0_container_like_gguf(SMALL_MOE, path, tmp_path / "small_q8_0.emoe")
    llm = _llama(model_path=str(path), n_ctx=256, n_batch=128, n_threads=2, n_threads_batch=2, logits_all=True,
                type_k=0, type_v=0, verbose=False)
    try:
        with edgemoe.load(emoe, engine="c", threads=2) as model:
            c = model.container
            assert {t.dtype for t in c.tensors.values() if t.kind == "expert"} == {"q8_0"}
            exact = CEngine(model.spec, {n: c.array(n) for n, t in c.tensors.items() if t.kind != "blob"},
                            {n: t.dtype for n, t in c.tensors.items()}, threads=2, max_ctx=256, q8_f32_act=True)
            engine, worst_err = model._engine, 0.0
            for where, prompt in decisive_prompts(exact, model.tokenizer, 4):
                ours, theirs = [], []
                logits = engine.prefill(prompt)
                llm.reset()
                llm.eval(prompt)
                for _ in range(16):
                    ref = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                    worst_err = max(worst_err, rel_err(logits, ref))
                    ours.append(int(np.argmax(logits)))
                    theirs.append(int(np.argmax(ref)))
                    logits = engine.decode(ours[-1])
                    llm.eval([theirs[-1]])
                print(f"{where}: {ours}")
                assert ours == theirs, f"{where}: edgemoe {ours} != llama.cpp {theirs}"
    finally:
        llm.close()
    print(f"Q8_0 small-moe: max logit rel err {worst_err:.2e} over the 4 x 16 steps")
    # both quantize activations, differently: measured 2e-3..8e-3 (one routing flip gives up to 1e-1 at a single
    # position, so the bound is the tokens above; this catches gross errors such as a wrong tensor layout, O(1))
    assert worst_err < 0.1


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def _hf_ids(tokenizer_json: Path, text: str) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json)).encode(text, add_special_tokens=False)


@needs_llama
@pytest.mark.parametrize("name", ["qwen3moe", "smallthinker_sigmoid_tied"])
def test_llama_cpp_tokenizes_like_hf(name, gguf_file, gguf_src):
    from llama_cpp import Llama

    path = gguf_file(name, "F32")
    meta = {f.name: f for f in gguf.GGUFReader(str(path)).fields.values()}
    pre = bytes(meta["tokenizer.ggml.pre"].parts[-1]).decode()
    assert pre == ("gpt-2" if name == "qwen3moe" else "qwen2")
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            want = _hf_ids(gguf_src(name) / "tokenizer.json", text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == want  # add_bos_token is false, as HF
            assert llm.detokenize(want).decode() == text
        assert llm.token_bos() == 1 and llm.token_eos() == 2
    finally:
        llm.close()


@needs_llama
def test_no_tokenizer_writes_model_none(gguf_src, hf_ref, tmp_path):
    path = export_gguf(gguf_src("qwen3moe"), tmp_path / "none.gguf", "F32", show_progress=False, tokenizer="none")
    meta = {f.name: f for f in gguf.GGUFReader(str(path)).fields.values()}
    assert bytes(meta["tokenizer.ggml.model"].parts[-1]).decode() == "none"
    assert "tokenizer.ggml.tokens" not in meta
    assert rel_err(llama_logits(path, IDS), hf_ref("qwen3moe")) < F32_TOL


# ---------------------------------------------------------------------------------------------------------------
# SmallThinker: llama.cpp == edgemoe NumPy engine (SmallThinker is not in transformers)


@needs_llama
@pytest.mark.parametrize("variant", ["sigmoid_tied", "softmax", "hybrid"])
def test_smallthinker_llama_cpp_matches_edgemoe(variant, gguf_file, gguf_src, tmp_path):
    from edgemoe_export import export

    import edgemoe

    name = f"smallthinker_{variant}"
    src = gguf_src(name)
    emoe = export(src, tmp_path / "st.emoe", bits=32, show_progress=False)
    model = edgemoe.load(emoe, engine="numpy")
    spec = model.spec
    assert spec.router_input == "layer_input" and spec.activation == "reglu" and spec.norm_topk
    assert spec.router_fn == ("softmax" if variant == "softmax" else "sigmoid")
    assert spec.tie_embeddings == (variant != "softmax")
    if variant == "hybrid":
        assert spec.nope_layers == [0, 4] and spec.swa_layers == [1, 2, 3] and spec.sliding_window == 4096
    got, ref = llama_logits(gguf_file(name, "F32"), IDS), model.logits(IDS)
    err = rel_err(got, ref)
    print(f"{name} F32 rel err {err:.2e}")
    assert err < F32_TOL, f"{name}: llama.cpp vs edgemoe relative error {err:.2e} >= {F32_TOL}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@needs_llama
def test_smallthinker_router_reads_layer_input(gguf_file, gguf_src, tmp_path):
    """Discriminating check: the same weights routed on the normed FFN input instead differ from llama.cpp."""
    from edgemoe_export import export

    import edgemoe

    emoe = export(gguf_src("smallthinker_sigmoid_tied"), tmp_path / "st.emoe", bits=32, show_progress=False)
    model = edgemoe.load(emoe, engine="numpy")
    got = llama_logits(gguf_file("smallthinker_sigmoid_tied", "F32"), IDS)
    assert rel_err(got, model.logits(IDS)) < F32_TOL
    model.spec.router_input = "ffn_norm"
    assert rel_err(got, model.logits(IDS)) > 100 * F32_TOL


# ---------------------------------------------------------------------------------------------------------------
# refusals and atomic writes (no llama.cpp needed)


def test_olmoe_gqa_is_refused(tiny_dir, tmp_path):
    with pytest.raises(EdgeMoEError, match=r"num_key_value_heads \(2\) must equal num_attention_heads \(4\)"):
        export_gguf(tiny_dir("olmoe"), tmp_path / "o.gguf", show_progress=False)
    assert not list(tmp_path.iterdir())


def test_qwen2moe_head_dim_is_refused(tiny_dir, tmp_path):
    with pytest.raises(EdgeMoEError, match=r"num_attention_heads \* head_dim == hidden_size"):
        export_gguf(tiny_dir("qwen2moe"), tmp_path / "q.gguf", show_progress=False)


def test_smallthinker_unsupported_layouts_are_refused(tmp_path):
    # llama.cpp ignores the configured window (it uses 4096) ...
    src = build_tiny_smallthinker(tmp_path / "w8", "hybrid", sliding_window_size=8)
    with pytest.raises(EdgeMoEError, match="window of 4096"):
        export_gguf(src, tmp_path / "w8.gguf", show_progress=False)
    # ... and the layer pattern (NoPE + full attention on layers i % 4 == 0, SWA on the others)
    src = build_tiny_smallthinker(tmp_path / "pat", "hybrid", rope_layout=[1, 1, 1, 1, 0])
    with pytest.raises(EdgeMoEError, match="hard-codes its hybrid attention layout"):
        export_gguf(src, tmp_path / "pat.gguf", show_progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_bad_arguments(gguf_src, tmp_path):
    with pytest.raises(EdgeMoEError, match="not supported; choose one of F32, F16, Q8_0, Q4_0, Q4_K_M"):
        export_gguf(gguf_src("qwen3moe"), tmp_path / "x.gguf", "Q3_K", show_progress=False)
    with pytest.raises(EdgeMoEError, match="is a directory"):
        export_gguf(gguf_src("qwen3moe"), tmp_path, show_progress=False)
    with pytest.raises(EdgeMoEError, match="does not exist"):
        export_gguf(gguf_src("qwen3moe"), tmp_path / "missing" / "x.gguf", show_progress=False)


def test_failed_export_leaves_no_file(gguf_src, tmp_path, monkeypatch):
    import edgemoe_export.gguf_export as ge

    calls = {"n": 0}
    real = ge._encode

    def failing(arr, qtype):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk full (simulated)")
        return real(arr, qtype)

    monkeypatch.setattr(ge, "_encode", failing)
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous")  # an existing file is only replaced by a complete new one
    with pytest.raises(RuntimeError, match="simulated"):
        export_gguf(gguf_src("qwen3moe"), out, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"] and out.read_bytes() == b"previous"


def test_unknown_pre_tokenizer_is_refused(gguf_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(gguf_src("qwen3moe"), src)
    tok = json.loads((src / "tokenizer.json").read_text())
    # a pre-tokenizer llama.cpp has no name for, that still round-trips text (the exporter checks that first)
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[0-9]"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EdgeMoEError, match="tokenizer='none'"):
        export_gguf(src, tmp_path / "t.gguf", show_progress=False)
    path = export_gguf(src, tmp_path / "t.gguf", show_progress=False, tokenizer="none")
    assert path.exists() and os.path.getsize(path) > 0
