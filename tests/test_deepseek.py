"""DeepSeek-V2 / V3 (Multi-head Latent Attention, V2's greedy / group-max routing, V3's sigmoid + selection bias +
top-2-sum groups, shared experts, dense first layers, YaRN's softmax mscale) end to end against transformers'
modeling_deepseek_v2 / modeling_deepseek_v3: HF checkpoint -> export -> container -> NumPy and C engines.

The C engine computes MLA in the latent space (scores against the cached latents, kv_b absorbed) while transformers
and the NumPy reference expand every key and value: agreement within 1e-5 checks the absorption too."""

import dataclasses
import importlib

import numpy as np
import pytest
from conftest import hf_logits, rel_err
from tiny_deepseek import CONFIGS, build_deepseek_model

import edgemoe
from edgemoe.container import open_container

N = importlib.import_module("edgemoe._native")
importlib.import_module("edgemoe_export")
importlib.import_module("transformers")

IDS = np.random.default_rng(0).integers(3, 320, 24)
VARIANTS = tuple(CONFIGS)
CALIB = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. " * 60


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """get(name, bits) -> (checkpoint dir, container path), built once per module."""
    from edgemoe_export import export

    root = tmp_path_factory.mktemp("deepseek")
    (root / "calib.txt").write_text(CALIB)
    ckpts, conts = {}, {}

    def get(name: str, bits: int = 32, dense_bits: int = 32):
        """dense_bits 32 keeps MWQ containers' dense weights f32; 8 = the default int8 (q8_0)."""
        if name not in ckpts:
            ckpts[name] = build_deepseek_model(name, root / name)
        if (name, bits, dense_bits) not in conts:
            extra = {} if bits in (16, 32) else {"calib": root / "calib.txt", "calib_tokens": 1024,
                                                 "dense_bits": dense_bits}
            conts[name, bits, dense_bits] = export(ckpts[name], root / f"{name}_{bits}_{dense_bits}.emoe", bits=bits,
                                                   show_progress=False, **extra)
        return ckpts[name], conts[name, bits, dense_bits]

    return get


@pytest.mark.parametrize("engine", ["numpy", "c"])
@pytest.mark.parametrize("name", VARIANTS)
def test_fp32_container_logits_match_transformers(ds, name, engine):
    ckpt, path = ds(name)
    with edgemoe.load(path, engine=engine, threads=2) as m:
        ours = m.logits(IDS)
    assert rel_err(ours, hf_logits(ckpt, IDS)) <= 1e-5


def test_the_reader_states_what_transformers_runs(ds):
    spec = {name: open_container(ds(name)[1]).spec for name in VARIANTS}
    v2, v2g, v3, v3y = (spec[n] for n in VARIANTS)
    assert (v2.kv_lora_rank, v2.q_lora_rank, v2.qk_nope_dim, v2.rope_dim, v2.v_head_dim, v2.head_dim) == (
        32, 24, 16, 8, 24, 24)
    assert v2g.q_lora_rank == 0 and v2.n_kv_heads == v2.n_heads == 4
    assert v2.rope_kind == "norm" and v2.router_fn == "softmax" and not v2.norm_topk and v2.routed_scaling == 1.5
    assert (v2g.n_group, v2g.topk_group, v2g.group_score) == (4, 2, "max")
    assert v3.router_fn == "sigmoid" and v3.score_bias and v3.norm_topk and (v3.n_group, v3.group_score) == (3, "top2_sum")
    assert v2.dense_layers == [0] and v3y.dense_layers == [0, 1] and v2.shared_ffn == 64 and v3.shared_ffn == 32
    # YaRN with mscale_all_dim: transformers scales the scores by mscale(4, 1)^2 / sqrt(head_dim)
    m = 0.1 * np.log(4.0) + 1.0
    assert v3y.rope_scaling == "yarn" and v3y.attn_scale == pytest.approx(m * m / np.sqrt(24))


@pytest.mark.parametrize("name", ["v2", "v3_yarn"])
def test_each_mla_detail_is_needed_for_parity(ds, name):
    """The reference with the RoPE pairing, the latent norms' eps or the softmax scale changed disagrees with
    transformers: the tiny checkpoints really exercise them."""
    from edgemoe.reference import reference_logits

    ckpt, path = ds(name)
    ref = hf_logits(ckpt, IDS)
    with edgemoe.load(path, engine="numpy") as m:
        spec, w = m.spec, m._engine.weight
    assert rel_err(reference_logits(spec, w, IDS), ref) <= 1e-5
    changes = [{"rope_kind": "neox"}, {"mla_norm_eps": 1e-2}]
    if name == "v3_yarn":
        changes.append({"attn_scale": 0.0})
    for change in changes:
        assert rel_err(reference_logits(dataclasses.replace(spec, **change), w, IDS), ref) > 1e-4, change


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_mwq8_container_logits_stay_close_to_transformers(ds, name):
    ckpt, path = ds(name, 8)
    with edgemoe.load(path, engine="c", threads=2) as m:
        ours = m.logits(IDS)
    ref = hf_logits(ckpt, IDS)
    per_token = np.abs(ours - ref).max(1) / np.abs(ref).max()
    assert np.median(per_token) <= 5e-2  # 8-bit MWQ experts with Q8 activations; a routing near-tie may move one
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.8


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_int8_dense_mla_weights_run_exactly_in_c(ds, name):
    """With the default int8 (q8_0) dense weights, the C engine's MLA reads wkv_b's key rows dequantized (absorption)
    and its value rows through the q8_0 matmul at row offsets; with f32 activations (q8_f32_act) it computes exactly
    the container's weights, as the NumPy engine does: only summation order remains."""
    from edgemoe.engine_c import CEngine

    _, path = ds(name, 8, 8)
    with edgemoe.load(path, engine="numpy") as m:
        ref = m.logits(IDS)
        c = m.container
        assert c.tensors["blk.0.attn_kv_b.weight"].dtype == "q8_0"
        tensors = {n: c.array(n) for n, t in c.tensors.items() if t.kind != "blob"}
        quant = {n: {**t.quant, "n_planes": t.n_planes, "plane_offsets": [p["offset"] - t.offset for p in t.planes]}
                 for n, t in c.tensors.items() if t.planes}
        with CEngine(m.spec, tensors, {n: t.dtype for n, t in c.tensors.items()}, planes=c.planes, quant=quant,
                     max_ctx=64, q8_f32_act=True) as exact:
            assert rel_err(exact.logits(IDS), ref) <= 1e-5


@pytest.mark.parametrize("kv_f16", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_equals_token_by_token_decode(ds, name, kv_f16):
    from edgemoe.engine_c import CEngine

    _, path = ds(name)
    spec = open_container(path).spec
    with CEngine.from_container(path, spec, threads=2, max_ctx=64, kv_f16=kv_f16) as eng:
        full = eng.logits(IDS)
        eng.reset()  # a context reset clears the latent cache: the same logits again
        steps = [eng.prefill(IDS[:1].tolist())] + [eng.decode(int(t)) for t in IDS[1:]]
    np.testing.assert_array_equal(np.stack(steps), full)
    if kv_f16:  # the f16 latent cache really rounds (and stays close)
        with CEngine.from_container(path, spec, threads=2, max_ctx=64) as eng:
            f32 = eng.logits(IDS)
        assert 0 < rel_err(full, f32) <= 1e-2


def _greedy(engine, ids, n):
    logits = engine.prefill(ids)
    toks, outs = [], [logits.copy()]
    for _ in range(n):
        toks.append(int(np.argmax(logits)))
        logits = engine.decode(toks[-1])
        outs.append(logits.copy())
    return toks, outs


def _minimum_budget(path, max_ctx, threads):
    with pytest.raises(N.BudgetError) as e:
        edgemoe.load(path, memory_budget=1, max_ctx=max_ctx, threads=threads)
    return int(str(e.value).split("below the minimum ")[1].split("(")[1].split(" bytes")[0])


@pytest.mark.parametrize("bits", [32, 4])
@pytest.mark.parametrize("name", ["v2", "v3"])
def test_budgeted_is_bit_identical_to_resident(ds, name, bits):
    _, path = ds(name, bits)
    ids = np.random.default_rng(3).integers(3, 320, 70).tolist()  # > one 64-token block
    with edgemoe.load(path, max_ctx=128, threads=2) as ref:
        toks_ref, logits_ref = _greedy(ref._engine, ids, 10)
    with edgemoe.load(path, memory_budget=_minimum_budget(path, 128, 2), max_ctx=128, threads=2) as m:
        assert m.engine_name == "c-stream"
        toks, logits = _greedy(m._engine, ids, 10)
        st = m.stats
    assert toks == toks_ref
    for a, b in zip(logits, logits_ref):
        np.testing.assert_array_equal(a, b)
    assert st["evictions"] > 0 and st["bytes_read_per_token"] > 0


def test_the_budget_counts_the_latent_cache_not_full_kv(ds):
    """MLA caches kv_lora_rank + rope_dim values per token and layer; the budget plan says so, and it is what plain
    attention of the same heads would need divided by 2 * n_heads * head_dim / (kv_lora_rank + rope_dim)."""
    from edgemoe.arch import kv_values_per_token

    _, path = ds("v2")
    spec = open_container(path).spec
    assert kv_values_per_token(spec) == spec.n_layers * (32 + 8)
    plain = dataclasses.replace(spec, kv_lora_rank=0, q_lora_rank=0)
    assert kv_values_per_token(plain) == spec.n_layers * 2 * 4 * 24
    budget = _minimum_budget(path, 128, 2)
    with edgemoe.load(path, memory_budget=budget, max_ctx=128, threads=2) as m:
        assert m.stats["budget_parts"]["kv_cache"] == kv_values_per_token(spec) * 128 * 4


@pytest.mark.parametrize("name", VARIANTS)
def test_python_and_c_tensor_tables_agree(ds, name):
    from edgemoe.arch import model_tensors

    path = ds(name)[1]
    spec = open_container(path, verify=False).spec
    h = N.open_resident(path, 8, False, 1)
    try:
        tensors = h.tensors()
    finally:
        h.close()
    assert tensors == model_tensors(spec)
    names = [t[0] for t in tensors]
    assert "blk.0.attn_kv_b.weight" in names and "blk.0.attn_k.weight" not in names
    assert ("blk.0.attn_q_a.weight" in names) == bool(spec.q_lora_rank) != ("blk.0.attn_q.weight" in names)


def test_the_mla_fields_are_validated_by_the_core():
    from edgemoe.arch import ArchSpec
    from edgemoe.errors import InvalidFileError

    base = ArchSpec("deepseek2", n_layers=1, hidden=8, vocab=4, n_heads=2, n_kv_heads=2, head_dim=6, n_experts=3,
                    top_k=2, expert_ffn=4, rope_dim=2, kv_lora_rank=4, qk_nope_dim=4, v_head_dim=3).to_json()
    assert ArchSpec.from_json(base).kv_lora_rank == 4
    for change, msg in (({"kv_lora_rank": 0, "q_lora_rank": 4}, "q_lora_rank = 4 needs"),
                        ({"qk_nope_dim": 3}, "head_dim = 6 == qk_nope_dim = 3"),
                        ({"v_head_dim": 0}, "v_head_dim >= 1"),
                        ({"n_kv_heads": 1}, "n_kv_heads = 1 must equal n_heads = 2"),
                        ({"qk_norm": "head"}, "has no qkv_bias, qk_norm"),
                        ({"mla_norm_eps": -1.0}, "'mla_norm_eps' = -1 must be a positive number")):
        with pytest.raises(InvalidFileError, match=msg):
            ArchSpec.from_json({**base, **change})


def test_unsupported_deepseek_options_are_refused(ds, tmp_path):
    import json
    import shutil

    from edgemoe_export import export

    from edgemoe.errors import EdgeMoEError

    for key, value, msg in (("topk_method", "noaux_tc", "topk_method 'noaux_tc'"),
                            ("attention_bias", True, "attention_bias"), ("hidden_act", "gelu", "hidden_act='gelu'")):
        d = tmp_path / key
        shutil.copytree(ds("v2")[0], d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(EdgeMoEError, match=msg):
            export(d, tmp_path / f"{key}.emoe", bits=32, show_progress=False)
        assert not (tmp_path / f"{key}.emoe").exists()


@pytest.mark.parametrize("name", ["v2", "v3_yarn"])
def test_merge_keeps_shared_experts_and_dense_layers(ds, name, tmp_path):
    """MC-SMoE merge of the routed experts only: the shared experts and the dense first layers pass through bit for
    bit, C equals NumPy on the merged container, and the budget changes nothing (group-limited checkpoints are
    refused by the merge: see test_v3_routing)."""
    from edgemoe_export.merge_stage import export_merged

    (tmp_path / "calib.txt").write_text(CALIB)
    ckpt, plain_path = ds(name)
    path = export_merged(ckpt, tmp_path / "m.emoe", merge_ratio=0.6, calib_path=tmp_path / "calib.txt",
                         calib_tokens=512, seq_len=64, bits=32, show_progress=False)
    merged, plain = open_container(path), open_container(plain_path)
    s = merged.spec
    assert all(not s.expert_map[layer] for layer in s.dense_layers)
    assert sum(s.stored_experts(layer) for layer in range(s.n_layers) if s.is_moe_layer(layer)) < \
        s.n_experts * (s.n_layers - len(s.dense_layers))
    dense = tuple(f"blk.{layer}." for layer in s.dense_layers)
    kept = [n for n in plain.tensors if "shexp" in n or ".attn_" in n or n.startswith(dense)]
    assert any("shexp" in n for n in kept) and "blk.0.ffn_gate.weight" in kept
    for n in kept:
        np.testing.assert_array_equal(merged.array(n), plain.array(n))
    with edgemoe.load(path, engine="numpy") as m:
        ref = m.logits(IDS)
    with edgemoe.load(path, engine="c", threads=2) as m:
        assert rel_err(m.logits(IDS), ref) <= 1e-5
    ids = IDS.tolist()
    with edgemoe.load(path, max_ctx=64, threads=2) as m:
        toks_ref, logits_ref = _greedy(m._engine, ids, 6)
    with edgemoe.load(path, memory_budget=_minimum_budget(path, 64, 2), max_ctx=64, threads=2) as m:
        toks, logits = _greedy(m._engine, ids, 6)
    assert toks == toks_ref and all(np.array_equal(a, b) for a, b in zip(logits, logits_ref))


# --- GGUF: llama.cpp's deepseek2 (through the pinned llama-cpp-python) is the oracle; ONNX refuses ----------------


@pytest.mark.parametrize("name", ["v2", "v3", "v3_yarn"])
def test_deepseek2_gguf_f32_matches_transformers_and_greedy_tokens_match(name, tmp_path):
    """edgemoe writes attn_kv_b split per head (attn_k_b = W_kb^T, attn_v_b = W_vb, llama.cpp's MLA layout) and the
    MLA lengths; llama.cpp agrees with transformers (V2: greedy softmax routing, q_lora, scaling 1.5; V3: sigmoid + bias
    in 3 groups of which 2 are kept; V3 with YaRN: the softmax mscale as yarn_log_multiplier) and with edgemoe's greedy
    tokens. rms_norm_eps 1e-6 (DeepSeek's own) so the
    latent norms' eps is the one llama.cpp uses for them."""
    importlib.import_module("gguf")
    importlib.import_module("llama_cpp")
    from edgemoe_export import export
    from edgemoe_export.gguf_export import export_gguf
    from edgemoe_export.gguf_reader import GGUFCheckpoint
    from test_gguf import llama_logits

    ckpt = build_deepseek_model(name, tmp_path / name, config={"rms_norm_eps": 1e-6})
    path = export_gguf(ckpt, tmp_path / f"{name}.gguf", "F32", show_progress=False)
    got, ref = llama_logits(path, IDS), hf_logits(ckpt, IDS)
    assert rel_err(got, ref) <= 1e-4  # fp32 on both sides (test_gguf.py's F32 tolerance)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    cont = export(ckpt, tmp_path / f"{name}.emoe", bits=32, show_progress=False)
    prompt = IDS[:8].tolist()
    with edgemoe.load(cont, engine="c", threads=2) as m:
        toks, _ = _greedy(m._engine, prompt, 8)
    seq = prompt + toks
    assert llama_logits(path, seq[:-1])[len(prompt) - 1:].argmax(-1).tolist() == toks
    # and back: the GGUF read as an export source (attn_k_b / attn_v_b joined into kv_b) is the same model
    assert GGUFCheckpoint(path).config["model_type"] == ("deepseek_v2" if name == "v2" else "deepseek_v3")
    back = export(path, tmp_path / f"{name}_back.emoe", bits=32, show_progress=False)
    with edgemoe.load(back, engine="c", threads=2) as a, edgemoe.load(cont, engine="c", threads=2) as b:
        assert a.spec.kv_lora_rank == b.spec.kv_lora_rank and a.spec.dense_layers == b.spec.dense_layers
        np.testing.assert_array_equal(a.logits(IDS), b.logits(IDS))


def test_deepseek2_gguf_refuses_what_llama_cpp_computes_otherwise(ds, tmp_path):
    importlib.import_module("gguf")
    from edgemoe_export.gguf_export import export_gguf

    from edgemoe.errors import EdgeMoEError

    yarn = dict(CONFIGS["v3_yarn"]["rope_parameters"], mscale=1.0, mscale_all_dim=0.5)  # cos/sin scaled by 1.05
    odd_yarn = build_deepseek_model("v3_yarn", tmp_path / "odd_yarn", config={"rms_norm_eps": 1e-6,
                                                                              "rope_parameters": yarn})
    for src, msg in ((ds("v2_group")[0], "group-limited greedy routing"), (odd_yarn, "mscale == mscale_all_dim"),
                     (ds("v2")[0], "rms_norm_eps = 1e-05 for the q_a / kv_a norms")):
        with pytest.raises(EdgeMoEError, match=msg):
            export_gguf(src, tmp_path / "out.gguf", "F32", show_progress=False)
        assert not (tmp_path / "out.gguf").exists()


def test_onnx_export_refuses_mla_naming_why(ds, tmp_path):
    importlib.import_module("onnx")
    from edgemoe_export.onnx_export import export_onnx

    from edgemoe.errors import EdgeMoEError

    with pytest.raises(EdgeMoEError, match="Multi-head Latent Attention .* past_key_values"):
        export_onnx(ds("v2_group")[0], tmp_path / "onnx")


def test_info_reports_the_latent_kv_bytes_per_token(ds):
    import subprocess

    from subprocess_python import PYTHON

    path = ds("v2")[1]
    out = subprocess.run([*PYTHON, "-m", "edgemoe", "info", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "KV cache 480 B per token (f32): MLA latent 32 + RoPE key 8 per layer" in out  # 3 layers x 40 x 4 B


@pytest.mark.parametrize("budgeted", [False, True], ids=["resident", "budget"])
def test_batch_decoding_of_several_sequences_equals_each_alone(ds, budgeted):
    """Every sequence slot has its own latent cache rows: one decode_batch over 3 sequences gives each the logits it
    gets alone, bit for bit (resident, and under a budget that counts 3 latent caches)."""
    _, path = ds("v3")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 320, n).tolist() for n in (5, 9, 3)]
    with edgemoe.load(path, max_ctx=64, threads=2) as ref:
        alone = [_greedy(ref._engine, p, 4)[1] for p in prompts]
    budget = None
    if budgeted:
        with pytest.raises(N.BudgetError) as e:
            edgemoe.load(path, memory_budget=1, max_ctx=64, threads=2, n_seq=3)
        budget = int(str(e.value).split("below the minimum ")[1].split("(")[1].split(" bytes")[0])
    with edgemoe.load(path, max_ctx=64, threads=2, n_seq=3, memory_budget=budget) as m:
        eng = m._engine
        logits = [[eng.prefill(p, seq=i)] for i, p in enumerate(prompts)]
        for _ in range(4):
            out = eng.decode_batch([int(np.argmax(lg[-1])) for lg in logits], [0, 1, 2])
            for i in range(3):
                logits[i].append(out[i])
        if budgeted:
            assert m.stats["budget_parts"]["kv_cache"] == 3 * 64 * open_container(path).spec.n_layers * (32 + 8) * 4
    for a_seq, b_seq in zip(alone, logits):
        for a, b in zip(a_seq, b_seq):
            np.testing.assert_array_equal(a, b)
