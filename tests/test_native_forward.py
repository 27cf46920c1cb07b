"""The C forward pass against the NumPy reference (edgemoe/reference.py) on tiny random specs, one per feature mix.

Tolerances:
- f32 weights: prefill logits within 1e-5 relative (max|diff| / max|ref|) of the reference; only summation order and
  libm differ.
- f16 weights: the same, against the reference run on the same f16-rounded weights (f16 -> f32 is exact).
- f16 KV cache: each cached K/V value is rounded to fp16 (relative error <= 2^-11 = 4.9e-4); scores and the value
  mix average many such errors, so the median token moves by ~5e-4 relative (measured 3.5e-4..8.3e-4); we allow
  2e-3 for the median and 2e-2 for the worst token (a router near-tie amplifies one token; measured <= 6.3e-3).
- Q8_0 weights: the C core also quantizes each activation block of 32 to int8 (error uniform in +-d/2,
  d = max|x|/127: about 0.2-0.5% of a dot product). Against the reference run with the same activation quantization
  (emulated in NumPy) we allow 1e-3; against unquantized activations the median token is within 5e-2. With
  q8_f32_act the activations stay f32 and the dequantized weights match the reference to 1e-5.
- decode (one token at a time through the KV cache) equals prefill at every position bit for bit: every kernel
  accumulates each (row, token) dot product in the same order whatever the number of tokens in the call.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest

N = importlib.import_module("edgemoe._native")

from edgemoe.arch import GLOBAL_TENSORS, ArchSpec, dense_tensor_names, expert_tensor_name
from edgemoe.engine_c import CEngine
from edgemoe.reference import reference_logits

BASE = {"n_layers": 2, "hidden": 64, "vocab": 96, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "n_experts": 6,
        "top_k": 2, "expert_ffn": 32}

SPECS = {
    "olmoe": ArchSpec("olmoe", **BASE, qk_norm="full", norm_eps=1e-5),
    "qwen2moe": ArchSpec("qwen2moe", **{**BASE, "head_dim": 24, "top_k": 3}, qkv_bias=True, shared_ffn=48,
                         shared_gate=True, rope_theta=50000.0),
    "qwen3moe": ArchSpec("qwen3moe", **{**BASE, "head_dim": 32, "n_experts": 8}, qk_norm="head", norm_topk=True),
    "mixtral": ArchSpec("mixtral", **{**BASE, "n_kv_heads": 1, "n_experts": 4}, rope_kind="norm", norm_topk=True),
    "smallthinker": ArchSpec("smallthinker", **{**BASE, "n_layers": 4}, router_input="layer_input",
                             router_fn="sigmoid", norm_topk=True, activation="reglu", nope_layers=[3],
                             sliding_window=5, swa_layers=[0, 1, 2], tie_embeddings=True, rope_dim=8),
    "dense_shared": ArchSpec("qwen2moe", **{**BASE, "n_layers": 3}, dense_ffn=80, dense_layers=[0], shared_ffn=32,
                             router_fn="sigmoid"),
    "merged": ArchSpec("olmoe", **{**BASE, "n_experts": 8, "top_k": 3}, norm_topk=True,
                       expert_map=[[0, 1, 1, 2, -1, 3, 0, 4], []]),
    # DeepSeek-V3-style routing: sigmoid + selection bias, 2 of 4 groups kept, renormalized and scaled (GLM-4.5)
    "glm4moe": ArchSpec("glm4moe", **{**BASE, "n_layers": 3, "n_experts": 8, "top_k": 3}, qkv_bias=True,
                        qk_norm="head", rope_dim=8, router_fn="sigmoid", norm_topk=True, score_bias=True, n_group=4,
                        topk_group=2, routed_scaling=2.5, shared_ffn=32, dense_ffn=80, dense_layers=[0]),
    # DeepSeek-V2's group-limited greedy (routing options only; MLA is not implemented): softmax, groups scored by
    # their best expert, 2 of 4 groups kept, weights scaled without renormalization
    "v2_groups": ArchSpec("deepseek_v2_routing", **{**BASE, "n_experts": 8, "top_k": 2}, n_group=4, topk_group=2,
                          group_score="max", routed_scaling=1.5, shared_ffn=32),
    # ERNIE-4.5: softmax + selection bias, renormalized; odd expert count; a dense first layer
    "ernie4_5moe": ArchSpec("ernie4_5moe", **{**BASE, "n_layers": 3, "n_experts": 7, "top_k": 3}, rope_kind="norm",
                            norm_topk=True, score_bias=True, shared_ffn=64, dense_ffn=80, dense_layers=[0],
                            tie_embeddings=True),
}


def tensor_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Logical shapes of every tensor (written from the table in the brief, independently of the C core)."""
    H, V, nh, nkv, hd = spec.hidden, spec.vocab, spec.n_heads, spec.n_kv_heads, spec.head_dim
    shapes = {GLOBAL_TENSORS["embed"]: (V, H), GLOBAL_TENSORS["final_norm"]: (H,)}
    if not spec.tie_embeddings:
        shapes[GLOBAL_TENSORS["lm_head"]] = (V, H)
    qn = {"head": (hd, hd), "full": (nh * hd, nkv * hd)}.get(spec.qk_norm)
    for layer in range(spec.n_layers):
        role_shapes = {"attn_norm": (H,), "ffn_norm": (H,), "wq": (nh * hd, H), "wk": (nkv * hd, H),
                       "wv": (nkv * hd, H), "wo": (H, nh * hd), "bq": (nh * hd,), "bk": (nkv * hd,), "bv": (nkv * hd,),
                       "router": (spec.n_experts, H), "sh_gate": (spec.shared_ffn, H), "sh_up": (spec.shared_ffn, H),
                       "sh_down": (H, spec.shared_ffn), "sh_gate_inp": (H,), "mlp_gate": (spec.dense_ffn, H),
                       "mlp_up": (spec.dense_ffn, H), "mlp_down": (H, spec.dense_ffn), "score_bias": (spec.n_experts,)}
        if qn:
            role_shapes.update(q_norm=(qn[0],), k_norm=(qn[1],))
        for role, name in dense_tensor_names(spec, layer).items():
            shapes[name] = role_shapes[role]
        if spec.is_moe_layer(layer):
            for e in range(spec.stored_experts(layer)):
                for m, shp in (("gate", (spec.expert_ffn, H)), ("up", (spec.expert_ffn, H)), ("down", (H, spec.expert_ffn))):
                    shapes[expert_tensor_name(layer, e, m)] = shp
    return shapes


def random_tensors(spec: ArchSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """f32 weights scaled so activations stay O(1), routing is decisive and logits are far from uniform."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(spec).items():
        if len(shape) == 1:
            base = 1.0 if "norm" in name else 0.0
            # a selection bias of a few hundredths, like trained ones: it reorders near experts without swamping
            a = base + (0.05 if "exp_probs_b" in name else 0.2) * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) * (2.0 / np.sqrt(shape[1]))
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def ids_for(spec: ArchSpec, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, spec.vocab, n)


def c_engine(spec, tensors, dtypes=None, **kw) -> CEngine:
    dtypes = dtypes or {n: "f32" for n in tensors}
    kw.setdefault("threads", 2)
    kw.setdefault("max_ctx", 160)
    return CEngine(spec, tensors, dtypes, **kw)


N_TOK = 70  # > the C core's 64-token block, so prefill crosses a block boundary


@pytest.fixture(scope="module", params=sorted(SPECS))
def case(request):
    spec = SPECS[request.param]
    tensors = random_tensors(spec)
    ids = ids_for(spec, N_TOK)
    ref = reference_logits(spec, lambda n: tensors[n], ids)
    return request.param, spec, tensors, ids, ref


def test_prefill_logits_match_reference(case):
    name, spec, tensors, ids, ref = case
    with c_engine(spec, tensors) as eng:
        got = eng.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert rel_err(got, ref) <= 1e-5, name


def test_scalar_kernels_match_reference(case):
    name, spec, tensors, ids, ref = case
    with c_engine(spec, tensors, threads=1, isa="scalar") as eng:
        assert eng.isa == "scalar"
        got = eng.logits(ids[:20])
    assert rel_err(got, ref[:20]) <= 1e-5, name


def test_decode_matches_prefill(case):
    name, spec, tensors, ids, _ = case
    with c_engine(spec, tensors) as eng:
        pre = eng.logits(ids)
        eng.reset()
        first = eng.prefill(ids[:5])
        assert np.array_equal(first, pre[4])
        for t in range(5, len(ids)):
            dec = eng.decode(int(ids[t]))
            assert np.array_equal(dec, pre[t]), (name, t, rel_err(dec, pre[t]))
        assert eng.n_past == len(ids)


def test_f16_weights_match_reference_on_rounded_weights(case):
    name, spec, tensors, ids, _ = case
    t16 = {n: (a.astype(np.float16) if a.ndim == 2 else a) for n, a in tensors.items()}
    dtypes = {n: ("f16" if a.dtype == np.float16 else "f32") for n, a in t16.items()}
    ref = reference_logits(spec, lambda n: t16[n].astype(np.float32), ids[:24])
    with c_engine(spec, t16, dtypes) as eng:
        got = eng.logits(ids[:24])
    assert rel_err(got, ref) <= 1e-5, name


def test_f16_kv_cache_within_fp16_rounding(case):
    name, spec, tensors, ids, ref = case
    with c_engine(spec, tensors, kv_f16=True) as eng:
        got = eng.logits(ids)
        eng.reset()
        eng.prefill(ids[:40])
        dec = eng.decode(int(ids[40]))
    per_token = np.abs(got - ref).max(1) / np.abs(ref).max()
    assert 0 < np.median(per_token) <= 2e-3, name  # nonzero: the cache really is f16
    assert per_token.max() <= 2e-2, name  # a routing near-tie can amplify one token's error
    assert np.array_equal(dec, got[40])


def quantize_act_emulated(x: np.ndarray) -> np.ndarray:
    """NumPy copy of the C activation quantizer, dequantized: per block of 32, d = max|x|/127 (f32),
    q = round-half-even(x * (1/d)) in f32; returns d*q."""
    x = np.asarray(x, dtype=np.float32)
    b = x.reshape(*x.shape[:-1], -1, 32)
    d = (np.abs(b).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.rint(b * inv)
    return (q.astype(np.float64) * d).reshape(x.shape)


class Q8Weight(np.ndarray):
    """A dequantized Q8_0 weight whose `x @ W.T` quantizes x the way the C core does (Python tries a subclass's
    __rmatmul__ first), so the unmodified NumPy reference emulates the C core's Q8_0 arithmetic exactly."""

    def __rmatmul__(self, x):
        return (quantize_act_emulated(x) @ np.asarray(self, dtype=np.float64)).astype(np.float32)

    def __getitem__(self, idx):  # embedding rows are gathered, not multiplied: plain f32
        return np.asarray(self)[idx]


def quantized_case(spec, tensors):
    tq, dtypes, deq, emu = {}, {}, {}, {}
    for n, a in tensors.items():
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            tq[n], dtypes[n] = N.quantize_q8_0(a), "q8_0"
            deq[n] = N.dequantize_q8_0(tq[n], a.shape)
            emu[n] = deq[n].view(Q8Weight)
        else:
            tq[n], dtypes[n], deq[n], emu[n] = a, "f32", a, a
    return tq, dtypes, deq, emu


def test_q8_0_weights_match_emulated_activation_quantization(case):
    name, spec, tensors, ids, _ = case
    tq, dtypes, deq, emu = quantized_case(spec, tensors)
    ids = ids[:32]
    exact = reference_logits(spec, lambda n: emu[n], ids)  # the same arithmetic as the C core, in NumPy
    plain = reference_logits(spec, lambda n: deq[n], ids)  # no activation quantization
    with c_engine(spec, tq, dtypes) as eng:
        got = eng.logits(ids)
        dec = [eng.prefill(ids[:8])] + [eng.decode(int(t)) for t in ids[8:12]]
    # a 1e-7 difference can flip the rounding of one activation code (one step of d = max|x|/127): allow 1e-3
    assert rel_err(got, exact) <= 1e-3, name
    # against unquantized activations the typical token moves by ~1-3% (0.2-0.5% per matmul, several layers), and
    # a near-tie in routing can pick another expert for a token: check the median token, not the worst
    per_token = np.abs(got - plain).max(1) / np.abs(plain).max()
    assert np.median(per_token) <= 5e-2, name
    for i, d in enumerate(dec):
        assert np.array_equal(d, got[7 + i])


def test_q8_0_weights_with_f32_activations_match_reference(case):
    name, spec, tensors, ids, _ = case
    tq, dtypes, deq, _ = quantized_case(spec, tensors)
    ids = ids[:24]
    ref = reference_logits(spec, lambda n: deq[n], ids)
    with c_engine(spec, tq, dtypes, q8_f32_act=True) as eng:
        got = eng.logits(ids)
        dec = [eng.prefill(ids[:8])] + [eng.decode(int(t)) for t in ids[8:12]]
    assert rel_err(got, ref) <= 1e-5, name
    for i, d in enumerate(dec):
        assert np.array_equal(d, got[7 + i])


def test_threads_do_not_change_results():
    spec = SPECS["qwen2moe"]
    tensors = random_tensors(spec, seed=3)
    ids = ids_for(spec, 30, seed=4)
    outs = []
    for threads in (1, 2, 3):
        with c_engine(spec, tensors, threads=threads) as eng:
            outs.append(eng.logits(ids))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_several_models_open_at_once():
    a_spec, b_spec = SPECS["olmoe"], SPECS["mixtral"]
    a_t, b_t = random_tensors(a_spec, 5), random_tensors(b_spec, 6)
    ids = ids_for(a_spec, 12)
    with c_engine(a_spec, a_t) as a, c_engine(b_spec, b_t) as b:
        la = a.prefill(ids)
        lb = b.prefill(ids)
        la2, lb2 = a.decode(7), b.decode(7)
    assert rel_err(la, reference_logits(a_spec, lambda n: a_t[n], ids)[-1]) <= 1e-5
    assert rel_err(lb, reference_logits(b_spec, lambda n: b_t[n], ids)[-1]) <= 1e-5
    ids2 = np.append(ids, 7)
    assert rel_err(la2, reference_logits(a_spec, lambda n: a_t[n], ids2)[-1]) <= 1e-5
    assert rel_err(lb2, reference_logits(b_spec, lambda n: b_t[n], ids2)[-1]) <= 1e-5


def test_memmap_tensors_are_borrowed(tmp_path):
    spec = SPECS["mixtral"]
    tensors = random_tensors(spec, 7)
    path = tmp_path / "w.bin"
    offsets, off = {}, 0
    with open(path, "wb") as f:
        for n, a in tensors.items():
            offsets[n] = (off, a.shape)
            f.write(a.tobytes())
            off += a.nbytes
    mm = {n: np.memmap(path, dtype=np.float32, mode="r", offset=o, shape=s) for n, (o, s) in offsets.items()}
    ids = ids_for(spec, 10)
    with c_engine(spec, mm) as eng:
        got = eng.logits(ids)
    assert rel_err(got, reference_logits(spec, lambda n: tensors[n], ids)) <= 1e-5


# ---- errors are exceptions with messages, never crashes ----

def test_missing_tensor_is_named():
    spec = SPECS["olmoe"]
    tensors = random_tensors(spec)
    del tensors["blk.1.expert.3.ffn_up.weight"]
    with pytest.raises(N.NativeError, match=r"blk\.1\.expert\.3\.ffn_up\.weight"):
        c_engine(spec, tensors)


def test_bad_shape_and_dtype_are_reported():
    spec = SPECS["olmoe"]
    tensors = random_tensors(spec)
    bad = dict(tensors)
    bad["blk.0.attn_q.weight"] = tensors["blk.0.attn_q.weight"][:, :32].copy()
    with pytest.raises(N.NativeError, match="attn_q.weight"):
        c_engine(spec, bad)
    with pytest.raises(N.NativeError, match="declared f16"):
        c_engine(spec, tensors, {n: "f16" for n in tensors})


def test_invalid_config_is_reported():
    spec = dataclasses.replace(SPECS["olmoe"], sliding_window=-1)
    with pytest.raises(N.NativeError, match="sliding_window"):
        c_engine(spec, random_tensors(SPECS["olmoe"]))


def test_context_overflow_and_bad_token():
    spec = SPECS["mixtral"]
    with c_engine(spec, random_tensors(spec), max_ctx=16) as eng:
        eng.prefill(list(range(10)))
        with pytest.raises(N.NativeError, match="context full") as e:
            eng.extend(list(range(7)))
        assert e.value.status == N.ERR_CTX
        assert eng.n_past == 10  # a failed call changes nothing
        with pytest.raises(N.NativeError, match="outside the vocabulary"):
            eng.decode(spec.vocab)
        eng.decode(3)
        assert eng.n_past == 11
